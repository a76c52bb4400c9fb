"""Market-1501 (Zheng et al. ICCV 2015), labelled re-ID crops, release layout.

Accepted layouts (``root`` is either)::

    market1501/Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query}/
    market1501/{bounding_box_train,bounding_box_test,query}/   (folders directly)

File names look like ``0002_c1s1_000451_03.jpg``: pid, camera ``c1``..``c6``,
sequence, frame, DPM box index.  Only ``*.jpg`` is globbed: the release
folders contain ``Thumbs.db``.  pid ``-1`` (junk detections) and ``0000``
(DPM false alarms, not people) are dropped from every split as
``Skip("junk_id")``: neither is a usable identity for pre-training.

Splits: ``train`` = bounding_box_train, ``query`` = query, ``gallery`` =
bounding_box_test.  ``Record.ids`` = the integer pid (train and test
identities are disjoint in Market), ``camera`` = 1..6 as in the name.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator


from ..imageio import ImageError, header_size
from ..record import ImageRef, ParseItem, Record, Skip, safe_key

NAME = "market1501"
ORDER = 60          # position in listings (hybridps.registry)
TASK = "reid"
LABELED = True
SPLITS = ("train", "query", "gallery")
# query/gallery are the standard test protocol; pre-training uses train only.
DEFAULT_SPLITS = ("train",)
# Market pids are global across its folders (train and test people are disjoint ids).
ID_SPACES = {"train": "pid", "query": "pid", "gallery": "pid"}
LICENSE_NOTICE = (
    "Market-1501: research use only (exact terms not retrieved); cite Zheng et al. "
    "ICCV 2015; images show identifiable people - treat as personal data and do not "
    "publish the shards."
)

RELEASE_DIR = "Market-1501-v15.09.15"
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# The regex torchreid and fast-reid use; '-' admits the junk pid -1.
NAME_RE = re.compile(r"^([-\d]+)_c(\d)")
JUNK_PIDS = (-1, 0)


def find_release(root: Path) -> Path:
    """The folder holding the split folders: the versioned release folder
    first, else ``root`` itself."""
    for candidate in (root / RELEASE_DIR, root):
        if any((candidate / d).is_dir() for d in SPLIT_DIRS.values()):
            return candidate
    raise FileNotFoundError(
        f"market1501: no Market-1501 release under {root}: expected {RELEASE_DIR}/ or the "
        f"folders {', '.join(SPLIT_DIRS.values())} directly under it"
    )


def parse_name(name: str) -> tuple[int, int] | None:
    """``(pid, camera)`` from a file name, None when it does not follow the scheme."""
    m = NAME_RE.match(name)
    if m is None:
        return None
    try:
        return int(m.group(1)), int(m.group(2))
    except ValueError:  # e.g. "--3"
        return None


def _crop_items(root: Path, path: Path, split: str) -> Iterator[ParseItem]:
    source = str(path.relative_to(root))
    parsed = parse_name(path.name)
    if parsed is None:
        yield Skip(NAME, split, "malformed_annotation", source, "name does not match <pid>_c<cam>")
        return
    pid, camera = parsed
    if pid in JUNK_PIDS:
        yield Skip(NAME, split, "junk_id", source, f"pid {pid}")
        return
    try:
        width, height = header_size(path)
    except ImageError as e:
        yield Skip(NAME, split, e.reason, source, str(e))
        return
    yield Record(
        dataset=NAME, split=split, key=safe_key(path.stem), image=ImageRef("file", str(path)),
        task=TASK, labeled=LABELED, boxes=[[0.0, 0.0, float(width), float(height)]], ids=[pid],
        width=width, height=height, camera=camera, source=source,
    )


def parse(root, split: str) -> Iterator[ParseItem]:
    """Yield one :class:`Record` per usable crop of ``split``, sorted by key."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"market1501: unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    split_dir = find_release(root) / SPLIT_DIRS[split]
    if not split_dir.is_dir():
        raise FileNotFoundError(f"market1501: split {split!r} needs the folder {split_dir}")
    # file names are unique within a folder, so stems (the keys) are too
    for path in sorted(split_dir.glob("*.jpg"), key=lambda p: safe_key(p.stem)):
        yield from _crop_items(root, path, split)
