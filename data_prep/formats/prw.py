"""PRW (PRW-v16.04.20) person-search release.

Layout (docs/datasets.md section 3)::

    root/frames/c<cam>s<seq>_<frame>.jpg
    root/annotations/<frame>.jpg.mat     one of box_new / anno_file / anno_previous:
                                         N x 5 float [pid, x, y, w, h]; pid -2 = unlabeled
    root/frame_train.mat                 img_index_train: cell of frame names (no .jpg)
    root/frame_test.mat                  img_index_test:  cell of frame names (no .jpg)
    root/ID_train.mat, ID_test.mat       training / test id lists (ID_test's variable
                                         is 'ID_test2' in the release)
    root/query_info.txt                  "pid x y w h frame" per line, CRLF endings

Records follow the frame_train / frame_test order (frame_test order is the
gallery order evaluators zip detections with).

Boxes: the standard loaders (SeqNet, NAE, COAT, AlignPS) clip the raw
(x, y, w, h) values to >= 0 *before* converting to xyxy, then truncate to
int32.  A box with negative x is therefore shifted right, not cropped.  We
keep that convention deliberately so that boxes (and so metrics) match the
published numbers; every shifted box is counted as ``Fix("box_shifted")``.
Boxes with w <= 0 or h <= 0 after that clipping are dropped
(``Skip("degenerate_box")``); boxes crossing the right/bottom border are
clipped to the frame (``Fix("box_clipped")``).

Identities: ``Record.ids`` is the raw PRW pid (1..933); the unlabeled -2
becomes -1.  The shard builder relabels the sorted distinct training pids to
a contiguous range, which gives **483** training identities -- the clean
convention of AlignPS and DPS.  NAE/SeqNet/COAT quote 482 (OIM LUT_SIZE=482)
because they train on raw pids with a "pid - 1" index: raw 483 and the
outlier 932 fall outside the LUT and silently go to the unlabeled queue
while row 478 (pid 479 does not exist) is never used.  That is a latent bug,
not a property of the data; load NAE/SeqNet PRW checkpoints with a 482-row
LUT, but train with 483.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import numpy as np

from ..protocol import GalleryImage, Protocol, Query
from ..imageio import header_size_or_reason
from ..record import Fix, ImageRef, ParseItem, Record, Skip, fit_box, safe_key

NAME = "prw"
ORDER = 80          # position in listings (hybridps.registry)
TASK = "ps"
LABELED = True
SPLITS = ("train", "test")
DEFAULT_SPLITS = ("train",)
# Raw PRW pids are global: some training ids also walk through test frames.
ID_SPACES = {"train": "pid", "test": "pid"}
LICENSE_NOTICE = "PRW: research use only; obtain it from the authors (Zheng et al., CVPR 2017)."

FRAME_INDEX = {"train": ("frame_train.mat", "img_index_train"), "test": ("frame_test.mat", "img_index_test")}
# Each annotation file holds exactly one of these; every loader tries them in this order.
BOX_VARIABLES = ("box_new", "anno_file", "anno_previous")
UNLABELED_PID = -2
CAMERA_RE = re.compile(r"c(\d)")


def camera_of(frame: str) -> int | None:
    """Camera number (1..6) from a frame name such as ``c3s2_044587``."""
    m = CAMERA_RE.search(frame)
    return int(m.group(1)) if m else None


def _loadmat(path: Path) -> dict:
    import scipy.io

    try:
        return scipy.io.loadmat(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # scipy raises several types for damaged files
        raise ValueError(f"PRW: cannot read {path}: {e}") from None


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"PRW: missing {what} {path} (is the root the unpacked PRW-v16.04.20/ folder?)")
    return path


def _cell_strings(value) -> list[str]:
    out = []
    for v in np.asarray(value).ravel():
        while isinstance(v, np.ndarray):
            v = v.ravel()[0]
        out.append(str(v))
    return out


def frame_names(root, split: str) -> list[str]:
    """Frame names (without ``.jpg``) of a split, in the release's order."""
    if split not in FRAME_INDEX:
        raise ValueError(f"PRW: unknown split {split!r}; expected one of {SPLITS}")
    filename, variable = FRAME_INDEX[split]
    path = _require(Path(root) / filename, "frame index")
    mat = _loadmat(path)
    if variable not in mat:
        raise ValueError(f"PRW: {path} has no variable {variable!r}")
    return _cell_strings(mat[variable])


def identity_lists(root) -> dict[str, list[int]]:
    """Raw pids of ID_train.mat and ID_test.mat.  Each file holds one id
    row; the test file's variable is ``ID_test2`` in the release, so the
    single data variable is taken whatever its name."""
    out = {}
    for split, filename in (("train", "ID_train.mat"), ("test", "ID_test.mat")):
        path = _require(Path(root) / filename, "identity list")
        mat = _loadmat(path)
        data = [k for k in mat if not k.startswith("__")]
        if len(data) != 1:
            raise ValueError(f"PRW: {path} should hold one id variable, found {data}")
        out[split] = [int(v) for v in np.asarray(mat[data[0]]).ravel()]
    return out


