"""EuroCity Persons (Braun et al. 2019), pedestrian detection, release layout.

Accepted layout (``root`` is the ``ECP/`` folder, or a folder holding it)::

    ECP/
      day/img/{train,val}/<city>/<city>_<5 digits>.png      1920x1024 PNG
      day/labels/{train,val}/<city>/<city>_<5 digits>.json  one frame JSON per image
      night/img/...   night/labels/...

Labels are paired with images by path (``labels`` -> ``img``, ``.json`` ->
``.png``); a label without its image is ``Skip("missing_file")``.  Record keys
are ``<time>_<city>_<stem>``.  The image size comes from the JSON
(``imagewidth``/``imageheight``), falling back to the PNG header.

Mapping of the nested objects (``children``, walked recursively):

* ``pedestrian``, ``rider`` -> person, with the object's own box (a rider's
  vehicle child is never a person); tagged ``sitting-lying`` /
  ``behind-glass`` (``ignore_tags``, as in the official evaluation) or
  ``depiction`` -> ignore region instead;
* ``person-group-far-away``, ``rider+vehicle-group-far-away`` -> ignore
  region, unless tagged ``depiction`` (posters): then dropped
  (``Skip("depiction")``);
* vehicles and vehicle groups -> not persons, silently passed over;
* any other identity -> ``Skip("unknown_class")`` for that object only.

Orientation (``orient``, also spelled ``Orient``; riders take their vehicle's,
as the devkit does) is kept per person box in ``Record.extra["orient"]``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

from PIL import Image

from ..record import Fix, ImageRef, ParseItem, Record, Skip, box_is_degenerate, clip_box, safe_key

NAME = "ecp"
ORDER = 20          # position in listings (hybridps.registry)
TASK = "det"
LABELED = False
SPLITS = ("train", "val")          # test labels are not public
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = (
    "EuroCity Persons: TU Delft 'EuroCity Persons Dataset Research Use License' - "
    "qualified academic users, research only, no redistribution of data or derivatives "
    "containing sensor/personal data, GDPR applies, expires after 3 years; do not publish the shards."
)

TIMES = ("day", "night")
PERSON_CLASSES = ("pedestrian", "rider")
IGNORE_GROUPS = ("person-group-far-away", "rider+vehicle-group-far-away")
VEHICLES = ("bicycle", "buggy", "motorbike", "scooter", "tricycle", "wheelchair")
NON_PERSON_CLASSES = VEHICLES + tuple(f"{v}-group" for v in VEHICLES)
DEFAULT_IGNORE_TAGS = ("sitting-lying", "behind-glass")
DEPICTION = "depiction"


def resolve_root(root) -> Path:
    """The ``ECP/`` folder: ``root`` itself, or ``root/ECP``."""
    root = Path(root)
    if any((root / t).is_dir() for t in TIMES):
        return root
    if (root / "ECP").is_dir():
        return root / "ECP"
    raise FileNotFoundError(
        f"ecp: expected {root}/day/ or {root}/night/ (ECP/<time>/{{img,labels}}/<split>/<city>/)"
    )


def unwrap_frame(doc) -> dict:
    """The ``frame`` object of a label file, accepting the devkit's wrapped forms."""
    if isinstance(doc, dict) and "@converter" in doc:
        doc = doc["children"][0]["children"][0]
    elif isinstance(doc, dict) and doc.get("identity") == "seqlist":
        doc = doc["children"]["children"]
    if not isinstance(doc, dict) or doc.get("identity") != "frame":
        raise ValueError("top-level object is not a 'frame'")
    if not isinstance(doc.get("children", []), list):
        raise ValueError("'children' is not a list")
    return doc


def orientation(obj: dict):
    """``orient`` in degrees (either spelling); riders use their vehicle's."""
    if obj.get("identity") == "rider":
        for child in obj.get("children") or []:
            if isinstance(child, dict) and child.get("identity") in VEHICLES:
                value = _degrees(child)
                if value is not None:
                    return value
    return _degrees(obj)


def _degrees(obj: dict) -> float | None:
    value = obj.get("orient", obj.get("Orient"))
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


