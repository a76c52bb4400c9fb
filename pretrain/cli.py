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
import errno
import os
import sys
import uuid
from pathlib import Path

from hybridps.data_prep.runlog import cli_logging, final_error, result
from hybridps.pretrain.config import ConfigError, load_config

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_ENV = "HYBRIDPS_DEBUG"
PROG = "python -m hybridps.pretrain"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hybridps.pretrain", description="Hybrid pre-training for person search.")
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
        code, out = _run(args, overrides, run)
        if code == EXIT_OK:
            result(f"run directory: {out}")
    return code


def _run(args, overrides: list[str], run) -> tuple[int, Path | None]:
    """Train; ``(exit status, run directory)``.  Every line also lands in RUN/log.txt."""
    def fail(code: int, line: str) -> tuple[int, None]:
        final_error(line)
        return code, None

    try:
        from hybridps.pretrain.data import DataError
        from hybridps.pretrain.train import TrainError, train

        cfg = load_config(args.config, overrides)
        check_output_dir(Path(cfg.train.output_dir))
        run.to_folder(cfg.train.output_dir)
        out = train(cfg, resume=args.resume)
    except KeyboardInterrupt:
        return fail(EXIT_INTERRUPTED, f"{PROG}: interrupted; continue with --resume")
    except (ConfigError, DataError, TrainError) as e:
        return fail(EXIT_USAGE, f"{PROG}: error: {one_line(e)}")
    except OSError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        return fail(EXIT_USAGE, f"{PROG}: error: {describe_os_error(e)}")
    except Exception as e:
        if os.environ.get(DEBUG_ENV):
            raise
        return fail(EXIT_INTERNAL, f"{PROG}: internal error: {type(e).__name__}: {one_line(e)} "
                                   f"(set {DEBUG_ENV}=1 for the traceback)")
    return EXIT_OK, out


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line.  An error raised in a DataLoader
    worker arrives with the worker's traceback folded into the message; its
    last line is the original error."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = [ln for ln in text.splitlines() if ln.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and "Error" in last.split(": ", 1)[0] else last
    return " ".join(text.split()) or type(e).__name__


def describe_os_error(e: OSError) -> str:
    """What the environment refused, in words a user can act on."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"disk full: no space left on device{where}"
    if e.errno == errno.EDQUOT:
        return f"disk quota exceeded{where}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}"
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"a file is in the way of a directory{where}"
    return f"{e.strerror or e}{where}"


def check_output_dir(out: Path) -> None:
    """Fail before building anything when the run directory cannot be written."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    probe = out / f".write-probe-{uuid.uuid4().hex}"
    probe.write_bytes(b"")
    probe.unlink()
