"""``hybridps ckpt list | download | inspect | convert | export | add | push`` (= ``python -m hybridps.checkpoints``)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Sequence

from hybridps.errors import run_cli
from hybridps.runlog import cli_logging, final_error

from . import registry
from .arch import ARCHS, UnknownArchError, detect_arch
from .convert import ConversionError, convert, mark_mismatches, non_finite_tensors, read_source, shape_mismatches
from .download import ChecksumError, DownloadError, fetch, sha256_of
from .hub import HubError
from .layouts import ALIASES, LAYOUTS, UnknownLayoutError, get_layout
from .layouts.base import backbone_view
from .report import DEFAULT_MIN_FRACTION, InsufficientMatchError, group_counts
from .safe_load import NotAStateDictError, UnsafeFileError
from .style import StyleMismatchError
from .targets import TARGETS

USER_ERRORS = (ChecksumError, DownloadError, ConversionError, InsufficientMatchError, StyleMismatchError,
               UnsafeFileError, NotAStateDictError, UnknownLayoutError, UnknownArchError, registry.RegistryError,
               HubError, FileNotFoundError, FileExistsError, KeyError, ValueError)


def cmd_list(args: argparse.Namespace) -> int:
    entries = registry.load_entries()
    print(f"{'name':<24}{'arch':<14}{'layout':<13}{'style':<9}{'sha256':<10}source")
    for e in entries.values():
        src = e.source
        where = {"hf": lambda: f"hf://{src['repo']}/{src['file']}", "url": lambda: src["url"],
                 "local": lambda: src["path"]}[src["type"]]()
        sha = "yes" if e.sha256 else (f"{e.sha256_prefix}.." if e.sha256_prefix else "unknown")
        print(f"{e.name:<24}{e.arch:<14}{e.layout:<13}{e.style or '?':<9}{sha:<10}{where}"
              + ("  [user]" if e.origin == "user" else ""))
    print(f"\nuser registry: {registry.user_registry_path()}")
    print(f"targets: {', '.join(TARGETS)}")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    entry = registry.get(args.name)
    kw = {k: v for k, v in (("deadline", args.deadline), ("min_rate", args.min_rate)) if v is not None}
    path = fetch(entry, cache=args.cache, offline=args.offline, sha256=args.sha256, **kw)
    print(path)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    src = read_source(args.file, layout=args.layout, cache=args.cache, offline=args.offline)
    sd = src.state_dict
    layout = get_layout(src.layout)
    canon = layout.to_canonical(sd)
    try:
        arch = detect_arch(backbone_view(canon.state_dict).keys())
    except UnknownArchError as exc:
        arch = f"unknown ({exc})"
    info = {
        "source": src.description,
        "layout": src.layout,
        "arch": arch,
        "style": src.style or "unknown",
        "normalization": src.normalization,
        "keys": len(sd),
        "parameters": int(sum(v.numel() for v in sd.values() if v.is_floating_point())),
        "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
        "modules": group_counts(list(sd)),
        "metadata": {k: v for k, v in src.metadata.items() if k not in ("config",)},
    }
    rep = mark_mismatches(canon.report(f"{src.description} as canonical"), shape_mismatches(canon.state_dict))
    bad_values = non_finite_tensors(sd)
    info["matched_fraction"] = round(rep.matched_fraction, 4)
    info["shape_mismatches"] = rep.total("mismatched")
    info["non_finite_tensors"] = len(bad_values)
    path = Path(args.file)
    if path.is_file():
        info["sha256"] = sha256_of(path)
    if args.json:
        print(json.dumps(_strict(info), indent=2, default=str, allow_nan=False))
    else:
        for k, v in info.items():
            print(f"{k:>13}: {v}")
        print(rep.text())
    if bad_values:
        print(f"WARNING: {len(bad_values)} tensor(s) hold NaN/inf values (e.g. {', '.join(bad_values[:3])})",
              file=sys.stderr)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    res = convert(args.source, args.to, args.out, force=args.force, overwrite=args.overwrite,
                  min_fraction=args.min_fraction, num_pids=args.num_pids, cq_size=args.cq_size,
                  with_fc=args.with_fc, source_style=args.source_style, legacy_rpn=args.legacy_rpn,
                  legacy_format=args.legacy_format, seed=args.seed, layout=args.layout,
                  cache=args.cache, offline=args.offline, fresh_rpn=args.fresh_rpn)
    print(res.report.text())
    print(f"\nwrote {res.out} ({res.target}, {res.arch})")
    print(f"use it with:\n    {res.config}")
    if args.report_json:
        Path(args.report_json).write_text(json.dumps(_strict(res.report.as_dict()), indent=2, allow_nan=False))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .bundle import export_bundle

    bundle = export_bundle(args.source, args.out, args.to, overwrite=args.overwrite, num_pids=args.num_pids,
                           cq_size=args.cq_size, offline=args.offline)
    print(f"exports in {Path(args.out)}/ (what loads each: {bundle.index})")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    target = args.path_or_url
    meta: dict = {}
    if target.startswith(("http://", "https://")):
        source = {"type": "url", "url": target}
        file = target.rstrip("/").split("/")[-1] or args.name
    elif target.startswith("hf://"):
        repo, _, file = target[len("hf://"):].partition("/")
        owner, _, rest = file.partition("/")
        repo, file = f"{repo}/{owner}", rest
        if not file:
            raise ValueError("hf sources look like hf://OWNER/REPO/FILE")
        source = {"type": "hf", "repo": repo, "file": file, "revision": args.revision}
    else:
        path = Path(target).expanduser().resolve()
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        source = {"type": "local", "path": str(path)}
        file = path.name
        if path.is_dir() and (path / "meta.json").is_file():
            try:
                meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise ValueError(f"{path / 'meta.json'}: not valid JSON ({type(exc).__name__})") from None
            if not isinstance(meta, dict):
                raise ValueError(f"{path / 'meta.json'}: must be a JSON object, got a {type(meta).__name__}")
    sha = args.sha256
    if sha is None and source["type"] == "local" and Path(source["path"]).is_file():
        sha = sha256_of(Path(source["path"]))
    arch = args.arch or meta.get("backbone")
    if arch not in ARCHS:
        raise ValueError(f"--arch is required (one of {', '.join(ARCHS)})")
    layout = args.layout or ("hybridps" if source["type"] == "local" and Path(source["path"]).is_dir() else None)
    if layout is None:
        raise ValueError(f"--layout is required (one of {', '.join(LAYOUTS)})")
    get_layout(layout)
    norm = {"channels": meta.get("channels", "RGB"), "mean": meta["mean"], "std": meta["std"]} \
        if "mean" in meta and "std" in meta else None
    entry = registry.Entry(name=args.name, source=source, file=file, arch=arch, layout=get_layout(layout).NAME,
                           style=args.style or meta.get("style"), normalization=norm, sha256=sha,
                           notes=args.notes or "", origin="user")
    path = registry.add(entry, replace=args.replace)
    print(f"added {args.name} to {path}")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push

    commit, paths = push(args.run, args.repo, token=args.token, revision=args.revision, private=args.private,
                         message=args.message)
    print(f"pushed {', '.join(paths)} to {args.repo} (commit {commit})")
    at = f"@{args.revision}" if args.revision else ""
    print(f"load it with:\n    create_model(..., weights=\"hf://{args.repo}{at}\")  or  --init hf://{args.repo}{at}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hybridps ckpt",
                                description="Released-weights registry, download, safe loading and conversion.")
    sub = p.add_subparsers(dest="cmd", required=True)

    def net(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--cache", help="cache directory (default $HYBRIDPS_CACHE or XDG cache; hub: HF_HOME)")
        sp.add_argument("--offline", action="store_true", help="use cached files only")

    sp = sub.add_parser("list", help="registry entries and export targets")
    sp.set_defaults(func=cmd_list)

    sp = sub.add_parser("download", help="fetch a registry entry into the cache")
    sp.add_argument("name")
    sp.add_argument("--sha256", help="expected sha256 (overrides the registry)")
    sp.add_argument("--deadline", type=float, metavar="S",
                    help="give up after S seconds in all (URL sources; default $HYBRIDPS_DOWNLOAD_DEADLINE or 6 h)")
    sp.add_argument("--min-rate", type=float, metavar="B",
                    help="give up below B bytes/s on average after 30 s (URL sources; default "
                         "$HYBRIDPS_DOWNLOAD_MIN_RATE or 10000)")
    net(sp)
    sp.set_defaults(func=cmd_download)

    sp = sub.add_parser("inspect", help="what a weight file / run dir / registry entry holds")
    sp.add_argument("file")
    sp.add_argument("--layout", help="skip auto-detection")
    sp.add_argument("--json", action="store_true")
    net(sp)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("convert", help="convert weights to a downstream codebase's format")
    sp.add_argument("source", help="registry name, weight file or pre-training run directory")
    sp.add_argument("--to", required=True, choices=sorted(TARGETS))
    sp.add_argument("--out", required=True)
    sp.add_argument("--force", action="store_true",
                    help="write despite a caffe/pytorch style mismatch, or what the target's client hard-wires "
                         "(nae/seqnet: ResNet-50, RPN anchors)")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    sp.add_argument("--num-pids", type=int, default=5532, help="OIM LUT size (CUHK-SYSU 5532, PRW 482)")
    sp.add_argument("--cq-size", type=int, default=5000, help="OIM circular queue size (CUHK-SYSU 5000, PRW 500)")
    sp.add_argument("--with-fc", action="store_true", help="torchvision/timm: include the fc classifier")
    sp.add_argument("--source-style", choices=("pytorch", "caffe"), help="declare the source's ResNet style")
    sp.add_argument("--layout", help=f"source layout, skip auto-detection ({', '.join(sorted(set(LAYOUTS) | set(ALIASES)))})")
    # nae/seqnet default to both legacy choices: what torch 1.2 / torchvision 0.4 and current torch all read
    sp.add_argument("--legacy-rpn", action=argparse.BooleanOptionalAction, default=None,
                    help="nae/seqnet: torchvision<0.13 RPN names rpn.head.conv.* (default for nae/seqnet)")
    sp.add_argument("--legacy-format", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.save without the zip format, readable by torch<1.6 and current torch "
                         "(default for nae/seqnet)")
    sp.add_argument("--fresh-rpn", action="store_true",
                    help="nae/seqnet: do not copy the source RPN (e.g. trained for other anchor sizes)")
    sp.add_argument("--min-fraction", type=float, default=DEFAULT_MIN_FRACTION,
                    help="refuse when fewer of the target's keys are matched")
    sp.add_argument("--seed", type=int, default=0, help="seed for freshly initialised heads")
    sp.add_argument("--report-json", help="also write the full report as JSON")
    net(sp)
    sp.set_defaults(func=cmd_convert)

    sp = sub.add_parser("export", help="convert to every downstream layout the source's architecture fits")
    sp.add_argument("source", help="pre-training run directory, weight file or registry name")
    sp.add_argument("--out", required=True, help="folder for the files and EXPORTS.txt")
    sp.add_argument("--to", nargs="+", choices=sorted(TARGETS),
                    help="targets (default: torchvision timm mmdet detectron2, plus nae seqnet for ResNet-50)")
    sp.add_argument("--overwrite", action="store_true", help="replace existing files")
    sp.add_argument("--num-pids", type=int, default=5532, help="nae/seqnet OIM LUT size")
    sp.add_argument("--cq-size", type=int, default=5000, help="nae/seqnet OIM circular queue size")
    net(sp)
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("add", help="add your own weights to the user registry")
    sp.add_argument("name")
    sp.add_argument("path_or_url", help="file, run directory, http(s) URL or hf://OWNER/REPO/FILE")
    sp.add_argument("--arch", choices=ARCHS)
    sp.add_argument("--layout", help="key layout of the file")
    sp.add_argument("--style", choices=("pytorch", "caffe"))
    sp.add_argument("--sha256")
    sp.add_argument("--revision", default="main")
    sp.add_argument("--notes")
    sp.add_argument("--replace", action="store_true")
    sp.set_defaults(func=cmd_add)

    sp = sub.add_parser("push", help="publish a run folder (safetensors + config + model card) to the hub")
    sp.add_argument("run", help="pre-training or fine-tuning run folder")
    sp.add_argument("--repo", required=True, help="OWNER/NAME on the hub (created when missing)")
    sp.add_argument("--token", help="hub token (default: $HF_TOKEN or the one `hf auth login` stored)")
    sp.add_argument("--revision", help="branch to commit to (default: main)")
    sp.add_argument("--private", action="store_true", help="create the repository private")
    sp.add_argument("--message", help="commit message")
    sp.set_defaults(func=cmd_push)
    return p


def _strict(obj):
    """JSON values without NaN/inf (null instead: bare NaN is not JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    """Exit 0 ok; 2 bad input, arguments or environment (one line); 1 internal
    error (traceback with HYBRIDPS_DEBUG=1); 130 interrupted."""
    args = build_parser().parse_args(argv)
    prog = f"hybridps ckpt {args.cmd}"
    with cli_logging(prog, None if argv is None else list(argv)):
        return run_cli(prog, lambda: args.func(args), USER_ERRORS, report=final_error)
