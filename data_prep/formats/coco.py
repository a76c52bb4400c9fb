"""Your own person-detection data in COCO format (instances JSON + images).

For pre-training on data of your own: any tool that exports "COCO
instances" (CVAT, Label Studio, labelme2coco, the MS-COCO release itself)
produces this.  Accepted layout (``root`` is the dataset folder)::

    root/
      annotations/instances_<split>.json     or instances_<split>*.json (e.g.
                                             instances_train2017.json), or <split>.json
      <split>/...  <split>2017/...  images/<split>/...  images/...  or root itself
                                             (where ``file_name`` is looked up, in that order)

``--format-option coco:annotation=PATH`` and ``coco:images=DIR`` (relative to
``root`` or absolute) name them when they are elsewhere.

What is read:

* the category whose ``name`` is ``person`` (any id; case-insensitive;
  ``category=pedestrian`` or a comma list picks others).  A file without
  such a category is an error; annotations of every other category are
  ignored (not counted);
* per person annotation, ``bbox`` ``[x, y, w, h]`` -> xyxy, clipped to the
  image (``Fix("box_clipped")``); ``w``/``h`` <= 0 or nothing left after
  clipping -> ``Skip("degenerate_box")``; not four numbers ->
  ``Skip("malformed_annotation")``; NaN/inf coordinates reach the builder's
  shared record check (``non_finite_box``);
* ``iscrowd: 1`` (and a CityPersons-style ``ignore: 1``) -> an ignore region,
  not a person;
* width and height come from the image header; an image whose header
  disagrees with the JSON's ``width``/``height`` is skipped
  (``malformed_annotation``): its boxes were drawn on another size;
* an image with no usable person -> ``Skip("no_person")``.

Boxes keep the order of their annotation ids.  Record keys are ``file_name`` without its suffix, through
:func:`~data_prep.record.safe_key` (``a/b.jpg`` -> ``a_b``); records come
sorted by key.  Every person is its own identity (detection data: the builder
gives each box a fresh pseudo id).  A damaged JSON file (not JSON, wrong
top-level types) is an error naming the file; a damaged entry costs that
entry (``malformed_annotation``).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path, PurePosixPath
from typing import Iterator

from ..imageio import ImageError, header_size
from ..record import MAX_COORD, ImageRef, ParseItem, Record, Skip, fit_box, safe_key

NAME = "coco"
ORDER = 100          # position in listings (hybridps.registry)
TASK = "det"
LABELED = False
SPLITS = ("train", "val")
# val stays out of pre-training by default (like CrowdHuman's), for sanity checks.
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = (
    "COCO-format data: the terms are those of your images and annotations (MS-COCO itself: "
    "annotations CC BY 4.0, images under their Flickr licences); images show identifiable "
    "people - treat as personal data and do not publish the shards."
)

ANNOTATION_DIR = "annotations"
DEFAULT_CATEGORY = "person"


# --------------------------------------------------------------------------- files
def _under(root: Path, value) -> Path:
    p = Path(str(value)).expanduser()
    return p if p.is_absolute() else root / p


def find_annotation(root: Path, split: str, annotation=None) -> Path:
    """The instances JSON of ``split`` (see the module docstring for the names tried)."""
    if annotation is not None:
        path = _under(root, annotation)
        if not path.is_file():
            raise FileNotFoundError(f"coco: annotation={annotation}: no such file {path}")
        return path
    ann = root / ANNOTATION_DIR
    exact = [ann / f"instances_{split}.json", ann / f"{split}.json"]
    for path in exact:
        if path.is_file():
            return path
    loose = sorted(ann.glob(f"instances_{split}*.json")) if ann.is_dir() else []
    if len(loose) == 1:
        return loose[0]
    if len(loose) > 1:
        raise FileNotFoundError(f"coco: several {split} annotation files in {ann}: "
                                f"{', '.join(p.name for p in loose)}; pick one with --format-option coco:annotation=PATH")
    raise FileNotFoundError(f"coco: no {split} annotations: expected {ANNOTATION_DIR}/instances_{split}.json "
                            f"(or instances_{split}*.json, {split}.json) in {root}, or --format-option coco:annotation=PATH")


def image_dirs(root: Path, split: str, ann_path: Path, images=None) -> list[Path]:
    """Folders ``file_name`` is looked up in, first match wins."""
    if images is not None:
        folder = _under(root, images)
        if not folder.is_dir():
            raise FileNotFoundError(f"coco: images={images}: no such directory {folder}")
        return [folder]
    stem = ann_path.stem[len("instances_"):] if ann_path.stem.startswith("instances_") else ann_path.stem
    out = []
    for folder in (root / split, root / stem, root / "images" / split, root / "images" / stem, root / "images", root):
        if folder.is_dir() and folder not in out:
            out.append(folder)
    return out


def load_json(path: Path) -> dict:
    """The instances file, checked at the top level; a clear ValueError otherwise."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"coco: {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise ValueError(f"coco: {path} nests too deep to be an instances file") from None
    except OSError as e:
        raise ValueError(f"coco: cannot read {path}: {e.strerror or e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"coco: {path} holds a JSON {type(data).__name__}, expected an object with "
                         "'images', 'annotations' and 'categories'")
    for field in ("images", "annotations", "categories"):
        if not isinstance(data.get(field), list):
            raise ValueError(f"coco: {path}: {field!r} must be a list, got "
                             f"{type(data.get(field)).__name__ if field in data else 'nothing'}")
    return data


def person_category_ids(categories: list, names, path: Path) -> set:
    wanted = {str(n).strip().lower() for n in (names if isinstance(names, (list, tuple)) else [names])}
    ids = {c["id"] for c in categories
           if isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"].strip().lower() in wanted
           and isinstance(c.get("id"), (int, str)) and not isinstance(c.get("id"), bool)}
    if not ids:
        known = sorted({str(c.get("name")) for c in categories if isinstance(c, dict)})
        raise ValueError(f"coco: {path} has no category named {' or '.join(sorted(wanted))} "
                         f"(categories: {', '.join(known[:12]) or 'none'}{' ...' if len(known) > 12 else ''}); "
                         "pick one with --format-option coco:category=NAME")
    return ids


# --------------------------------------------------------------------------- entries
def _xywh_to_xyxy(raw) -> list[float] | None:
    """``[x, y, w, h]`` -> xyxy floats; None when the value is not 4 numbers."""
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
        return None
    try:
        x, y, w, h = (float(v) for v in raw)
    except OverflowError:                 # an integer literal beyond float range
        return [math.inf] * 4
    return [x, y, x + w, y + h]


def _flag(value) -> bool | None:
    """``iscrowd`` / ``ignore``: absent, 0/1 or a bool; None for anything else."""
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return None


def _safe_file_name(value) -> str | None:
    """A relative path inside the image folder, or None (absolute, '..', not a string)."""
    if not isinstance(value, str) or not value.strip():
        return None
    p = PurePosixPath(value.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or not p.parts:
        return None
    return p.as_posix()


class _Image:
    __slots__ = ("id", "file_name", "width", "height", "source", "persons", "ignore", "notes")

    def __init__(self, image_id, file_name: str, width, height, source: str):
        self.id, self.file_name, self.source = image_id, file_name, source
        self.width, self.height = width, height
        self.persons: list[tuple[tuple, list[float], str]] = []     # (order, xyxy, where)
        self.ignore: list[tuple[tuple, list[float], str]] = []
        self.notes: list[ParseItem] = []


def _images(entries: list, split: str, jname: str) -> tuple[dict, list[Skip]]:
    images: dict = {}
    skips: list[Skip] = []
    for i, e in enumerate(entries):
        where = f"{jname}:images[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("id"), (int, str)) or isinstance(e.get("id"), bool):
            skips.append(Skip(NAME, split, "malformed_annotation", where, "not an object with an integer/string 'id'"))
            continue
        name = _safe_file_name(e.get("file_name"))
        if name is None:
            skips.append(Skip(NAME, split, "malformed_annotation", where,
                              f"file_name {str(e.get('file_name'))[:80]!r} is not a relative path inside the image folder"))
            continue
        if e["id"] in images:
            skips.append(Skip(NAME, split, "malformed_annotation", where, f"image id {e['id']!r} listed twice"))
            continue
        w, h = e.get("width"), e.get("height")
        images[e["id"]] = _Image(e["id"], name, w, h, where)
    return images, skips


def _annotations(entries: list, images: dict, person_ids: set, split: str, jname: str) -> list[Skip]:
    """Sort person annotations onto their images; skips for the broken ones."""
    skips: list[Skip] = []
    for j, a in enumerate(entries):
        where = f"{jname}:annotations[{j}]"
        if not isinstance(a, dict):
            skips.append(Skip(NAME, split, "malformed_annotation", where, "not an object"))
            continue
        cat = a.get("category_id")
        if isinstance(cat, bool) or not isinstance(cat, (int, str)):
            skips.append(Skip(NAME, split, "malformed_annotation", where, f"category_id {str(cat)[:40]!r}"))
            continue
        if cat not in person_ids:
            continue                      # another class: not ours, not a fault
        img = images.get(a.get("image_id")) if isinstance(a.get("image_id"), (int, str)) else None
        if img is None:
            skips.append(Skip(NAME, split, "malformed_annotation", where,
                              f"image_id {str(a.get('image_id'))[:40]!r} is not in 'images'"))
            continue
        crowd, ignore = _flag(a.get("iscrowd")), _flag(a.get("ignore"))
        box = _xywh_to_xyxy(a.get("bbox"))
        if box is None or crowd is None or ignore is None:
            what = f"bbox {str(a.get('bbox'))[:80]}" if box is None else "iscrowd/ignore not 0 or 1"
            img.notes.append(Skip(NAME, split, "malformed_annotation", where, what))
            continue
        (img.ignore if crowd or ignore else img.persons).append((_ann_order(a.get("id"), j), box, where))
    return skips


def _ann_order(ann_id, position: int) -> tuple:
    """Boxes are ordered by annotation id (file order when ids are not integers), so
    re-saving the JSON with its annotations shuffled changes nothing."""
    return (0, ann_id, position) if isinstance(ann_id, int) and not isinstance(ann_id, bool) else (1, 0, position)


def _fit(boxes, width: int, height: int, split: str) -> tuple[list[list[float]], list[ParseItem]]:
    kept: list[list[float]] = []
    notes: list[ParseItem] = []
    for _, box, where in sorted(boxes, key=lambda b: b[0]):
        if not all(abs(v) <= MAX_COORD for v in box):     # NaN, inf or absurd: False for all of them
            kept.append(box)              # the builder's one record check drops it as non_finite_box
            continue
        if box[2] <= box[0] or box[3] <= box[1]:
            notes.append(Skip(NAME, split, "degenerate_box", where, f"w or h <= 0: {box}"))
            continue
        clipped, box_notes = fit_box(box, width, height, NAME, split, where)
        notes += box_notes
        if clipped is not None:
            kept.append(clipped)
    return kept, notes


def _record_items(img: _Image, key: str, dirs: list[Path], root: Path, split: str) -> Iterator[ParseItem]:
    yield from img.notes
    path = next((d / img.file_name for d in dirs if os.path.isfile(d / img.file_name)), None)
    if path is None:
        yield Skip(NAME, split, "missing_file", img.source, f"{img.file_name} not found in "
                   f"{', '.join(str(d) for d in dirs) or 'any image folder'}")
        return
    source = os.path.relpath(path, root)
    try:
        width, height = header_size(path)
    except ImageError as e:
        yield Skip(NAME, split, e.reason, source, str(e))
        return
    said = (img.width, img.height)
    if all(isinstance(v, int) and not isinstance(v, bool) for v in said) and said != (width, height):
        yield Skip(NAME, split, "malformed_annotation", source,
                   f"the image is {width}x{height} but the annotation says {said[0]}x{said[1]}")
        return
    persons, notes = _fit(img.persons, width, height, split)
    ignore, ignore_notes = _fit(img.ignore, width, height, split)
    yield from notes
    yield from ignore_notes
    if not persons:
        yield Skip(NAME, split, "no_person", source, "no usable person box")
        return
    yield Record(
        dataset=NAME, split=split, key=key, image=ImageRef("file", str(path)), task=TASK, labeled=False,
        boxes=persons, ids=[-1] * len(persons), ignore=ignore, width=width, height=height, source=source,
        extra={"image_id": img.id},
    )


def parse(root, split: str, annotation=None, images=None, category=DEFAULT_CATEGORY) -> Iterator[ParseItem]:
    """Yield one :class:`Record` per image with a usable person, sorted by key.

    ``annotation`` / ``images``: the instances JSON and the image folder when
    they are not where the module docstring looks; ``category``: the class
    name(s) that are persons."""
    if split not in SPLITS:
        raise ValueError(f"coco: unknown split {split!r}; known: {', '.join(SPLITS)}")
    root = Path(root)
    ann_path = find_annotation(root, split, annotation)
    dirs = image_dirs(root, split, ann_path, images)
    data = load_json(ann_path)
    jname = ann_path.name
    person_ids = person_category_ids(data["categories"], category, ann_path)
    by_id, skips = _images(data["images"], split, jname)
    skips += _annotations(data["annotations"], by_id, person_ids, split, jname)
    yield from skips
    by_key: dict[str, _Image] = {}
    for img in by_id.values():
        key = safe_key(str(PurePosixPath(img.file_name).with_suffix("")))
        if key in by_key:
            yield Skip(NAME, split, "duplicate_key", img.source, f"{img.file_name} -> key {key!r} already used")
            continue
        by_key[key] = img
    for key in sorted(by_key):
        yield from _record_items(by_key[key], key, dirs, root, split)
