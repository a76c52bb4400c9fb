"""CUHK-SYSU (PSDB) person-search release: ``Image/SSM`` + ``annotation/*.mat``.

Layout (docs/datasets.md section 2)::

    root/Image/SSM/s<N>.jpg
    root/annotation/Images.mat              Img: imname, nAppear, box(idlocate, ishard)
    root/annotation/Person.mat              Person: idname, nAppear, scene(...)
    root/annotation/pool.mat                pool: cell of test (gallery) image names
    root/annotation/test/train_test/Train.mat         Train: cell of 1x1 structs
    root/annotation/test/train_test/TestG{K}.mat      TestG{K}: Query/Gallery structs
    root/annotation/test/subset/Occlusion.mat         Occlusion1: occluded queries (optional)
    root/annotation/test/subset/Resolution.mat        Test_Size: low-resolution queries (optional)

Splits follow the standard loaders (SeqNet/NAE/AlignPS): ``test`` = the pool
images in pool.mat order (the order evaluators zip detections with),
``train`` = every other image of Images.mat, sorted by name.

Identity labels (``Record.ids``) are the dataset's own, 0-based:

* train: the index ``k`` of the identity in Train.mat, given to every box of
  its ``scene`` list (found by exact integer comparison with Images.mat);
* test: the index ``i`` of the query in TestG50 (all TestG files share the
  query order), given to the query box and to every positive gallery box;
* every other box: ``-1`` (unlabeled background person).

All ``idlocate`` values are (x, y, w, h); the TestG files store them as
uint16, so they are cast to int64 before any arithmetic (x + w on uint16
wraps silently).  Conversion to xyxy adds w/h without a "+1".
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from ..protocol import GalleryImage, Protocol, Query
from ..imageio import header_size_or_reason
from ..record import ImageRef, ParseItem, Record, Skip, fit_box, safe_key

NAME = "cuhk_sysu"
ORDER = 70          # position in listings (hybridps.registry)
TASK = "ps"
LABELED = True
SPLITS = ("train", "test")
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = "CUHK-SYSU: research use only; obtain it from the authors (Xiao et al., CVPR 2017)."

IMAGE_DIR = Path("Image") / "SSM"
ANNOTATION_DIR = Path("annotation")
PROTOCOL_DIR = ANNOTATION_DIR / "test" / "train_test"
GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)
DEFAULT_GALLERY_SIZE = 100
FULL_GALLERY = -1  # "search the whole test set": TestG50 lists + every other pool image
SUBSET_DIR = ANNOTATION_DIR / "test" / "subset"
# name -> (file, variable) of the release's query subsets (187 occluded, 290 low-resolution queries)
QUERY_SUBSETS = {"occlusion": ("Occlusion.mat", "Occlusion1"), "resolution": ("Resolution.mat", "Test_Size")}


# --------------------------------------------------------------------------- .mat access
def _loadmat(path: Path) -> dict:
    import scipy.io

    if not path.is_file():
        raise FileNotFoundError(f"CUHK-SYSU: missing {path} (is the root the unpacked CUHK-SYSU/ folder?)")
    try:
        return scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for damaged files
        raise ValueError(f"CUHK-SYSU: cannot read {path}: {e}") from None


def _variable(mat: dict, name: str, path: Path):
    if name not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"CUHK-SYSU: {path} has no variable {name!r} (found {found})")
    return mat[name]


def _mat_str(value) -> str:
    """A MATLAB string as loadmat returns it (1-element array, maybe nested)."""
    v = value
    while isinstance(v, np.ndarray):
        if v.size == 0:
            return ""
        v = v.ravel()[0]
    return str(v)


def _mat_xywh(value) -> tuple[int, ...]:
    """``idlocate`` as an int tuple (empty for a negative gallery entry).
    The int64 cast comes first: TestG files store uint16."""
    arr = np.asarray(value).astype(np.int64).ravel()
    if arr.size not in (0, 4):
        raise ValueError(f"idlocate must hold 4 values, got {arr.size}")
    return tuple(int(v) for v in arr)


def _structs(value) -> list:
    """Elements of a MATLAB struct array (any shape) as a flat list."""
    return list(np.asarray(value).ravel())


def _xyxy(xywh: tuple[int, ...]) -> list[float]:
    x, y, w, h = xywh
    return [float(x), float(y), float(x + w), float(y + h)]


# --------------------------------------------------------------------------- annotations
def _read_images(root: Path) -> dict[str, list[tuple[int, ...]]]:
    """Images.mat -> {image name: [xywh, ...]} in file order."""
    path = root / ANNOTATION_DIR / "Images.mat"
    images = {}
    for img in _structs(_variable(_loadmat(path), "Img", path)):
        name = _mat_str(img["imname"])
        images[name] = [_mat_xywh(b["idlocate"]) for b in _structs(img["box"])]
    return images


def _read_pool(root: Path) -> list[str]:
    path = root / ANNOTATION_DIR / "pool.mat"
    return [_mat_str(v) for v in _structs(_variable(_loadmat(path), "pool", path))]


def _read_train_identities(root: Path) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Train.mat -> per identity k, its (image name, xywh) appearances."""
    path = root / PROTOCOL_DIR / "Train.mat"
    identities = []
    for cell in _structs(_variable(_loadmat(path), "Train", path)):
        person = np.asarray(cell).ravel()[0]
        identities.append([(_mat_str(s["imname"]), _mat_xywh(s["idlocate"])) for s in _structs(person["scene"])])
    return identities


