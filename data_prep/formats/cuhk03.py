"""CUHK03 (Li et al. CVPR 2014), labelled re-ID crops, from the raw release.

Accepted layout (``root`` is ``cuhk03/`` or the ``cuhk03_release/`` folder)::

    cuhk03/
      cuhk03_release/cuhk-03.mat                   MATLAB v7.3 (HDF5), read with h5py
      cuhk03_new_protocol_config_detected.mat      MATLAB v5, CUHK03-NP (optional)
      cuhk03_new_protocol_config_labeled.mat

``cuhk-03.mat``: ``detected`` / ``labeled`` are (1, 5) cells, one per camera
pair; each holds an (n_ids, 10) cell of images (columns 0-4 view 1, 5-9 view
2), each image a uint8 array stored (3, W, H).  Empty cells (1-D uint64 with
``MATLAB_empty``) are ``Skip("empty_cell")``.  Pixels are not read here: the
record points at the cell's HDF5 object path (``ImageRef("hdf5")``), which
:func:`data_prep.imageio.load_encoded` turns into an HxWx3 array.

Names follow torchreid's ``{pair}_{person:03d}_{view}_{cell:02d}`` (the cell
index runs 01..10 across both views), which is also what the new-protocol
``filelist`` holds, and are the record keys.  Identity = (pair, person);
camera = ``(pair - 1) * 2 + view`` (10 global cameras).

Splits:

* ``train`` / ``query`` / ``gallery``: the new protocol (767 / 700 ids), from
  the config file of the chosen ``image_type``; ids = its ``labels``
  (1..1467).  Empty cells of the split's identities are counted as skips in
  ``train`` (train identities) and ``gallery`` (test identities).
* ``all``: every identity, no config needed; ids = the same global numbering
  (identities counted pair by pair, 1-based).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..record import ImageRef, ParseItem, Record, Skip

NAME = "cuhk03"
ORDER = 40          # position in listings (hybridps.registry)
TASK = "reid"
LABELED = True
SPLITS = ("train", "query", "gallery", "all")
# CUHK03-NP train keeps the test identities out, so pre-trained models stay
# comparable on the CUHK03-NP benchmark.
DEFAULT_SPLITS = ("train",)
# The new-protocol `labels` are global (1..1467) across train/query/gallery.
ID_SPACES = {"train": "protocol", "query": "protocol", "gallery": "protocol"}
LICENSE_NOTICE = (
    "CUHK03: academic/research use only, obtained from CUHK on request, no "
    "redistribution (exact wording not retrieved); new-protocol files from "
    "zhunzhong07/person-re-ranking; images show identifiable people - treat as "
    "personal data and do not publish the shards."
)

IMAGE_TYPES = ("detected", "labeled")
RELEASE_DIR = "cuhk03_release"
MAT_FILE = "cuhk-03.mat"
CONFIG_FILE = "cuhk03_new_protocol_config_{}.mat"
PROTOCOL_SPLITS = {"train": "train_idx", "query": "query_idx", "gallery": "gallery_idx"}
CELLS_PER_VIEW = 5
NAME_RE = re.compile(r"^(\d)_(\d{3})_([12])_(\d{2})(?:\.png)?$")


@dataclass(frozen=True)
class Cell:
    """One image slot of the release: where it lives, or that it is empty."""

    name: str              # torchreid name without .png, e.g. "1_001_1_01"
    pair: int              # 1..5
    person: int            # 1-based within the pair
    view: int              # 1 | 2
    label: int             # global identity, 1-based, pair by pair
    path: str | None       # HDF5 object path; None when there is no usable image
    width: int = 0
    height: int = 0
    problem: str = ""      # why a present cell is unusable ("" for empty cells)

    @property
    def camera(self) -> int:
        return (self.pair - 1) * 2 + self.view


def cell_name(pair: int, person: int, cell: int) -> str:
    """torchreid's image name (no extension); ``cell`` is 1..10."""
    view = 1 if cell <= CELLS_PER_VIEW else 2
    return f"{pair:d}_{person:03d}_{view:d}_{cell:02d}"


def find_mat(root: Path) -> Path:
    for path in (root / RELEASE_DIR / MAT_FILE, root / MAT_FILE):
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"cuhk03: no {RELEASE_DIR}/{MAT_FILE} under {root} (the raw CUHK03 release, "
        "MATLAB v7.3; torchreid's extracted images_*/ folders are not read)"
    )


def find_config(root: Path, image_type: str) -> Path | None:
    """The new-protocol file next to ``cuhk03_release/`` (or inside it)."""
    name = CONFIG_FILE.format(image_type)
    folders = [root, root / RELEASE_DIR]
    if root.name == RELEASE_DIR:
        folders.append(root.parent)
    for folder in folders:
        if (folder / name).is_file():
            return folder / name
    return None


