"""``python -m hybridps.data_prep {synth,build,preview,inspect}``.

Exit status: 0 success, 2 bad arguments or bad input (a clear one-line
message, never a traceback), 1 an unexpected internal error, 130 interrupted
(re-running the same ``build`` command resumes).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from hybridps.errors import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, run_cli

from hybridps.runlog import cli_logging, final_error, log_to_folder, result

logger = logging.getLogger(__name__)


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


# --------------------------------------------------------------------------- value parsers
def split_pair(text: str, sep: str, flag: str, form: str) -> tuple[str, str]:
    left, found, right = text.partition(sep)
    if not found or not left or not right:
        raise UsageError(f"{flag} {text!r}: expected {form}")
    return left.strip(), right.strip()


def parse_size(text: str, flag: str = "--canvas-size") -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected WxH, e.g. 256x512") from None
    if w < 1 or h < 1:
        raise UsageError(f"{flag} {text!r}: sizes must be positive")
    return w, h


def parse_range(text: str, flag: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected LO,HI, e.g. 1.0,3.0") from None
    if lo > hi:
        raise UsageError(f"{flag} {text!r}: LO must be <= HI")
    return lo, hi


def coerce_value(text: str) -> Any:
    """Format-option values: true/false, none, int, float, comma list, else string."""
    if "," in text:
        return [coerce_value(t) for t in text.split(",") if t != ""]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def sources_from(args) -> list[tuple[str, Path]]:
    return [(n, Path(r).expanduser()) for n, r in (split_pair(s, "=", "--source", "NAME=ROOT") for s in args.source)]


def splits_from(args) -> dict[str, tuple[str, ...]]:
    out = {}
    for s in args.split:
        name, value = split_pair(s, "=", "--split", "NAME=split1,split2")
        out[name] = tuple(v.strip() for v in value.split(",") if v.strip())
    return out


def limits_from(args) -> dict[str, int]:
    out = {}
    for s in args.limit:
        name, value = split_pair(s, "=", "--limit", "NAME=N")
        try:
            out[name] = int(value)
        except ValueError:
            raise UsageError(f"--limit {s!r}: N must be an integer") from None
    return out


def format_options_from(args) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for s in args.format_option:
        name, kv = split_pair(s, ":", "--format-option", "NAME:key=value")
        key, value = split_pair(kv, "=", "--format-option", "NAME:key=value")
        out[name][key] = coerce_value(value)
    return dict(out)


# --------------------------------------------------------------------------- commands
def cmd_synth(args) -> int:
    from .manifest import format_table
    from .synth import TRUTH_FILE, SynthError, summary_rows, write_world

    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    t0 = time.perf_counter()
    log_to_folder(args.out_dir)
    try:
        truths = write_world(args.out_dir, seed=args.seed, size=args.size, only=only,
                             warn=logger.warning, domain_gap=args.domain_gap)
    except SynthError as e:
        if e.__cause__ is None:
            raise UsageError(str(e)) from None
        final_error(f"hybridps data synth: error: {e}")
        return EXIT_INTERNAL
    result(format_table(summary_rows(truths)))
    result(f"wrote {len(truths)} dataset(s) to {args.out_dir} in {time.perf_counter() - t0:.1f}s; "
           f"truth: {Path(args.out_dir) / TRUTH_FILE}")
    return EXIT_OK


def cmd_build(args) -> int:
    from .build import BuildError, BuildOptions, CanvasOptions, run_build
    from .manifest import manifest_table

    canvas = CanvasOptions(
        mode=args.canvas, size=parse_size(args.canvas_size),
        ratio_range=parse_range(args.canvas_ratio, "--canvas-ratio"),
        scale_range=parse_range(args.paste_scale, "--paste-scale"), fill=args.canvas_fill,
    )
    opts = BuildOptions(
        out_dir=Path(args.out_dir), sources=sources_from(args), splits=splits_from(args),
        shard_size=args.shard_size, limits=limits_from(args), canvas=canvas,
        jpeg_quality=args.jpeg_quality, seed=args.seed, format_options=format_options_from(args),
        workers=args.workers, strict=args.strict, overwrite=args.overwrite, progress=not args.quiet,
        max_pixels=args.max_pixels, verify_decode=args.verify_decode, max_side=args.max_side,
    )
    t0 = time.perf_counter()
    try:
        manifest = run_build(opts, log=logger.info)      # progress and log.txt: hybridps/runlog.py
    except BuildError as e:
        raise UsageError(str(e)) from None
    result(manifest_table(manifest))
    result(f"wrote {Path(args.out_dir) / 'manifest.json'} in {time.perf_counter() - t0:.1f}s")
    return EXIT_OK


def _shards_or_usage(specs):
    from .manifest import ManifestError, resolve_shards

    try:
        return resolve_shards(specs)
    except ManifestError as e:
        raise UsageError(str(e)) from None


def cmd_preview(args) -> int:
    from .preview import preview

    if args.n < 1:
        raise UsageError("--n must be >= 1")
    shards, _ = _shards_or_usage(args.shards)
    if not shards:
        raise UsageError("no shards to preview")
    path, drawn = preview(shards, Path(args.out), n=args.n, seed=args.seed, tile=args.tile)
    print(f"wrote {path} ({drawn} samples)")
    return EXIT_OK


def scan_rows(shards: Sequence[Path]) -> list[dict]:
    """inspect without a manifest: count what the shards themselves hold."""
    from .preview import read_samples

    acc: dict = {}
    for shard in shards:
        for s in read_samples(shard):
            meta = json.loads(s["json"])
            k = (meta.get("dataset", "?"), meta.get("split", "?"))
            row = acc.setdefault(k, {"dataset": k[0], "split": k[1], "domain": meta.get("domain", ""),
                                     "task": meta.get("task", ""), "samples": 0, "boxes": 0,
                                     "lo": None, "hi": None, "shards": set()})
            row["samples"] += 1
            row["boxes"] += len(meta.get("boxes", []))
            row["shards"].add(str(shard))
            ids = [p for p in meta.get("pids", []) if p >= 0]
            if ids:
                row["lo"] = min(ids + ([row["lo"]] if row["lo"] is not None else []))
                row["hi"] = max(ids + ([row["hi"]] if row["hi"] is not None else []))
    rows = []
    for r in acc.values():
        ids = "-" if r["lo"] is None else f"[{r['lo']},{r['hi']}]"
        rows.append({"dataset": r["dataset"], "split": r["split"], "domain": r["domain"], "task": r["task"],
                     "samples": r["samples"], "boxes": r["boxes"], "ids seen": ids, "shards": len(r["shards"])})
    return rows


def cmd_inspect(args) -> int:
    from .manifest import format_table, manifest_table

    shards, manifest = _shards_or_usage(args.shards)
    if manifest is not None:
        print(manifest_table(manifest))
        missing = [str(p) for p in shards if not p.is_file()]
        if missing:
            print(f"warning: {len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}")
            return EXIT_USAGE
        return EXIT_OK
    print(format_table(scan_rows(shards)))
    return EXIT_OK


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from .formats import FORMATS

    p = argparse.ArgumentParser(prog="hybridps data", description="Dataset releases -> webdataset shards.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{synth,build,preview,inspect}")

    s = sub.add_parser("synth", help="write synthetic copies of the datasets in their release layouts")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--size", choices=("tiny", "small", "bench"), default="tiny",
                   help="bench = small with a larger PRW test split (>= 100 queries)")
    s.add_argument("--domain-gap", type=float, default=1.0, metavar="G",
                   help="how far each dataset's style lies from the PRW (target) style: 0 none, "
                        "1 the built-in styles (default), >1 exaggerated")
    s.add_argument("--only", metavar="NAME,...", help=f"subset of: {','.join(FORMATS)}")
    s.set_defaults(func=cmd_synth)

    b = sub.add_parser("build", help="build webdataset shards + manifest.json from dataset releases",
                       description="Datasets take domains (and id blocks) in --source order.")
    b.add_argument("out_dir", metavar="OUT_DIR")
    b.add_argument("--source", action="append", default=[], metavar="NAME=ROOT",
                   help=f"dataset release root; NAME in: {','.join(FORMATS)} (repeat; order = domain order)")
    b.add_argument("--split", action="append", default=[], metavar="NAME=SPLIT,...",
                   help="splits to build (default: the format's DEFAULT_SPLITS)")
    b.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1))))
    b.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard")
    b.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                   help="seeded random subset of N records per split (keys saved to OUT/NAME/subset_keys*.txt)")
    b.add_argument("--canvas", choices=("none", "expand_resize", "random_paste"), default="none",
                   help="bake re-ID crops onto canvases")
    b.add_argument("--canvas-size", default="256x512", metavar="WxH")
    b.add_argument("--canvas-ratio", default="1.0,3.0", metavar="LO,HI",
                   help="expand_resize: canvas side / crop side, drawn per axis")
    b.add_argument("--paste-scale", default="1.0,1.0", metavar="LO,HI", help="random_paste: crop scale range")
    b.add_argument("--canvas-fill", choices=("mean", "constant", "replicate"), default="mean")
    b.add_argument("--jpeg-quality", type=int, default=95, metavar="Q", help="for re-encoded PNG/raw/canvas images")
    b.add_argument("--strict", action="store_true", help="fail on the first skipped input")
    b.add_argument("--max-pixels", type=int, default=64_000_000, metavar="N",
                   help="skip images whose header says more pixels (too_large_image; default 64 Mpx)")
    b.add_argument("--verify-decode", action="store_true",
                   help="fully decode pass-through JPEGs and check their scan data (corrupt_image); off by "
                        "default: it costs the pass-through speed")
    b.add_argument("--max-side", type=int, default=None, metavar="N",
                   help="downscale images whose longer side exceeds N pixels (boxes scaled with them; the "
                        "json's 'resize' records the scale); decode cost grows with pixels")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--format-option", action="append", default=[], metavar="NAME:key=value",
                   help="keyword passed to NAME's parser, e.g. ecp:time=day or crowdhuman:box=vbox")
    b.add_argument("--overwrite", action="store_true", help="replace a build made with other arguments")
    b.add_argument("--quiet", action="store_true",
                   help="no progress bar or progress lines on stderr (OUT_DIR/log.txt still gets the lines)")
    b.set_defaults(func=cmd_build)

    v = sub.add_parser("preview", help="draw sampled shard images with their boxes into a PNG grid")
    v.add_argument("shards", nargs="+", metavar="SHARDS", help="a build dir (manifest) or shard paths/globs")
    v.add_argument("--out", required=True, metavar="grid.png")
    v.add_argument("--n", type=int, default=16)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--tile", type=int, default=256, help="tile side in pixels")
    v.set_defaults(func=cmd_preview)

    i = sub.add_parser("inspect", help="print a build's manifest (or shard contents) as a table")
    i.add_argument("shards", nargs="+", metavar="SHARDS")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"hybridps data {args.command}"
    with cli_logging(prog, None if argv is None else list(argv)):
        return run_cli(prog, lambda: args.func(args), (UsageError,),
                       "re-run the same command to resume" if args.command == "build" else "", report=final_error)
