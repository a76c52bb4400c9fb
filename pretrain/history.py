"""``history.jsonl``: one strict-JSON line per optimizer step, the same for
pre-training and fine-tuning (finetune imports this module).

Fields (every line, both trainers)::

    step      optimizer steps done
    lr        learning rate of the first parameter group after the step
    loss      the weighted total that was minimised
    terms     every named value the model returned: loss terms (loss_*) and
              monitors (pre-training's acc_*, simsiam_std...); null where undefined
    time      seconds of training since the run started (continues over --resume)
    mem_mib   peak memory so far (GPU allocator on CUDA, else the process's peak RSS)

On ``--resume`` the lines after the checkpoint's step are dropped, so the file
stays one trajectory; a half-written last line of a killed run is dropped
with a warning.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

from hybridps.runlog import dumps, memory_mib

HISTORY_NAME = "history.jsonl"
FIELDS = ("step", "lr", "loss", "terms", "time", "mem_mib")

log = logging.getLogger(__name__)


def record(step: int, lr: float, values: dict[str, float], seconds: float) -> dict:
    """One history line from the model's named values (``values["loss"]`` is the total)."""
    terms = {k: v for k, v in values.items() if k != "loss"}
    return {"step": step, "lr": lr, "loss": values["loss"], "terms": terms, "time": round(seconds, 3),
            "mem_mib": round(memory_mib(), 1)}


def lines_up_to(path: Path, step: int, step_of: Callable[[str], int]) -> list[str]:
    """Lines of a per-step log with step <= ``step``.  A line that does not
    parse (the half-written last line of a killed run) is dropped with a
    warning instead of stopping the resume."""
    if not path.is_file():
        return []
    kept, dropped = [], 0
    for ln in path.read_text(errors="replace").splitlines():
        if not ln:
            continue
        try:
            s = step_of(ln)
        except (ValueError, KeyError, TypeError, IndexError):
            dropped += 1
            continue
        if isinstance(s, int) and s <= step:
            kept.append(ln)
    if dropped:
        log.warning("%s: dropped %d unreadable line(s) (a run killed while writing it)", path, dropped)
    return kept


class History:
    """Appends :func:`record` lines to ``<out>/history.jsonl`` (rank 0 only:
    other ranks get a writer that drops everything)."""

    def __init__(self, out: Path, step: int = 0, main: bool = True) -> None:
        self.path = Path(out) / HISTORY_NAME
        self.elapsed_before = 0.0       # training seconds of the run up to ``step`` (for "time")
        if not main:
            self.f = open(os.devnull, "w")
            return
        kept = lines_up_to(self.path, step, lambda ln: json.loads(ln)["step"]) if step else []
        if kept:
            try:
                self.elapsed_before = float(json.loads(kept[-1]).get("time") or 0.0)
            except (ValueError, TypeError, AttributeError):
                pass
        self.f = open(self.path, "w")
        self.f.write("".join(ln + "\n" for ln in kept))
        self.f.flush()

    def write(self, rec: dict) -> None:
        self.f.write(dumps(rec) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()