def _testg_path(root: Path, size: int) -> Path:
    return root / PROTOCOL_DIR / f"TestG{size}.mat"


def _read_testg(root: Path, size: int) -> list[dict]:
    """TestG{size}.mat -> per query {"imname", "box" (xywh), "gallery": [(name, xywh or ())]}."""
    path = _testg_path(root, size)
    queries = []
    for entry in _structs(_variable(_loadmat(path), f"TestG{size}", path)):
        query = np.asarray(entry["Query"]).ravel()[0]
        gallery = [(_mat_str(g["imname"]), _mat_xywh(g["idlocate"])) for g in _structs(entry["Gallery"])]
        queries.append({"imname": _mat_str(query["imname"]), "box": _mat_xywh(query["idlocate"]), "gallery": gallery,
                        "idname": _mat_str(query["idname"]) if "idname" in (query.dtype.names or ()) else ""})
    return queries


def _label_boxes(boxes, labels, appearances, pid) -> list[str]:
    """Give ``pid`` to the boxes in ``appearances``; return the names whose box
    is not among the image's boxes (the standard loaders only warn there)."""
    unmatched = []
    for name, xywh in appearances:
        try:
            labels[name][boxes[name].index(xywh)] = pid
        except (KeyError, ValueError):
            unmatched.append(name)
    return unmatched


def _labels(root: Path, split: str, images, names) -> tuple[dict, list[str]]:
    boxes = {n: images[n] for n in names}
    labels = {n: [-1] * len(images[n]) for n in names}
    unmatched = []
    if split == "train":
        for k, appearances in enumerate(_read_train_identities(root)):
            unmatched += _label_boxes(boxes, labels, appearances, k)
    else:
        for i, q in enumerate(_read_testg(root, 50)):
            # Positives come first; the standard loaders stop at the first empty box.
            positives = []
            for name, xywh in q["gallery"]:
                if not xywh:
                    break
                positives.append((name, xywh))
            unmatched += _label_boxes(boxes, labels, [(q["imname"], q["box"])] + positives, i)
    return labels, unmatched


# --------------------------------------------------------------------------- parse
_image_size = header_size_or_reason  # (W, H) from the header, or a skip reason


def _split_names(root: Path, split: str, images: dict) -> list[str]:
    pool = _read_pool(root)
    missing = [n for n in pool if n not in images]
    if missing:
        raise ValueError(f"CUHK-SYSU: pool.mat names not in Images.mat: {missing[:5]}")
    if split == "test":
        return pool
    pool_set = set(pool)
    return sorted(n for n in images if n not in pool_set)