def object_paths(f) -> dict[int, str]:
    """``{object address: HDF5 path}`` for every object in the file.

    ``Dataset.name`` of a dereferenced object makes HDF5 search the file for
    a path each time (about 150 ms per cell on the real ``#refs#`` with ~30k
    members, i.e. an hour per parse); one visit of the file answers them all."""
    import h5py

    paths: dict[int, str] = {}

    def remember(name: bytes, info) -> None:
        paths.setdefault(info.addr, "/" + name.decode("utf-8"))

    h5py.h5o.visit(f.id, remember, info=True)
    return paths


def _path_of(ds, paths: dict[int, str]) -> str | None:
    import h5py

    return paths.get(h5py.h5o.get_info(ds.id).addr) or ds.name


def _cell_info(f, ref, paths: dict[int, str]) -> tuple[str | None, int, int, str]:
    """``(object path, W, H, problem)`` of an image cell ref.  The path is
    None when there is no usable image: problem "" means an empty cell."""
    if not ref:
        return None, 0, 0, ""
    ds = f[ref]
    if ds.ndim != 3:
        # MATLAB writes an empty cell as a small uint64 vector holding its shape
        empty = bool(ds.attrs.get("MATLAB_empty", 0))
        return None, 0, 0, "" if empty else f"not an image (shape {ds.shape})"
    if ds.shape[0] != 3 or ds.size == 0:
        return None, 0, 0, f"not an RGB cell (shape {ds.shape})"
    path = _path_of(ds, paths)
    if path is None:
        # An anonymous dataset has no object path an ImageRef could name;
        # MATLAB always names the #refs# members, so this means a foreign file.
        return None, 0, 0, "anonymous HDF5 dataset"
    return path, int(ds.shape[1]), int(ds.shape[2]), ""


def index_cells(mat_path: Path, image_type: str) -> list[Cell]:
    """Every cell of ``image_type``, pair by pair (empty ones included)."""
    import h5py

    cells: list[Cell] = []
    try:
        f = h5py.File(mat_path, "r")
    except OSError as e:
        raise ValueError(f"cuhk03: {mat_path} is not a MATLAB v7.3 (HDF5) file: {e}") from None
    with f:
        if image_type not in f:
            raise ValueError(f"cuhk03: {mat_path} has no {image_type!r} variable (keys: {sorted(f)})")
        pair_refs = np.asarray(f[image_type][()]).ravel()
        paths = object_paths(f)
        label = 0
        for pair, pair_ref in enumerate(pair_refs, start=1):
            grid = np.asarray(f[pair_ref][()]).T          # (n_ids, 10), MATLAB column-major
            if grid.ndim != 2 or grid.shape[1] != 2 * CELLS_PER_VIEW:
                raise ValueError(f"cuhk03: {image_type} pair {pair} is {grid.shape}, expected (n_ids, 10)")
            for person, row in enumerate(grid, start=1):
                label += 1
                for cell, ref in enumerate(row, start=1):
                    name = cell_name(pair, person, cell)
                    path, w, h, problem = _cell_info(f, ref, paths)
                    view = 1 if cell <= CELLS_PER_VIEW else 2
                    cells.append(Cell(name, pair, person, view, label, path, w, h, problem))
    return cells


def load_config(path: Path) -> dict[str, np.ndarray | list[str]]:
    """filelist (names without .png), labels and the 0-based split indices."""
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # scipy raises several types for non-MATLAB input
        raise ValueError(f"cuhk03: cannot read {path} as a MATLAB v5 file: {e}") from None
    missing = [k for k in ("filelist", "labels", *PROTOCOL_SPLITS.values()) if k not in mat]
    if missing:
        raise ValueError(f"cuhk03: {path} lacks {', '.join(missing)}")
    names = [str(np.asarray(x).ravel()[0]) if np.asarray(x).size else "" for x in mat["filelist"].ravel()]
    config = {"filelist": [n[:-4] if n.endswith(".png") else n for n in names]}
    config["labels"] = np.asarray(mat["labels"]).ravel().astype(np.int64)
    for field in PROTOCOL_SPLITS.values():
        config[field] = np.asarray(mat[field]).ravel().astype(np.int64) - 1   # 1-based in the file
    if len(config["labels"]) != len(config["filelist"]):
        raise ValueError(f"cuhk03: {path}: {len(config['labels'])} labels for {len(names)} files")
    return config