def _annotation(path: Path) -> np.ndarray:
    mat = _loadmat(path)
    for variable in BOX_VARIABLES:
        if variable in mat:
            arr = np.asarray(mat[variable], dtype=np.float64)
            if arr.size == 0:
                return arr.reshape(0, 5)
            if arr.ndim != 2 or arr.shape[1] != 5:
                raise ValueError(f"{variable} has shape {arr.shape}, expected N x 5")
            return arr
    found = sorted(k for k in mat if not k.startswith("__"))
    raise ValueError(f"none of {BOX_VARIABLES} in the file (found {found})")


def standard_boxes(xywh: np.ndarray) -> np.ndarray:
    """The loaders' box rule: clip x, y, w, h to >= 0, then x2 = x + w,
    y2 = y + h, then truncate to int32."""
    b = np.maximum(np.asarray(xywh, dtype=np.float64).reshape(-1, 4), 0.0)
    b[:, 2:] += b[:, :2]
    return b.astype(np.int32)


_image_size = header_size_or_reason  # (W, H) from the header, or a skip reason


def parse(root, split: str, **options) -> Iterator[ParseItem]:
    """Yield one Record per frame of ``split`` ("train" | "test")."""
    root = Path(root)
    names = frame_names(root, split)
    _require(root / "annotations", "annotation folder")
    for frame in names:
        yield from _record(root, split, frame)


def _record(root: Path, split: str, frame: str) -> Iterator[ParseItem]:
    source = f"frames/{frame}.jpg"
    ann_path = root / "annotations" / f"{frame}.jpg.mat"
    if not ann_path.is_file():
        yield Skip(NAME, split, "missing_file", str(ann_path.relative_to(root)))
        return
    try:
        anno = _annotation(ann_path)
    except ValueError as e:
        yield Skip(NAME, split, "malformed_annotation", str(ann_path.relative_to(root)), str(e))
        return
    size = _image_size(root / source)
    if isinstance(size, str):
        yield Skip(NAME, split, size, source)
        return
    width, height = size
    boxes, ids = [], []
    for row, box in zip(anno, standard_boxes(anno[:, 1:])):
        if row[3] <= 0 or row[4] <= 0:
            yield Skip(NAME, split, "degenerate_box", source, f"xywh={row[1:].tolist()}")
            continue
        if row[1] < 0 or row[2] < 0:
            yield Fix(NAME, split, "box_shifted", source)
        clipped, notes = fit_box([float(v) for v in box], width, height, NAME, split, source,
                                 f"outside the frame: xywh={row[1:].tolist()}")
        yield from notes
        if clipped is None:
            continue
        boxes.append(clipped)
        ids.append(_pid(row[0]))
    if not boxes:
        yield Skip(NAME, split, "no_person", source)
        return
    yield Record(
        dataset=NAME, split=split, key=safe_key(frame), image=ImageRef("file", str(root / source)),
        task=TASK, labeled=LABELED, boxes=boxes, ids=ids, width=width, height=height,
        camera=camera_of(frame), source=source, extra={"frame": frame},
    )


def _pid(value: float) -> int:
    pid = int(value)
    return -1 if pid < 0 else pid


# --------------------------------------------------------------------------- protocol
def read_queries(root) -> list[dict]:
    """query_info.txt -> [{"pid", "frame", "box"}] in line order.  The box is
    the standard query box: [x, y, x+w, y+h] in float, truncated to int32,
    then clipped to >= 0 (a different rule from the annotation boxes)."""
    path = _require(Path(root) / "query_info.txt", "query list")
    queries = []
    # Binary read + strip: the release has CRLF line endings.
    for lineno, raw in enumerate(path.read_bytes().decode("utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        parts = line.split()
        try:
            if len(parts) != 6:
                raise ValueError(f"expected 6 fields, got {len(parts)}")
            pid = int(parts[0])
            x, y, w, h = (float(v) for v in parts[1:5])
        except ValueError as e:
            raise ValueError(f"PRW: {path}:{lineno}: malformed query line {line!r} ({e})") from None
        box = np.maximum(np.array([x, y, x + w, y + h], dtype=np.float64).astype(np.int32), 0)
        queries.append({"pid": pid, "frame": parts[5], "box": [float(v) for v in box]})
    return queries


def load_protocol(root, gallery_size=None) -> Protocol:
    """PRW test protocol: queries in query_info.txt order; the gallery is
    every frame of frame_test (in that order) except each query's own frame,
    so ``per_query_gallery`` is None.  PRW has no gallery sizes."""
    if gallery_size not in (None, -1, "full"):
        raise ValueError(f"PRW: the gallery is always the whole test set; gallery_size={gallery_size!r} is not supported")
    root = Path(root)
    gallery = [
        GalleryImage(key=r.key, image=r.image, boxes=r.boxes, pids=r.ids, camera=r.camera)
        for r in parse(root, "test")
        if isinstance(r, Record)
    ]
    test_frames = set(frame_names(root, "test"))
    queries = []
    for i, q in enumerate(read_queries(root)):
        if q["frame"] not in test_frames:
            raise ValueError(f"PRW: query {i} (pid {q['pid']}) is in frame {q['frame']}, which is not in frame_test.mat")
        queries.append(Query(
            index=i, image_key=safe_key(q["frame"]), image=ImageRef("file", str(root / "frames" / f"{q['frame']}.jpg")),
            box=q["box"], pid=q["pid"], camera=camera_of(q["frame"]),
        ))
    return Protocol(dataset=NAME, queries=queries, gallery=gallery, per_query_gallery=None, gallery_size=None,
                    notes={"ignore_cam_id": True})
