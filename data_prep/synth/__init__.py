"""Synthetic copies of every dataset, in their real release layouts.

One writer per format (``data_prep/synth/<name>.py``, CONTRACTS section 2)
with ``write(root, seed, size) -> truth``; :func:`write_world` runs them all
into ``OUT/<name>`` and collects the ground truths that tests compare the
parsers and the shard builder against.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Callable, Sequence

# "bench" = "small" except where a writer defines it (PRW: >= 100 queries for the ablation benchmark)
SIZES = ("tiny", "small", "bench")
TRUTH_FILE = "synth_truth.json"


class SynthError(Exception):
    """A writer failed or was asked for something unknown (user-facing message)."""


def writer_module(name: str):
    """The writer module for ``name``, or ``None`` if it does not exist (yet).

    Only the absence of the module itself counts as "not there"; an import
    error inside an existing writer is a real failure and propagates."""
    modname = f"{__name__}.{name}"
    try:
        return importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name == modname:
            return None
        raise


def _jsonable(obj):
    if hasattr(obj, "item"):          # numpy scalar
        return obj.item()
    if hasattr(obj, "tolist"):        # numpy array
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_world(
    out_dir,
    seed: int = 0,
    size: str = "tiny",
    only: Sequence[str] | None = None,
    warn: Callable[[str], None] = print,
    domain_gap: float = 1.0,
) -> dict:
    """Write the synthetic copy of every format (or ``only`` those) under
    ``out_dir/<name>`` and ``out_dir/synth_truth.json``; returns the truths
    ``{name: truth}``.  Formats whose writer is missing are skipped with a
    warning; a writer that raises is a :class:`SynthError` naming it.  ``domain_gap`` scales
    how far each dataset's style lies from the PRW (target) style (render.domain_gap)."""
    from ..formats import FORMATS
    from .render import domain_gap as gap_context

    if size not in SIZES:
        raise SynthError(f"size must be one of {SIZES}, got {size!r}")
    if not domain_gap >= 0:
        raise SynthError(f"domain gap must be >= 0, got {domain_gap}")
    names = list(FORMATS if only is None else only)
    unknown = [n for n in names if n not in FORMATS]
    if unknown:
        raise SynthError(f"unknown dataset(s) {', '.join(unknown)}; known: {', '.join(FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    truths: dict = {}
    for name in names:
        mod = writer_module(name)
        if mod is None:
            warn(f"warning: no synthetic writer data_prep/synth/{name}.py yet; skipping {name}")
            continue
        own = size if size in getattr(mod, "SIZES", {}) else ("small" if size == "bench" else size)
        try:
            with gap_context(domain_gap):
                truth = mod.write(out / name, seed=seed, size=own)
        except Exception as e:
            raise SynthError(f"synthetic writer {name} failed: {type(e).__name__}: {e}") from e
        truths[name] = truth
    (out / TRUTH_FILE).write_text(json.dumps(truths, indent=1, sort_keys=True, default=_jsonable) + "\n")
    return truths


def summary_rows(truths: dict) -> list[dict]:
    """One row per (dataset, split): records, boxes, ids, expected skips."""
    rows = []
    for name, truth in truths.items():
        for split, t in truth.get("splits", {}).items():
            recs = t.get("records", {})
            ids = {i for r in recs.values() for i in r.get("ids", []) if i >= 0}
            rows.append({
                "dataset": name, "split": split, "records": len(recs),
                "boxes": sum(len(r.get("boxes", [])) for r in recs.values()), "ids": len(ids),
                "skipped": " ".join(f"{k}={v}" for k, v in sorted(t.get("skipped", {}).items())) or "-",
            })
    return rows
