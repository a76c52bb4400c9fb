"""The one record type every dataset parser yields.

A parser reads annotations only; pixels are fetched later through an
:class:`ImageRef`, so enumerating a dataset is cheap and the expensive part
(reading and checking image bytes) can run in worker processes.  Everything
here is plain data and pickles cleanly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union

TASKS = ("det", "reid", "ps")

# Reasons a parser (or the builder) drops an input.  Parsers may add their
# own short snake_case reasons; these are the shared ones.
SKIP_REASONS = (
    "missing_file",          # annotation points at an image that is not there
    "corrupt_image",         # bytes that do not decode / truncated file
    "malformed_annotation",  # a line or record that cannot be parsed
    "degenerate_box",        # zero/negative width or height (after clipping)
    "no_person",             # image with no usable person box
    "unknown_class",         # an object class the dataset format does not define
    "junk_id",               # re-ID junk / distractor ids (Market -1 and 0000)
    "empty_cell",            # CUHK03 empty MATLAB cell
    "non_finite_box",        # NaN/inf or absurd (|coord| > MAX_COORD) coordinate
    "too_large_image",       # header says more pixels than --max-pixels (decompression bomb)
    "unreadable_file",       # there, but cannot be read (permission denied, I/O error)
)

# No image a build accepts is anywhere near this wide; a coordinate beyond it
# is a unit error or a hostile file, and would overflow float32 arithmetic later.
MAX_COORD = 1e6


@dataclass(frozen=True)
class ImageRef:
    """Where the encoded (or raw) pixels of a record live.

    kind:
      * ``file``  -- ``path`` is an image file (JPEG/PNG) on disk.
      * ``lmdb``  -- ``path`` is an LMDB directory, ``key`` the ASCII key whose
        value is the encoded image file bytes.
      * ``hdf5``  -- ``path`` is a MATLAB v7.3 (HDF5) file, ``key`` the HDF5
        object path of a uint8 (3, W, H) dataset (MATLAB column-major RGB).
    """

    kind: str
    path: str
    key: str = ""


@dataclass
class Record:
    """One image (scene or re-ID crop) with its persons.

    Boxes are ``[x1, y1, x2, y2]`` floats in pixels, already clipped to the
    image.  ``ids`` holds one identity per box in the dataset's *own* label
    space (``>= 0``), or ``-1`` for "no identity" (detection persons, unlabeled
    person-search boxes, unlabeled re-ID images).  The shard builder maps these
    to the global identity space (see ``data_prep.identity``).
    """

    dataset: str
    split: str
    key: str                       # unique within (dataset, split); no '.' or '/'
    image: ImageRef
    task: str                      # "det" | "reid" | "ps"
    labeled: bool                  # True when ids are real identity labels
    boxes: list[list[float]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    ignore: list[list[float]] = field(default_factory=list)
    width: int | None = None       # None: the builder reads it from the image
    height: int | None = None
    camera: int | None = None
    source: str = ""               # path relative to the dataset root, for humans
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if len(self.boxes) != len(self.ids):
            raise ValueError(
                f"{self.dataset}/{self.key}: {len(self.boxes)} boxes but {len(self.ids)} ids"
            )
        if "." in self.key or "/" in self.key:
            raise ValueError(f"record key {self.key!r} must not contain '.' or '/'")


@dataclass(frozen=True)
class Skip:
    """An input a parser (or the builder) could not use, with the reason."""

    dataset: str
    split: str
    reason: str
    source: str
    detail: str = ""


@dataclass(frozen=True)
class Fix:
    """A repair applied to an otherwise usable input (e.g. a box clipped to
    the frame).  Counted in the manifest, never fatal, not affected by
    ``--strict``."""

    dataset: str
    split: str
    reason: str
    source: str


ParseItem = Union[Record, Skip, Fix]


def safe_key(text: str) -> str:
    """Make a webdataset-safe key fragment: keep [A-Za-z0-9_-], map ',' and
    everything else to '_'.  CrowdHuman IDs contain commas."""
    return "".join(c if (c.isalnum() or c in "_-") else "_" for c in text)


def clip_box(box, width: int, height: int) -> list[float]:
    """Clip an xyxy box to the image ``[0, W] x [0, H]``.

    A NaN, inf or absurd (> MAX_COORD) coordinate is not clipped into a
    plausible box at the border: the result is all NaN, which the builder's
    record check (:func:`check_record`) drops as ``non_finite_box``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(abs(v) <= MAX_COORD for v in (x1, y1, x2, y2)):     # False for NaN too
        return [float("nan")] * 4
    return [
        min(max(x1, 0.0), float(width)),
        min(max(y1, 0.0), float(height)),
        min(max(x2, 0.0), float(width)),
        min(max(y2, 0.0), float(height)),
    ]


