"""Person-search training and test data for fine-tuning, straight from the releases.

* :func:`load_train_records` parses a dataset's training split with its
  data_prep format module (annotation-only; pixels are read per item).
* :func:`relabel` maps the dataset's own training identities to the OIM LUT
  rows 0..N-1: the **sorted distinct labeled ids**.  The LUT size is the number
  of distinct ids actually present, whatever the dataset's id numbering:

  - PRW: raw pids {1..478, 480..483, 932} -> **483** rows.  NAE/SeqNet/COAT use
    482 rows and raw pids, so raw 483 and 932 silently become unlabeled and
    LUT row 478 is never used (docs/datasets.md section 3.4); we do not copy that.
  - CUHK-SYSU: the parser's 0..5531 -> 5532 rows (unchanged).
  - PoseTrack21: the distinct ``person_id`` values of train.json, sorted.

  Unlabeled persons keep -1 (they feed the OIM circular queue).
* :func:`train_subset` picks a seeded fraction of training images (same seed
  and fraction -> same images).
* :class:`PersonSearchDataset` is a map-style torch Dataset over those
  records: ``(image CHW float [0,1], target{"boxes","pids"}, key)`` with
  horizontal-flip augmentation for training.
* :class:`ImageListDataset` serves protocol images (gallery or query frames)
  for inference.
"""
from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from hybridps.data_prep.formats import get_format
from hybridps.data_prep.imageio import ImageError, decode_rgb, load_encoded
from hybridps.data_prep.record import ImageRef, Record, Skip

TRAIN_SPLIT = "train"


class DatasetError(ValueError):
    """A dataset root that cannot be used for fine-tuning, with the reason."""


def _format(dataset: str):
    try:
        fmt = get_format(dataset)
    except KeyError as e:
        raise DatasetError(str(e.args[0])) from None
    if getattr(fmt, "TASK", None) != "ps":
        raise DatasetError(f"{dataset} is not a person-search dataset (task {fmt.TASK!r})")
    return fmt


def load_train_records(dataset: str, root: str | Path) -> tuple[list[Record], Counter]:
    """All usable training records (parser order) and the skip counts."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{dataset}: root {root} is not a directory")
    fmt = _format(dataset)
    records, skipped = [], Counter()
    try:
        for item in fmt.parse(root, TRAIN_SPLIT):
            if isinstance(item, Record):
                records.append(item)
            elif isinstance(item, Skip):
                skipped[item.reason] += 1
    except (FileNotFoundError, ValueError) as e:
        # parsers name the file and the problem; add which dataset was being read
        raise DatasetError(f"{dataset}: {e}") from None
    if not records:
        raise DatasetError(f"{dataset}: no usable training image under {root} (skipped: {dict(skipped)})")
    return records, skipped


def load_protocol(dataset: str, root: str | Path, gallery_size: int | None = None):
    """The test protocol (queries + gallery) through the dataset's parser.
    ``gallery_size`` only applies to CUHK-SYSU."""
    fmt = _format(dataset)
    size = gallery_size if dataset == "cuhk_sysu" else None
    if not Path(root).is_dir():
        raise DatasetError(f"{dataset}: root {root} is not a directory")
    try:
        return fmt.load_protocol(Path(root), size)
    except (FileNotFoundError, ValueError) as e:
        raise DatasetError(f"{dataset}: {e}") from None


@dataclass
class Relabeling:
    """Dataset id -> LUT row; ``num_ids`` rows in total."""

    mapping: dict[int, int]

    @property
    def num_ids(self) -> int:
        return len(self.mapping)

    def apply(self, ids: list[int]) -> list[int]:
        return [self.mapping.get(int(i), -1) if i >= 0 else -1 for i in ids]


def relabel(records: list[Record]) -> tuple[list[Record], Relabeling]:
    """Sorted distinct labeled ids -> contiguous 0..N-1 (see the module doc)."""
    distinct = sorted({int(i) for r in records if r.labeled for i in r.ids if i >= 0})
    if not distinct:
        raise DatasetError("no labeled identity in the training images: OIM needs at least one")
    lab = Relabeling({pid: row for row, pid in enumerate(distinct)})
    return [replace(r, ids=lab.apply(r.ids)) for r in records], lab


def train_subset(records: list[Record], fraction: float, seed: int) -> list[Record]:
    """A seeded random ``fraction`` of the training images (at least one),
    kept in parser order.  Depends only on (keys, fraction, seed)."""
    if not 0.0 < fraction <= 1.0:
        raise DatasetError(f"--train-fraction must be in (0, 1], got {fraction}")
    if fraction >= 1.0:
        return list(records)
    n = max(1, int(round(fraction * len(records))))
    keys = sorted(r.key for r in records)
    chosen = set(random.Random(f"train-subset/{seed}").sample(keys, n))
    return [r for r in records if r.key in chosen]


def read_image(ref: ImageRef) -> torch.Tensor:
    """CHW float tensor in [0, 1]; raises DatasetError naming the image."""
    try:
        payload, fmt = load_encoded(ref)
        rgb = decode_rgb(payload, fmt)
    except ImageError as e:
        raise DatasetError(f"cannot read image {ref.path}{':' + ref.key if ref.key else ''}: {e}") from None
    # a copy: decoded arrays may be read-only views, which torch refuses to wrap safely
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def hflip(image: torch.Tensor, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror an image and every box field of its target (``boxes`` and ``ignore`` regions)
    with torchvision's transforms.v2 on tv_tensors, as the pre-training views do."""
    h, w = image.shape[-2:]
    out = dict(target)
    for name in ("boxes", "ignore"):
        if name in target:
            boxes = tv_tensors.BoundingBoxes(target[name].reshape(-1, 4), format="XYXY", canvas_size=(h, w))
            out[name] = F.horizontal_flip(boxes).as_subclass(torch.Tensor)
    return F.horizontal_flip(image), out


