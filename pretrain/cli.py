"""``python -m pretrain`` (also under ``accelerate launch -m pretrain``).

    python -m pretrain --config CONFIG.yaml [--shards DIR] [--out RUN] [--max-steps N]
                       [--resume [CKPT]] [key.path=value ...]

``--shards``, ``--out`` and ``--max-steps`` are shorthands for the overrides
``data.shards=``, ``train.output_dir=`` and ``train.max_steps=``.  ``--resume``
alone continues from the newest checkpoint under ``RUN/checkpoints``.
"""
from __future__ import annotations

import argparse
import os
import sys

from pretrain.config import ConfigError, load_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pretrain", description="Hybrid pre-training for person search.")
    p.add_argument("--config", required=True, help="YAML config (see pretrain/configs/)")
    p.add_argument("--shards", help="data_prep build directory (holds manifest.json)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (total, counting resumed ones)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from CKPT, or from the newest checkpoint of --out")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides (YAML values)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.resume and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: argparse gave the first override to --resume's optional value
        overrides.insert(0, args.resume)
        args.resume = "latest"
    if args.shards:
        overrides.append(f"data.shards={args.shards}")
    if args.out:
        overrides.append(f"train.output_dir={args.out}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    from pretrain.data import DataError
    from pretrain.train import TrainError, train

    try:
        cfg = load_config(args.config, overrides)
        out = train(cfg, resume=args.resume)
    except (ConfigError, DataError, TrainError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"run directory: {out}")
    return 0
