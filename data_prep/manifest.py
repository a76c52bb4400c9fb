"""``manifest.json`` of a shard build (CONTRACTS section 3): read, write,
locate shards, and render as a table.

Written last and atomically by ``data_prep build``; its presence means every
shard it lists is complete.  Consumers (pretrain, finetune, preview,
inspect) read it with :func:`load_manifest`.
"""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Iterable, Sequence

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
REQUIRED_KEYS = ("version", "num_ids", "domains", "datasets")


class ManifestError(Exception):
    """A manifest or shard list that cannot be used (message is user-facing)."""


def write_manifest(out_dir: Path, manifest: dict) -> Path:
    from .build.files import atomic_write_json

    path = Path(out_dir) / MANIFEST_NAME
    atomic_write_json(path, manifest)
    return path


def manifest_path(path) -> Path:
    p = Path(path)
    return p / MANIFEST_NAME if p.is_dir() else p


def load_manifest(path) -> dict:
    """Load ``path`` (a build directory or its manifest.json) and check its shape."""
    p = manifest_path(path)
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{p}: no manifest (is this a finished `data_prep build` output?)") from None
    except ValueError as e:
        raise ManifestError(f"{p}: not valid JSON ({e})") from None
    missing = [k for k in REQUIRED_KEYS if k not in m] if isinstance(m, dict) else list(REQUIRED_KEYS)
    if missing:
        raise ManifestError(f"{p}: not a shard manifest (missing {', '.join(missing)})")
    if m["version"] != MANIFEST_VERSION:
        raise ManifestError(f"{p}: manifest version {m['version']}, this code reads {MANIFEST_VERSION}")
    return m


def shard_paths(manifest: dict, root, datasets: Iterable[str] | None = None,
                splits: Iterable[str] | None = None) -> list[Path]:
    """Absolute shard paths, in domain then split then shard order."""
    want_ds = None if datasets is None else set(datasets)
    want_sp = None if splits is None else set(splits)
    out = []
    for name in manifest["domains"]:
        if want_ds is not None and name not in want_ds:
            continue
        for split, entry in manifest["datasets"][name]["splits"].items():
            if want_sp is None or split in want_sp:
                out += [Path(root) / s["path"] for s in entry["shards"]]
    return out


def resolve_shards(specs: Sequence[str]) -> tuple[list[Path], dict | None]:
    """SHARDS arguments of preview/inspect: a build directory / manifest.json
    (-> its shards and the manifest) or shard paths and globs."""
    if len(specs) == 1 and (Path(specs[0]).is_dir() or Path(specs[0]).name == MANIFEST_NAME):
        m = load_manifest(specs[0])
        root = manifest_path(specs[0]).parent
        return shard_paths(m, root), m
    paths: list[Path] = []
    for spec in specs:
        hits = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not hits:
            raise ManifestError(f"{spec}: matches no file")
        for h in hits:
            if not Path(h).is_file():
                raise ManifestError(f"{h}: no such shard file")
            paths.append(Path(h))
    return paths, None


# --------------------------------------------------------------------------- tables
def _fmt_counts(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(d.items())) or "-"


def summary_rows(manifest: dict) -> list[dict]:
    rows = []
    for name in manifest["domains"]:
        ds = manifest["datasets"][name]
        lo, hi = ds["id_range"]
        for split, e in ds["splits"].items():
            rows.append({
                "dataset": name, "split": split, "domain": ds["domain"], "task": ds["task"],
                "labeled": "yes" if ds["labeled"] else "no", "samples": e["samples"], "boxes": e["boxes"],
                "ids": f"[{lo},{hi})", "skipped": _fmt_counts(e["skipped"]), "fixed": _fmt_counts(e.get("fixed", {})),
                "shards": len(e["shards"]),
            })
    return rows


def totals_row(manifest: dict) -> dict:
    rows = summary_rows(manifest)
    skipped: dict[str, int] = {}
    for name in manifest["domains"]:
        for e in manifest["datasets"][name]["splits"].values():
            for k, v in e["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
    return {"dataset": "TOTAL", "split": "", "domain": "", "task": "", "labeled": "",
            "samples": sum(r["samples"] for r in rows), "boxes": sum(r["boxes"] for r in rows),
            "ids": f"num_ids={manifest['num_ids']}", "skipped": _fmt_counts(skipped), "fixed": "",
            "shards": sum(r["shards"] for r in rows)}


def format_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    """Plain aligned text table (numbers right-aligned)."""
    if not rows:
        return "(empty)"
    columns = list(columns or rows[0].keys())
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(r.get(c), int) or r.get(c) == "" for r in rows) for c in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(vals, widths, numeric)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(columns), sep] + [line(r) for r in cells])


def manifest_table(manifest: dict) -> str:
    rows = summary_rows(manifest)
    return format_table(rows + [totals_row(manifest)])
