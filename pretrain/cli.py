"""``python -m hybridps.pretrain`` (also under ``accelerate launch -m hybridps.pretrain``).

    python -m hybridps.pretrain --config CONFIG.yaml [--shards DIR] [--out RUN] [--max-steps N]
                       [--resume [CKPT]] [key.path=value ...]

``--shards``, ``--out``, ``--max-steps`` and ``--verify-shards`` are shorthands
for the overrides ``data.shards=``, ``train.output_dir=``, ``train.max_steps=``
and ``data.verify_shards=true``.  ``--resume`` alone continues from the newest
complete checkpoint under ``RUN/checkpoints``.

Exit status (as ``python -m hybridps.data_prep``): 0 success; 2 bad arguments, config,
data or environment (unwritable or full disk, a run directory in the way),
one line on stderr, never a traceback; 1 an unexpected internal error (the
traceback with HYBRIDPS_DEBUG=1); 130 interrupted (``--resume`` continues).
"""
from __future__ import annotations

import argparse
import os
import uuid
from pathlib import Path

from hybridps.runlog import cli_logging, final_error, result
from hybridps.errors import EXIT_OK, run_cli
from hybridps.pretrain.config import ConfigError, load_config

PROG = "hybridps pretrain"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Hybrid pre-training for person search.")
    p.add_argument("--config", required=True, help="YAML config (see pretrain/configs/)")
    p.add_argument("--shards", help="data_prep build directory (holds manifest.json)")
    p.add_argument("--out", help="run directory")
    p.add_argument("--max-steps", type=int, help="optimizer steps to train (total, counting resumed ones)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CKPT",
                   help="continue from CKPT, or from the newest complete checkpoint of --out")
    p.add_argument("--verify-shards", action="store_true",
                   help="re-hash every shard against the manifest before training (default: once per file, cached)")
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
    if args.verify_shards:
        overrides.append("data.verify_shards=true")
    with cli_logging(PROG, argv) as run:

        def body() -> int:
            from hybridps.pretrain.train import train

            cfg = load_config(args.config, overrides)
            check_output_dir(Path(cfg.train.output_dir))
            run.to_folder(cfg.train.output_dir)
            out = train(cfg, resume=args.resume)
            result(f"run directory: {out}")
            return EXIT_OK

        from hybridps.pretrain.data import DataError
        from hybridps.pretrain.train import TrainError
        return run_cli(PROG, body, (ConfigError, DataError, TrainError), "continue with --resume", report=final_error)


def check_output_dir(out: Path) -> None:
    """Fail before building anything when the run directory cannot be written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
