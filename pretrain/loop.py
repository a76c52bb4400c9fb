"""Pieces of a training loop that pre-training (pretrain/train.py) and fine-tuning
(finetune/engine.py, finetune/cli.py) share, so both loops read the same way.

* :func:`flatten` / :func:`hparams`: a nested config as dotted keys (the resume
  check compares them; TensorBoard's hparams take scalars only);
* :func:`to_device`: a batch of nested lists, tuples and dicts of tensors moved as one;
* :func:`reduce_means`: the logged values of a step, averaged over the accumulation
  window and over all processes (NaN monitors left out);
* :func:`tracker_problem`: a missing tracker package found before any collective.

The optimizer and the learning-rate schedule pieces are in pretrain/optim.py, the
checks that stop a diverging run in pretrain/guard.py, checkpoints in pretrain/state.py.
"""
from __future__ import annotations

import math
from typing import Any

import torch


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; an empty dict leaves no key."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def hparams(cfg) -> dict[str, Any]:
    """A config dataclass as TensorBoard hparams: dotted keys, scalars, anything else as text."""
    from hybridps.pretrain.config import to_dict

    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(to_dict(cfg)).items()}


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move a batch (nested lists, tuples and dicts of tensors) to ``device``; other leaves stay."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):          # a namedtuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def reduce_means(accelerator, window: dict[str, list[float]]) -> dict[str, float]:
    """Mean of each logged value over the accumulation window and all ranks, by name.

    NaN values are left out: a monitor can be undefined for one batch (a domain accuracy
    when the batch holds no dataset of that IAM's task), and one such rank must not turn
    the mean of the others into NaN.  A value that is NaN everywhere stays NaN."""
    names = sorted(window)
    sums = [sum(v for v in window[n] if not math.isnan(v)) for n in names]
    counts = [sum(1 for v in window[n] if not math.isnan(v)) for n in names]
    local = torch.tensor([sums, counts], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local
    mean = total[0] / total[1]          # 0 / 0 -> NaN when no rank had a value
    return {n: float(v) for n, v in zip(names, mean.tolist())}


def tracker_problem(log_with: str | None, off: str = "train.log_with=null") -> str | None:
    """Why ``train.log_with`` cannot work here, or None (``off``: how this command turns
    the tracker off).  Checked on every rank before any collective, so a missing package
    cannot strand the other processes."""
    from accelerate.utils import is_tensorboard_available

    if log_with == "tensorboard" and not is_tensorboard_available():
        return ("train.log_with=tensorboard but neither tensorboard nor tensorboardX is installed "
                f"(pip install tensorboard, or {off})")
    return None
