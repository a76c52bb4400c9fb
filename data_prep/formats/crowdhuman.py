"""CrowdHuman (Shao et al. 2018), pedestrian detection, in its release layout.

Accepted layout (``root`` is the folder holding the ``.odgt`` files)::

    CrowdHuman/
      annotation_train.odgt            JSON Lines, one image per line
      annotation_val.odgt
      Images/<ID>.jpg                  all zips extracted into one folder, or
      CrowdHuman_train01/Images/...    one folder per zip (train01..03, val)

Every ``Images/`` folder under ``root`` is indexed by file stem, so both
layouts (and mixes of them) work.  IDs look like ``273271,c9db000d5146c15``;
record keys are the IDs passed through :func:`~data_prep.record.safe_key`.

Per ``gtboxes`` entry (boxes are ``[x, y, w, h]`` integers):

* ``tag != "person"`` (``mask``: crowds, posters, reflections) or
  ``extra.ignore != 0`` -> ignore region (the mmdet / CrowdDet rule);
* ``head_attr.ignore`` concerns the head box only and is not looked at;
* the person box is ``fbox`` (amodal full body) by default, ``vbox``
  (visible part) with ``box="vbox"``;
* ``w < 0`` or ``h < 0`` -> ``Skip("degenerate_box")`` (CrowdDet drops them
  too); boxes leaving the image are clipped (``Fix("box_clipped")``) since
  the odgt has no image size, width/height come from the image header.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator


from ..imageio import ImageError, header_size
from ..textio import utf8_lines
from ..record import Fix, ImageRef, ParseItem, Record, Skip, box_is_degenerate, clip_box, safe_key

NAME = "crowdhuman"
ORDER = 10          # position in listings (hybridps.registry)
TASK = "det"
LABELED = False
SPLITS = ("train", "val")
# val is kept out of pre-training by default so it stays usable for sanity checks.
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = (
    "CrowdHuman: non-commercial research/education use only, images may not be "
    "redistributed (crowdhuman.org terms); cite Shao et al. 2018; images show "
    "identifiable people - treat as personal data and do not publish the shards."
)

ANNOTATION_FILES = {"train": "annotation_train.odgt", "val": "annotation_val.odgt"}
BOX_FIELDS = ("fbox", "vbox")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def index_images(root: Path) -> dict[str, Path]:
    """``{stem: path}`` over every ``Images/`` folder below ``root``.

    Folders are visited in sorted order and the first occurrence of a stem
    wins, so the index is deterministic when a stem appears twice (e.g. a
    merged ``Images/`` next to the per-zip folders it came from)."""
    index: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if os.path.basename(dirpath) != "Images":
            continue
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in IMAGE_SUFFIXES:
                index.setdefault(stem, Path(dirpath) / name)
    return index


def _xywh_to_xyxy(raw) -> list[float] | None:
    """``[x, y, w, h]`` -> xyxy floats; None when the value is not 4 numbers."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in raw)
    except (TypeError, ValueError):
        return None
    return [x, y, x + w, y + h]


def _is_ignore(gtbox: dict) -> bool:
    extra = gtbox.get("extra") or {}
    return gtbox.get("tag") != "person" or (isinstance(extra, dict) and extra.get("ignore", 0) != 0)


def _load_entries(ann_path: Path, split: str) -> Iterator[tuple[str, dict] | Skip]:
    """``(source, entry)`` per well-formed odgt line, a Skip for the others."""
    for lineno, line, why in utf8_lines(ann_path):
        source = f"{ann_path.name}:{lineno}"
        if line is None:
            yield Skip(NAME, split, "malformed_annotation", source, why)
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            yield Skip(NAME, split, "malformed_annotation", source, f"invalid JSON: {e}")
            continue
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("ID"), str)
            or not isinstance(entry.get("gtboxes", []), list)
        ):
            yield Skip(NAME, split, "malformed_annotation", source, "no string 'ID' or 'gtboxes' not a list")
            continue
        yield source, entry


