"""Side-by-side table of several evaluations (``metrics.json`` files).

Used by the demo to compare fine-tuning from random, backbone-only and full
pre-trained initialisation at equal steps.
"""
from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (
    ("mAP", ("search", "mAP")),
    ("top-1", ("search", "top1")),
    ("top-5", ("search", "top5")),
    ("top-10", ("search", "top10")),
    ("det AP", ("detection", "ap")),
    ("det recall", ("detection", "recall")),
)


class CompareError(ValueError):
    """A metrics file is missing or is not an evaluation output."""


def load_metrics(path: str | Path) -> dict:
    """``path`` is a ``metrics.json`` or a folder holding one."""
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.json"
    if not p.is_file():
        raise CompareError(f"{p}: no metrics.json (run `python -m hybridps.finetune eval ... --out DIR` first)")
    data = json.loads(p.read_text())
    if "search" not in data or "detection" not in data:
        raise CompareError(f"{p}: not a finetune eval metrics file (no 'search'/'detection')")
    return data


def _value(metrics: dict, keys: tuple[str, str]) -> float:
    v = metrics.get(keys[0], {}).get(keys[1])
    return float("nan") if v is None else float(v)


def compare_table(paths: list[str | Path], names: list[str] | None = None) -> str:
    """A markdown table, one row per evaluation, in percent (metrics.json
    stores fractions)."""
    names = list(names) if names else [str(p) for p in paths]
    if len(names) != len(paths):
        raise CompareError(f"{len(paths)} metrics files but {len(names)} names")
    rows = [(n, load_metrics(p)) for n, p in zip(names, paths)]
    datasets = sorted({m.get("dataset", "?") for _, m in rows})
    rules = sorted({iou_rule_of(m) for _, m in rows})
    mixed = len(rules) > 1       # then every row names its rule: numbers under different rules do not compare
    head = "| init | " + " | ".join(f"{c} (%)" for c, _ in COLUMNS) + (" | IoU rule" if mixed else "") + " |"
    sep = "|---|" + "---:|" * len(COLUMNS) + ("---|" if mixed else "")
    rule_line = f"IoU rule: {rules[0]}" if not mixed else "IoU rules DIFFER between rows (see the last column)"
    lines = [f"dataset: {', '.join(datasets)}; {rule_line}", "", head, sep]
    for name, m in rows:
        cells = [f"{100 * _value(m, k):.2f}" for _, k in COLUMNS] + ([iou_rule_of(m)] if mixed else [])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def iou_rule_of(metrics: dict) -> str:
    """The IoU rule of an evaluation; files from before the option existed used the standard one."""
    return str(metrics.get("iou_rule", "standard"))