def parse(root, split: str, **options) -> Iterator[ParseItem]:
    """Yield one Record per image of ``split`` ("train" | "test"); see the
    module docstring for order and identity labels."""
    if split not in SPLITS:
        raise ValueError(f"CUHK-SYSU: unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    images = _read_images(root)
    names = _split_names(root, split, images)
    labels, unmatched = _labels(root, split, images, names)
    for name in unmatched:
        yield Skip(NAME, split, "unmatched_identity_box", name, "identity box not in Images.mat")
    for name in names:
        yield from _record(root, split, name, images[name], labels[name])


def _record(root: Path, split: str, name: str, xywhs, pids) -> Iterator[ParseItem]:
    source = str(IMAGE_DIR / name)
    size = _image_size(root / source)
    if isinstance(size, str):
        yield Skip(NAME, split, size, source)
        return
    width, height = size
    boxes, ids = [], []
    for xywh, pid in zip(xywhs, pids):
        if xywh[2] <= 0 or xywh[3] <= 0:
            yield Skip(NAME, split, "degenerate_box", source, f"xywh={list(xywh)}")
            continue
        clipped, notes = fit_box(_xyxy(xywh), width, height, NAME, split, source,
                                 f"outside the image: xywh={list(xywh)}")
        yield from notes
        if clipped is None:
            continue
        boxes.append(clipped)
        ids.append(pid)
    if not boxes:
        yield Skip(NAME, split, "no_person", source)
        return
    yield Record(
        dataset=NAME, split=split, key=safe_key(Path(name).stem), image=ImageRef("file", str(root / source)),
        task=TASK, labeled=LABELED, boxes=boxes, ids=ids, width=width, height=height, camera=None,
        source=source, extra={"imname": name},
    )


# --------------------------------------------------------------------------- protocol
def _resolve_gallery_size(gallery_size) -> int:
    if gallery_size is None:
        return DEFAULT_GALLERY_SIZE
    if gallery_size in ("full", FULL_GALLERY):
        return FULL_GALLERY
    if gallery_size not in GALLERY_SIZES:
        raise ValueError(
            f"CUHK-SYSU: gallery_size must be one of {GALLERY_SIZES}, -1 or 'full' (whole test set); got {gallery_size!r}"
        )
    return int(gallery_size)


def load_protocol(root, gallery_size=None) -> Protocol:
    """The CUHK-SYSU test protocol.

    Queries come from TestG50 in protocol order (query ``i`` has pid ``i``);
    ``per_query_gallery[i]`` lists TestG{gallery_size}'s entries for query i
    in file order (positives first; negatives have box None).  The file's
    quirks are kept on purpose -- duplicated gallery names and queries whose
    own image is listed as a positive -- because the evaluator reproduces the
    standard handling of them.  ``gallery_size=-1`` (or "full") lists TestG50's
    entries and sets ``notes["full_gallery"]``: the evaluator then also
    searches every other gallery image.  Boxes are the file's (unclipped) xyxy.
    ``gallery`` is the test split in pool.mat order (same keys as ``parse``).
    """
    root = Path(root)
    size = _resolve_gallery_size(gallery_size)
    queries50 = _read_testg(root, 50)
    protocol_file = queries50 if size in (50, FULL_GALLERY) else _read_testg(root, size)
    _check_same_queries(queries50, protocol_file, size)
    image_dir = root / IMAGE_DIR
    queries = [
        Query(
            index=i, image_key=safe_key(Path(q["imname"]).stem), image=ImageRef("file", str(image_dir / q["imname"])),
            box=_xyxy(q["box"]), pid=i, camera=None,
        )
        for i, q in enumerate(queries50)
    ]
    per_query = [
        [(safe_key(Path(name).stem), _xyxy(xywh) if xywh else None) for name, xywh in q["gallery"]]
        for q in protocol_file
    ]
    gallery = [
        GalleryImage(key=r.key, image=r.image, boxes=r.boxes, pids=r.ids, camera=None)
        for r in parse(root, "test")
        if isinstance(r, Record)
    ]
    subsets, subset_notes = read_query_subsets(root, queries50)
    return Protocol(
        dataset=NAME, queries=queries, gallery=gallery, per_query_gallery=per_query, gallery_size=size,
        notes={"protocol_file": _testg_path(root, 50 if size == FULL_GALLERY else size).name,
               "full_gallery": size == FULL_GALLERY, "query_subsets": subset_notes},
        query_subsets=subsets,
    )


def _unwrap(value):
    """A struct element out of the 1x1 cells / object arrays MATLAB wraps it in."""
    while isinstance(value, np.ndarray) and value.size == 1 and value.dtype.names is None:
        value = value.ravel()[0]
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.ravel()[0]
    return value


def _subset_entry(entry) -> tuple[str, tuple[int, ...], str]:
    """``(imname, xywh, idname)`` of one subset entry.  Two layouts are read,
    since the reference does not describe the files' inside: the TestG one (a
    ``Query`` struct per entry, maybe with its ``Gallery``) and a plain list of
    query structs (``imname``, ``idlocate``[, ``idname``])."""
    entry = _unwrap(entry)
    names = getattr(entry, "dtype", None) is not None and entry.dtype.names or ()
    if "Query" in names:
        entry = _unwrap(entry["Query"])
        names = entry.dtype.names or ()
    if "imname" not in names or "idlocate" not in names:
        raise ValueError(f"an entry has fields {list(names)}; expected Query or imname + idlocate")
    idname = _mat_str(entry["idname"]) if "idname" in names else ""
    return _mat_str(entry["imname"]), _mat_xywh(entry["idlocate"]), idname


def _read_subset(path: Path, variable: str, queries50: list[dict]) -> tuple[list[int], str]:
    """Protocol query positions of one subset file, and a line describing it."""
    mat = _loadmat(path)
    found = [k for k in mat if not k.startswith("__")]
    if variable not in mat and len(found) != 1:
        raise ValueError(f"no variable {variable!r} (found {sorted(found)})")
    entries = _structs(mat[variable] if variable in mat else mat[found[0]])
    by_box = {(q["imname"], q["box"]): i for i, q in enumerate(queries50)}
    by_id = {q["idname"]: i for i, q in enumerate(queries50) if q["idname"]}
    chosen, unmatched = set(), 0
    for entry in entries:
        imname, xywh, idname = _subset_entry(entry)
        i = by_box.get((imname, xywh), by_id.get(idname) if idname else None)
        if i is None:
            unmatched += 1
        else:
            chosen.add(i)
    if not chosen:
        raise ValueError(f"none of its {len(entries)} entries is a TestG50 query")
    extra = f"; {unmatched} entries match no TestG50 query and are left out" if unmatched else ""
    return sorted(chosen), f"{path.name}: {len(chosen)} queries{extra}"


def read_query_subsets(root, queries50: list[dict] | None = None) -> tuple[dict[str, list[int]], dict[str, str]]:
    """The occlusion / low-resolution query subsets, when the release's
    ``annotation/test/subset`` files are there: ``({name: query positions},
    {name: what was found})``.  A missing or unreadable file leaves its subset
    out with a note; it never stops an evaluation of the full query set."""
    root = Path(root)
    queries50 = _read_testg(root, 50) if queries50 is None else queries50
    subsets, notes = {}, {}
    for name, (filename, variable) in QUERY_SUBSETS.items():
        path = root / SUBSET_DIR / filename
        if not path.is_file():
            notes[name] = f"absent ({SUBSET_DIR / filename})"
            continue
        try:
            subsets[name], notes[name] = _read_subset(path, variable, queries50)
        except (ValueError, KeyError, IndexError, TypeError) as e:
            notes[name] = f"unreadable ({SUBSET_DIR / filename}: {e})"
    return subsets, notes


def _check_same_queries(reference: list[dict], other: list[dict], size: int) -> None:
    """The evaluator pairs TestG50 queries with TestG{K} galleries by index."""
    same = len(reference) == len(other) and all(
        a["imname"] == b["imname"] and a["box"] == b["box"] for a, b in zip(reference, other)
    )
    if not same:
        raise ValueError(f"CUHK-SYSU: TestG{size}.mat does not list the same queries in the same order as TestG50.mat")