class _FrameBoxes:
    """Collects persons / ignore regions / notes of one frame."""

    def __init__(self, split: str, width: int, height: int, ignore_tags, person_classes):
        self.split, self.width, self.height = split, width, height
        self.ignore_tags = frozenset(ignore_tags) | {DEPICTION}
        self.person_classes = tuple(person_classes)
        self.persons: list[list[float]] = []
        self.orients: list[float | None] = []
        self.ignore: list[list[float]] = []
        self.notes: list[ParseItem] = []

    def walk(self, children, where: str) -> None:
        for i, obj in enumerate(children):
            here = f"{where}/{i}"
            if not isinstance(obj, dict):
                self.notes.append(Skip(NAME, self.split, "malformed_annotation", here, "object is not a dict"))
                continue
            try:
                self._visit(obj, here)
            except (TypeError, ValueError, AttributeError) as e:
                # a wrong JSON type in one object (a list as identity, a dict as orient) costs that object
                self.notes.append(Skip(NAME, self.split, "malformed_annotation", here, f"{type(e).__name__}: {e}"))
            sub = obj.get("children") or []
            if isinstance(sub, list):
                self.walk(sub, here)

    def _visit(self, obj: dict, where: str) -> None:
        identity = obj.get("identity")
        if not isinstance(identity, str):
            raise TypeError(f"identity is a {type(identity).__name__}, not a string")
        tags = obj.get("tags") or []
        tags = {t for t in tags if isinstance(t, str)} if isinstance(tags, list) else set()
        if identity in self.person_classes:
            if tags & self.ignore_tags:
                self._add(obj, where, self.ignore)
            elif self._add(obj, where, self.persons):
                self.orients.append(orientation(obj))
        elif identity in IGNORE_GROUPS:
            if DEPICTION in tags:
                self.notes.append(Skip(NAME, self.split, "depiction", where, identity))
            else:
                self._add(obj, where, self.ignore)
        elif identity not in NON_PERSON_CLASSES:
            self.notes.append(Skip(NAME, self.split, "unknown_class", where, repr(identity)))

    def _add(self, obj: dict, where: str, target: list) -> bool:
        try:
            box = [float(obj[k]) for k in ("x0", "y0", "x1", "y1")]
        except (KeyError, TypeError, ValueError):
            self.notes.append(Skip(NAME, self.split, "malformed_annotation", where, "missing/bad x0,y0,x1,y1"))
            return False
        clipped = clip_box(box, self.width, self.height)
        if box[2] < box[0] or box[3] < box[1] or box_is_degenerate(clipped):
            self.notes.append(Skip(NAME, self.split, "degenerate_box", where, repr(box)))
            return False
        if clipped != box:
            self.notes.append(Fix(NAME, self.split, "box_clipped", where))
        target.append(clipped)
        return True


def _label_files(root: Path, split: str, times: Sequence[str]) -> list[tuple[str, str, Path, Path]]:
    """``(key, time, label path, image path)`` for every label JSON, sorted by key."""
    found = []
    for time in times:
        labels_dir = root / time / "labels" / split
        if not labels_dir.is_dir():
            continue
        for label in labels_dir.rglob("*.json"):
            rel = label.relative_to(labels_dir).with_suffix("")
            image = root / time / "img" / split / rel.with_suffix(".png")
            found.append((safe_key("_".join((time, *rel.parts))), time, label, image))
    if not found:
        raise FileNotFoundError(
            f"ecp: no label files for split {split!r} in {root}: expected "
            f"<{'|'.join(times)}>/labels/{split}/<city>/<city>_NNNNN.json"
        )
    return sorted(found, key=lambda t: t[0])


def _frame_size(frame: dict, image: Path) -> tuple[int, int]:
    try:
        w, h = int(frame["imagewidth"]), int(frame["imageheight"])
        if w > 0 and h > 0:
            return w, h
    except (KeyError, TypeError, ValueError):
        pass
    with Image.open(image) as im:
        return int(im.width), int(im.height)


def parse(
    root,
    split: str,
    time: Sequence[str] | str = TIMES,
    ignore_tags: Sequence[str] = DEFAULT_IGNORE_TAGS,
    person_classes: Sequence[str] = PERSON_CLASSES,
) -> Iterator[ParseItem]:
    """Yield one :class:`Record` per labelled frame of ``split``, sorted by key.

    ``time``: which of ``day``/``night`` to read.  ``ignore_tags``: person
    tags that make the box an ignore region (pass ``()`` to keep sitting /
    behind-glass people as positives).  ``person_classes``: identities that
    are persons (e.g. add ``"co-rider"``)."""
    if split not in SPLITS:
        raise ValueError(f"ecp: unknown split {split!r}; known: {', '.join(SPLITS)}")
    times = (time,) if isinstance(time, str) else tuple(time)
    bad = [t for t in times if t not in TIMES]
    if bad or not times:
        raise ValueError(f"ecp: time must be a subset of {TIMES}, got {time!r}")
    root = resolve_root(root)
    for key, t, label, image in _label_files(root, split, times):
        yield from _frame_items(root, key, t, label, image, split, ignore_tags, person_classes)


def _frame_items(root, key, time, label, image, split, ignore_tags, person_classes) -> Iterator[ParseItem]:
    source = str(label.relative_to(root))
    if not image.is_file():
        yield Skip(NAME, split, "missing_file", source, f"no image {image.relative_to(root)}")
        return
    try:
        with open(label, encoding="utf-8") as f:
            frame = unwrap_frame(json.load(f))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError) as e:
        yield Skip(NAME, split, "malformed_annotation", source, f"{type(e).__name__}: {e}")
        return
    try:
        width, height = _frame_size(frame, image)
    except Exception as e:  # PIL raises several types for unreadable headers
        reason = getattr(e, "reason", None) or ("too_large_image" if type(e).__name__ == "DecompressionBombError"
                                                else "corrupt_image")
        yield Skip(NAME, split, reason, str(image.relative_to(root)), str(e))
        return
    boxes = _FrameBoxes(split, width, height, ignore_tags, person_classes)
    try:
        boxes.walk(frame.get("children", []), source)
    except RecursionError:
        yield Skip(NAME, split, "malformed_annotation", source, "children nested too deep")
        return
    yield from boxes.notes
    if not boxes.persons:
        yield Skip(NAME, split, "no_person", source, "no usable pedestrian/rider")
        return
    yield Record(
        dataset=NAME, split=split, key=key, image=ImageRef("file", str(image)), task=TASK,
        labeled=False, boxes=boxes.persons, ids=[-1] * len(boxes.persons), ignore=boxes.ignore,
        width=width, height=height, source=str(image.relative_to(root)),
        extra={"time": time, "city": label.parent.name, "orient": boxes.orients},
    )
