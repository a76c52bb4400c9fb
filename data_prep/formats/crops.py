"""Your own re-ID data as a folder of person crops.

For pre-training on crops of your own (a tracker's output, a re-ID set in
torchvision ``ImageFolder`` shape).  Two layouts, told apart by what ``root``
holds (``--format-option crops:labels=folders|none`` forces one)::

    root/                         labels=folders: one sub-folder per identity
      alice/0001.jpg ...          (images anywhere below it belong to it)
      0042/cam1/f000123.png ...
      unsorted.jpg                loose files here: unlabeled, each its own identity

    root/                         labels=none: every image its own identity
      000001.jpg 000002.jpg ...   (like LUPerson; sub-folders are searched too)

``labels=auto`` (default): ``folders`` when some sub-folder of ``root``
holds an image, else ``none``.  ``.jpg``/``.jpeg``/``.png`` files are read,
other files are ignored, and so are hidden files and folders (names starting
with ``.``: ``.ipynb_checkpoints``, ``.DS_Store``).

One record per crop, box = the whole crop.  With folders, ``Record.ids`` is
the position of the identity folder's name in sorted order (0, 1, ...; the
name is in ``Record.extra["identity"]``) and the records are labeled; loose
files and every image under ``labels=none`` are unlabeled records with id -1,
so the builder gives each its own pseudo identity.  Keys are the path below ``root`` without the
suffix through :func:`~data_prep.record.safe_key` (``alice/0001.jpg`` ->
``alice_0001``); two files mapping to one key (``a.jpg`` and ``a.png``) keep
the first, the other is ``Skip("duplicate_key")``.  Unreadable or broken
images are counted skips (``corrupt_image``, ``unreadable_file``, ...).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

from ..imageio import ImageError, header_size
from ..record import ImageRef, ParseItem, Record, Skip, safe_key

NAME = "crops"
ORDER = 110          # position in listings (hybridps.registry)
TASK = "reid"
# Identity folders are labels; a flat folder is not (its records say so, and
# the manifest's ``labeled`` follows the records, as for LUPerson-NL pids).
LABELED = True
SPLITS = ("train",)
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = (
    "crops folder: the terms are those of your own images; person crops show identifiable "
    "people - treat as personal data and do not publish the shards."
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LABEL_MODES = ("auto", "folders", "none")


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _images_below(folder: Path) -> list[str]:
    """Image paths below ``folder``, relative to it (posix), sorted; hidden entries skipped."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        rel = Path(dirpath).relative_to(folder)
        out += [(rel / f).as_posix() for f in filenames if _is_image(f)]
    return sorted(out)


def scan(root) -> tuple[list[str], dict[str, list[str]]]:
    """``(loose images, {sub-folder: its images})`` of ``root``; sub-folders
    without images are left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"crops: {root} is not a directory")
    loose, folders = [], {}
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if _hidden(entry.name):
            continue
        if entry.is_dir():
            found = _images_below(Path(entry.path))
            if found:
                folders[entry.name] = [f"{entry.name}/{f}" for f in found]
        elif entry.is_file() and _is_image(entry.name):
            loose.append(entry.name)
    return loose, folders


def resolve_labels(labels, folders: dict) -> str:
    if labels is None or labels is False:      # the CLI reads "labels=none" / "false" as None / False
        labels = "none"
    if labels not in LABEL_MODES:
        raise ValueError(f"crops: labels must be one of {', '.join(LABEL_MODES)}, got {labels!r}")
    if labels == "auto":
        return "folders" if folders else "none"
    return labels


def _crop_item(root: Path, rel: str, key: str, split: str, pid: int, identity: str | None,
               labeled: bool) -> ParseItem:
    path = root / rel
    try:
        width, height = header_size(path)
    except ImageError as e:
        return Skip(NAME, split, e.reason, rel, str(e))
    return Record(
        dataset=NAME, split=split, key=key, image=ImageRef("file", str(path)), task=TASK, labeled=labeled,
        boxes=[[0.0, 0.0, float(width), float(height)]], ids=[pid], width=width, height=height, source=rel,
        extra={"identity": identity} if identity is not None else {},
    )


def parse(root, split: str = "train", labels: str = "auto") -> Iterator[ParseItem]:
    """Yield one whole-crop :class:`Record` per image, sorted by key.

    ``labels``: ``auto`` | ``folders`` (sub-folder = identity) | ``none``
    (every image its own identity)."""
    if split not in SPLITS:
        raise ValueError(f"crops: unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    loose, folders = scan(root)
    if not loose and not folders:
        raise FileNotFoundError(f"crops: no {'/'.join(IMAGE_SUFFIXES)} images in {root} or its sub-folders")
    mode = resolve_labels(labels, folders)
    entries: list[tuple[str, int, str | None]] = []        # (relative path, local id, identity name)
    if mode == "folders":
        entries += [(rel, -1, None) for rel in loose]
        for pid, name in enumerate(sorted(folders)):
            entries += [(rel, pid, name) for rel in folders[name]]
    else:
        entries += [(rel, -1, None) for rel in loose]
        entries += [(rel, -1, None) for name in sorted(folders) for rel in folders[name]]
    by_key: dict[str, tuple[str, int, str | None]] = {}
    for rel, pid, name in sorted(entries):
        key = safe_key(os.path.splitext(rel)[0])
        if key in by_key:
            yield Skip(NAME, split, "duplicate_key", rel, f"key {key!r} already used by {by_key[key][0]}")
            continue
        by_key[key] = (rel, pid, name)
    for key in sorted(by_key):
        rel, pid, name = by_key[key]
        # a loose crop is unlabeled even beside identity folders: it joins L_con like any unlabeled sample
        yield _crop_item(root, rel, key, split, pid, name, labeled=pid >= 0)
