"""The global identity space of a build (the paper's data unification).

Datasets take consecutive id blocks in domain order.  Within a dataset's
block ``[lo, hi)``:

* labeled identities first: the sorted distinct local ids (``>= 0``) of
  labeled re-ID / person-search records map to ``lo, lo+1, ...``;
* then pseudo ids, one fresh id per detection person and per unlabeled re-ID
  image (a labeled re-ID record whose id is ``-1`` counts as unlabeled), in
  record order (splits in build order, records in parser order, boxes in
  record order);
* person-search boxes without an identity stay ``-1`` (the OIM queue).

Local ids live in *identity spaces*: a format module may declare
``ID_SPACES = {split: space}`` (e.g. MSMT17's train/val share the space
"train" while query/gallery are the different people of "test", whose labels
restart at 0).  Splits not named there are each their own space.  A labeled
identity is the pair ``(space, local id)``.

Ids are allocated from annotations, before any image is read, so a record
later dropped by an image check leaves its ids reserved but unused (an OIM
LUT row that is never updated); the manifest reports how many.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .record import Record

UNLABELED = -1


@dataclass
class IdBlock:
    """The ids one dataset owns: labeled ``[lo, lo + num_labeled)`` then pseudo."""

    dataset: str
    lo: int
    num_labeled: int = 0
    num_pseudo: int = 0
    label_map: dict[tuple[str, int], int] = field(default_factory=dict)  # (space, local id) -> global id
    id_spaces: dict[str, str] = field(default_factory=dict)              # split -> space

    def space_of(self, rec: Record) -> str:
        return self.id_spaces.get(rec.split, rec.split)

    @property
    def hi(self) -> int:
        return self.lo + self.num_labeled + self.num_pseudo


def _uses_label(rec: Record, local_id: int) -> bool:
    return rec.labeled and rec.task in ("reid", "ps") and local_id >= 0


def labeled_ids(records: Iterable[Record], id_spaces: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """Sorted distinct ``(space, local id)`` pairs that get a labeled global id."""
    spaces = id_spaces or {}
    return sorted({(spaces.get(r.split, r.split), i) for r in records for i in r.ids if _uses_label(r, i)})


def pseudo_count(rec: Record) -> int:
    """How many fresh pseudo ids :func:`global_ids_for` draws for ``rec`` (a
    streaming build counts them per split before any id is handed out)."""
    return sum(1 for local in rec.ids if not _uses_label(rec, local) and rec.task != "ps")


def global_ids_for(rec: Record, block: IdBlock) -> list[int]:
    """Global ids of ``rec``'s boxes; draws fresh pseudo ids from ``block``."""
    out = []
    for local in rec.ids:
        if _uses_label(rec, local):
            out.append(block.label_map[(block.space_of(rec), local)])
        elif rec.task == "ps":
            out.append(UNLABELED)
        else:  # det person, or unlabeled re-ID image
            out.append(block.hi)
            block.num_pseudo += 1
    return out


def assign_dataset(
    dataset: str, records: Sequence[Record], lo: int, id_spaces: dict[str, str] | None = None
) -> tuple[IdBlock, list[list[int]]]:
    """Allocate the block of one dataset starting at ``lo``; returns the block
    and the global ids per record (same order as ``records``)."""
    labels = labeled_ids(records, id_spaces)
    block = IdBlock(dataset, lo, num_labeled=len(labels),
                    label_map={l: lo + k for k, l in enumerate(labels)}, id_spaces=dict(id_spaces or {}))
    return block, [global_ids_for(r, block) for r in records]


def assign_build(
    datasets: Sequence[tuple[str, Sequence[Record]] | tuple[str, Sequence[Record], dict[str, str]]],
) -> tuple[list[IdBlock], list[list[list[int]]], int]:
    """Allocate blocks for every dataset in domain order.

    ``datasets``: ``(name, records[, id_spaces])`` with records of all the
    dataset's splits concatenated in build order.  Returns the blocks, the global ids per
    record per dataset, and ``num_ids`` (the OIM LUT size).
    """
    blocks, pids, nxt = [], [], 0
    for name, records, *spaces in datasets:
        block, ids = assign_dataset(name, records, nxt, spaces[0] if spaces else None)
        blocks.append(block)
        pids.append(ids)
        nxt = block.hi
    return blocks, pids, nxt
