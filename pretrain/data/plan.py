"""The epoch plan: which sample addresses each rank and dataloader worker handles.

A pure function of ``(seed, epoch)`` over addresses ``(shard, index in shard, repeat)``
known from the manifest; nothing here reads a shard (only :func:`plan_keys` asks the
reader for keys).  See the package docstring for the epoch semantics.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

from hybridps.pretrain.data.config import DataError
from hybridps.pretrain.data.reader import ShardReader
from hybridps.pretrain.data.source import ShardSource


PlanItem = tuple[int, int, int]   # (shard index, sample index in shard, repeat)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def dataset_weights(source: ShardSource, weights: dict[str, float] | None) -> dict[str, float]:
    """Per-dataset weights for the datasets present in the source; every
    dataset must be named (weight 0 excludes one) so nothing is mixed in by accident."""
    present = sorted({s.dataset for s in source.shards}, key=lambda d: source.manifest["datasets"][d]["domain"])
    if weights is None:
        return {d: 1.0 for d in present}
    unknown = sorted(set(weights) - set(source.manifest["datasets"]))
    if unknown:
        raise DataError(f"data.weights names datasets not in the manifest: {unknown}")
    missing = [d for d in present if d not in weights]
    if missing:
        raise DataError(f"data.weights has no weight for {missing}; add e.g. data.weights.{missing[0]}=0 to exclude it")
    return {d: float(weights[d]) for d in present}


def epoch_plan(source: ShardSource, weights: dict[str, float], seed: int, epoch: int) -> list[PlanItem]:
    """The shuffled list of sample addresses of one epoch (pure in seed/epoch)."""
    by_dataset: dict[str, list[tuple[int, int]]] = {}
    for s, info in enumerate(source.shards):
        by_dataset.setdefault(info.dataset, []).extend((s, i) for i in range(info.samples))
    plan: list[PlanItem] = []
    for name in sorted(by_dataset):
        addresses = by_dataset[name]
        w = weights.get(name, 0.0)
        whole, frac = int(w), w - int(w)
        for r in range(whole):
            plan.extend((s, i, r) for s, i in addresses)
        extra = int(round(frac * len(addresses)))
        if extra:
            pick = _rng(seed, epoch, _stable_int(name)).choice(len(addresses), size=extra, replace=False)
            plan.extend((*addresses[j], whole) for j in sorted(pick))
    if not plan:
        raise DataError("the epoch plan is empty: every dataset has weight 0 or no samples")
    order = _rng(seed, epoch, 0x5EED).permutation(len(plan))
    return [plan[j] for j in order]


def equalize(plan: list, world: int, batch_size: int, remainder: str = "drop") -> list:
    """Make the plan a multiple of ``world * batch_size`` so every rank gets
    the same number of full batches."""
    step = world * batch_size
    if remainder == "drop":
        n = len(plan) - len(plan) % step
        if n == 0:
            raise DataError(f"epoch of {len(plan)} samples is smaller than one global batch ({step})")
        return plan[:n]
    if remainder == "pad":
        short = -len(plan) % step
        return plan + [plan[j % len(plan)] for j in range(short)]
    raise DataError(f"remainder must be 'drop' or 'pad', got {remainder!r}")


def aspect_groups(source: ShardSource, canvas_size: Sequence[int]) -> list[int]:
    """Orientation group of each shard: 1 for re-ID crops (they end on ``canvas_size``
    canvases, portrait by default), 0 for detection / person-search scenes (landscape)."""
    portrait = int(canvas_size[1] > canvas_size[0])
    tasks = {name: d.get("task") for name, d in source.manifest["datasets"].items()}
    return [portrait if tasks.get(info.dataset) == "reid" else 0 for info in source.shards]


def group_by_aspect(plan: list, shard_group: Sequence[int], step: int) -> list:
    """Reorder an equalized plan so that every global batch (``step`` consecutive entries)
    holds images of one orientation where possible (torchvision's GroupedBatchSampler idea).

    Walks the shuffled plan, fills one buffer per group and emits a buffer as a global batch
    when it is full; what is left at the end (less than one batch per group) forms the last,
    mixed batches.  The result is a permutation of ``plan`` (same entries, so rank coverage
    and the no-duplicate property hold) and a pure function of it.  A portrait canvas next to
    a landscape scene pads the batch to nearly square: the padding costs compute and lets the
    detection IAM's discriminator win on padding."""
    if len(plan) % step:
        raise DataError("plan length must be a multiple of world*batch_size (call equalize first)")
    buffers: dict[int, list] = {}
    out: list = []
    for item in plan:
        buf = buffers.setdefault(shard_group[item[0]], [])
        buf.append(item)
        if len(buf) == step:
            out.extend(buf)
            buf.clear()
    for group in sorted(buffers):
        out.extend(buffers[group])
    return out


def rank_batches(n_plan: int, rank: int, world: int, batch_size: int) -> list[list[int]]:
    """Plan positions of each batch of ``rank``: ranks interleave over the
    plan, so global step ``b`` uses positions ``[b*world*B, (b+1)*world*B)``."""
    if n_plan % (world * batch_size):
        raise DataError("plan length must be a multiple of world*batch_size (call equalize first)")
    mine = list(range(rank, n_plan, world))
    return [mine[j:j + batch_size] for j in range(0, len(mine), batch_size)]


def worker_batches(n_batches: int, start: int, worker: int, num_workers: int) -> list[int]:
    """Batch indices ``>= start`` handled by ``worker``; torch's DataLoader
    visits workers round-robin, so this reproduces the rank's batch order."""
    return [b for b in range(start, n_batches) if (b - start) % num_workers == worker]


def plan_keys(reader: ShardReader, plan: Sequence[PlanItem]) -> list[str]:
    """Unique sample keys of plan entries (``key@r`` for repeats)."""
    return [_plan_key(reader.key(s, i), r) for s, i, r in plan]


def _plan_key(key: str, repeat: int) -> str:
    return key if repeat == 0 else f"{key}@{repeat}"