class PersonSearchDataset(torch.utils.data.Dataset):
    """Map-style training set over (relabelled) person-search records.

    An item is ``i`` or ``(i, epoch)`` (what :class:`EpochSampler` yields): the
    flip is drawn from a generator seeded by ``(seed, epoch, i)``, not from a
    shared RNG stream, so it is the same whichever process loads the item and
    however many items were loaded before -- what makes ``--resume`` exact."""

    def __init__(self, records: list[Record], flip_prob: float = 0.0, seed: int = 0) -> None:
        self.records = records
        self.flip_prob = flip_prob
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: int | tuple[int, int]):
        i, epoch = item if isinstance(item, tuple) else (item, 0)
        r = self.records[i]
        image = read_image(r.image)
        target = {"boxes": torch.as_tensor(r.boxes, dtype=torch.float32).reshape(-1, 4),
                  "pids": torch.as_tensor(r.ids, dtype=torch.int64)}
        if r.ignore:
            target["ignore"] = torch.as_tensor(r.ignore, dtype=torch.float32).reshape(-1, 4)
        if self.flip_prob > 0:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, i))
            if torch.rand((), generator=g) < self.flip_prob:
                image, target = hflip(image, target)
        return image, target, r.key


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, as ``(index, epoch)`` items; ``skip``
    leaves out the first items of the epoch (a resumed run's position).

    The order is a function of ``(seed, epoch)`` only, so a run resumed at step
    ``s`` sees exactly the batches an uninterrupted run saw after step ``s``."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch, self.skip = 0, 0

    def position(self, epoch: int, skip: int = 0) -> None:
        # not called set_epoch: accelerate's loader calls a sampler's set_epoch with its own counter
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(_mix(self.seed, self.epoch)))
        for i in order.tolist()[self.skip:]:
            yield (i, self.epoch)

    def __len__(self) -> int:
        return max(0, self.n - self.skip)


def _mix(*values: int) -> int:
    """A generator seed from several integers (distinct tuples -> distinct seeds)."""
    h = 0
    for v in values:
        h = (h * 1_000_003 + int(v) + 1) % (1 << 61)
    return h


class ImageListDataset(torch.utils.data.Dataset):
    """(image, key) for a list of (key, ImageRef) -- gallery or query frames."""

    def __init__(self, items: list[tuple[str, ImageRef]]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, ref = self.items[i]
        return read_image(ref), key


def collate(batch):
    """Lists, not stacked tensors: images differ in size (torchvision detection style)."""
    return tuple(list(col) for col in zip(*batch))