def _boxes_of(entry: dict, box_field: str, width: int, height: int, split: str, source: str):
    """Split an entry's gtboxes into persons and ignore regions.

    Returns ``(persons, ignore, notes)`` where notes are the per-box Skips and
    Fixes to report before the record."""
    persons: list[list[float]] = []
    ignore: list[list[float]] = []
    notes: list[ParseItem] = []
    for i, gtbox in enumerate(entry.get("gtboxes", [])):
        where = f"{source}#{i}"
        if not isinstance(gtbox, dict):
            notes.append(Skip(NAME, split, "malformed_annotation", where, "gtbox is not an object"))
            continue
        is_ignore = _is_ignore(gtbox)
        # mask entries describe a region, their fbox/vbox are the same area
        raw = gtbox.get(box_field) if not is_ignore else gtbox.get(box_field, gtbox.get("fbox"))
        xyxy = _xywh_to_xyxy(raw)
        if xyxy is None:
            notes.append(Skip(NAME, split, "malformed_annotation", where, f"bad {box_field}: {raw!r}"))
            continue
        if xyxy[2] < xyxy[0] or xyxy[3] < xyxy[1]:
            notes.append(Skip(NAME, split, "degenerate_box", where, f"negative size {raw!r}"))
            continue
        clipped = clip_box(xyxy, width, height)
        if box_is_degenerate(clipped):
            notes.append(Skip(NAME, split, "degenerate_box", where, f"{raw!r} after clipping"))
            continue
        if clipped != xyxy:
            notes.append(Fix(NAME, split, "box_clipped", where))
        (ignore if is_ignore else persons).append(clipped)
    return persons, ignore, notes


def parse(root, split: str, box: str = "fbox") -> Iterator[ParseItem]:
    """Yield one :class:`Record` per annotated image of ``split``, sorted by key.

    ``box`` picks the person box: ``"fbox"`` (full body, default; the box the
    official evaluation uses) or ``"vbox"`` (visible body)."""
    if split not in ANNOTATION_FILES:
        raise ValueError(f"crowdhuman: unknown split {split!r}; known: {', '.join(SPLITS)}")
    if box not in BOX_FIELDS:
        raise ValueError(f"crowdhuman: box must be one of {BOX_FIELDS}, got {box!r}")
    root = Path(root)
    ann_path = root / ANNOTATION_FILES[split]
    if not ann_path.is_file():
        raise FileNotFoundError(
            f"crowdhuman: expected {ANNOTATION_FILES[split]} (JSON Lines) in {root}"
        )
    index = index_images(root)
    if not index:
        raise FileNotFoundError(
            f"crowdhuman: no images found in any Images/ folder under {root} "
            "(expected Images/<ID>.jpg or CrowdHuman_*/Images/<ID>.jpg)"
        )

    by_key: dict[str, tuple[str, dict]] = {}
    for item in _load_entries(ann_path, split):
        if isinstance(item, Skip):
            yield item
            continue
        source, entry = item
        key = safe_key(entry["ID"])
        if key in by_key:
            yield Skip(NAME, split, "duplicate_key", source, f"{entry['ID']!r} -> key {key!r} already used")
            continue
        by_key[key] = (source, entry)

    for key in sorted(by_key):
        source, entry = by_key[key]
        yield from _record_items(root, index, key, source, entry, box, split)


def _record_items(root: Path, index, key, source, entry, box, split) -> Iterator[ParseItem]:
    path = index.get(entry["ID"])
    if path is None:
        yield Skip(NAME, split, "missing_file", source, f"no Images/{entry['ID']}.jpg")
        return
    try:
        width, height = header_size(path)
    except ImageError as e:
        yield Skip(NAME, split, e.reason, str(path.relative_to(root)), str(e))
        return
    persons, ignore, notes = _boxes_of(entry, box, width, height, split, source)
    yield from notes
    if not persons:
        yield Skip(NAME, split, "no_person", source, f"{entry['ID']}: no usable person box")
        return
    yield Record(
        dataset=NAME, split=split, key=key, image=ImageRef("file", str(path)), task=TASK,
        labeled=False, boxes=persons, ids=[-1] * len(persons), ignore=ignore,
        width=width, height=height, source=str(path.relative_to(root)),
        extra={"ID": entry["ID"]},
    )