def box_is_degenerate(box, min_size: float = 1.0) -> bool:
    return (box[2] - box[0]) < min_size or (box[3] - box[1]) < min_size


def fit_box(box, width: int, height: int, dataset: str, split: str, source: str,
            detail: str = "") -> tuple[list[float] | None, list[Fix | Skip]]:
    """Clip an xyxy box to the image.  Returns the clipped box (None when
    nothing usable is left) and the notes to yield: ``Fix("box_clipped")``
    when clipping changed it, ``Skip("degenerate_box")`` when it vanished."""
    clipped = clip_box(box, width, height)
    notes: list[Fix | Skip] = []
    if clipped != [float(v) for v in box]:
        notes.append(Fix(dataset, split, "box_clipped", source))
    if box_is_degenerate(clipped):
        notes.append(Skip(dataset, split, "degenerate_box", source, detail or f"outside the image: {list(box)}"))
        return None, notes
    return clipped, notes


def _box_problem(box) -> str | None:
    """``None`` for a usable xyxy box, else the skip reason."""
    import math
    import numbers

    if isinstance(box, (str, bytes, dict)):
        return "malformed_annotation"
    try:
        vals = list(box)        # lists, tuples and numpy rows alike
    except TypeError:
        return "malformed_annotation"
    if len(vals) != 4 or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in vals):
        return "malformed_annotation"
    if not all(math.isfinite(v) and abs(v) <= MAX_COORD for v in vals):
        return "non_finite_box"
    return None


def check_record(rec: Record) -> list[tuple[str, str]]:
    """Drop boxes (with their ids) and ignore regions that no parser should have
    let through: wrong shape or type, NaN/inf, absurd coordinates.  One shared
    check in the builder, so a parser's gap never reaches the shards.  Returns
    ``(reason, detail)`` per dropped box; ``rec`` is changed in place."""
    import numbers

    dropped: list[tuple[str, str]] = []
    keep = []
    for i, (box, pid) in enumerate(zip(rec.boxes, rec.ids)):
        why = _box_problem(box)
        if why is None and (not isinstance(pid, numbers.Integral) or isinstance(pid, bool) or pid < -1):
            why = "malformed_annotation"
        if why:
            dropped.append((why, f"box {i} {box!r:.80} id {pid!r:.20}"))
        else:
            keep.append(i)
    if len(keep) != len(rec.boxes):
        rec.boxes = [rec.boxes[i] for i in keep]
        rec.ids = [rec.ids[i] for i in keep]
    bad_ignore = [b for b in rec.ignore if _box_problem(b)]
    if bad_ignore:
        rec.ignore = [b for b in rec.ignore if not _box_problem(b)]
        dropped += [(_box_problem(b), f"ignore region {b!r:.80}") for b in bad_ignore]
    for name in ("width", "height"):
        v = getattr(rec, name)
        if v is not None and (not isinstance(v, numbers.Integral) or isinstance(v, bool) or not 0 < v <= MAX_COORD):
            setattr(rec, name, None)      # the builder reads the real size from the image
    return dropped