def _record(cell: Cell, mat_path: Path, root: Path, split: str, label: int) -> Record:
    return Record(
        dataset=NAME, split=split, key=cell.name, image=ImageRef("hdf5", str(mat_path), cell.path),
        task=TASK, labeled=LABELED, boxes=[[0.0, 0.0, float(cell.width), float(cell.height)]],
        ids=[int(label)], width=cell.width, height=cell.height, camera=cell.camera,
        source=f"{mat_path.relative_to(root)}:{cell.path}",
        extra={"pair": cell.pair, "person": cell.person, "view": cell.view},
    )


def _unusable_skip(cell: Cell, split: str, image_type: str) -> Skip:
    if cell.problem:
        return Skip(NAME, split, "malformed_annotation", f"{image_type}/{cell.name}", cell.problem)
    return Skip(NAME, split, "empty_cell", f"{image_type}/{cell.name}")


def _all_items(cells, mat_path, root, image_type) -> Iterator[ParseItem]:
    for cell in sorted(cells, key=lambda c: c.name):
        if cell.path is None:
            yield _unusable_skip(cell, "all", image_type)
        else:
            yield _record(cell, mat_path, root, "all", cell.label)


def _chosen_names(config, split, by_name, source, image_type) -> tuple[dict[str, int], list[Skip]]:
    """``{name: label}`` the config puts in ``split``, and Skips for its bad entries."""
    names, labels = config["filelist"], config["labels"]
    chosen: dict[str, int] = {}
    skips: list[Skip] = []
    for i in config[PROTOCOL_SPLITS[split]]:
        if not 0 <= i < len(names):
            skips.append(Skip(NAME, split, "malformed_annotation", source, f"index {i + 1} outside filelist"))
        elif not NAME_RE.match(names[i]) or labels[i] < 0:
            skips.append(Skip(NAME, split, "malformed_annotation", source, f"entry {names[i]!r} label {labels[i]}"))
        elif names[i] not in by_name:
            skips.append(Skip(NAME, split, "missing_file", source, f"{names[i]} not in {image_type}"))
        elif names[i] in chosen:
            skips.append(Skip(NAME, split, "duplicate_key", source, f"{names[i]} listed twice"))
        else:
            chosen[names[i]] = int(labels[i])
    return chosen, skips


def _owned_persons(config, split, by_name) -> set[tuple[int, int]]:
    """(pair, person) whose empty cells ``split`` reports: train ids -> train,
    test ids -> gallery (a query is just one image per view of a test id)."""
    fields = {"train": ("train_idx",), "gallery": ("query_idx", "gallery_idx"), "query": ()}[split]
    names = config["filelist"]
    return {(by_name[names[i]].pair, by_name[names[i]].person)
            for field in fields for i in config[field] if 0 <= i < len(names) and names[i] in by_name}


def _protocol_items(cells, config, config_path, mat_path, root, split, image_type) -> Iterator[ParseItem]:
    by_name = {c.name: c for c in cells}
    chosen, skips = _chosen_names(config, split, by_name, config_path.name, image_type)
    yield from skips
    persons = _owned_persons(config, split, by_name)
    for cell in sorted(cells, key=lambda c: c.name):
        if cell.path is None and (cell.name in chosen or (cell.pair, cell.person) in persons):
            yield _unusable_skip(cell, split, image_type)
        elif cell.name in chosen:
            yield _record(cell, mat_path, root, split, chosen[cell.name])


def parse(root, split: str, image_type: str = "detected") -> Iterator[ParseItem]:
    """Yield one :class:`Record` per image of ``split``, sorted by key.

    ``image_type``: ``"detected"`` (DPM boxes, default: closer to what a
    detector sees) or ``"labeled"`` (hand-drawn boxes)."""
    if split not in SPLITS:
        raise ValueError(f"cuhk03: unknown split {split!r}; known: {', '.join(SPLITS)}")
    if image_type not in IMAGE_TYPES:
        raise ValueError(f"cuhk03: image_type must be one of {IMAGE_TYPES}, got {image_type!r}")
    root = Path(root)
    mat_path = find_mat(root)
    config_path = find_config(root, image_type) if split in PROTOCOL_SPLITS else None
    if split in PROTOCOL_SPLITS and config_path is None:
        raise FileNotFoundError(
            f"cuhk03: split {split!r} is defined by the new protocol (CUHK03-NP): put "
            f"{CONFIG_FILE.format(image_type)} (zhunzhong07/person-re-ranking, "
            f"evaluation/data/CUHK03/) in {root}; without it only split 'all' is available"
        )
    cells = index_cells(mat_path, image_type)
    if split == "all":
        yield from _all_items(cells, mat_path, root, image_type)
    else:
        config = load_config(config_path)
        yield from _protocol_items(cells, config, config_path, mat_path, root, split, image_type)
