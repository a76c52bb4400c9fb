"""Synthetic CUHK03 in the raw release layout (see data_prep/formats/cuhk03.py).

Writes (the release layout of docs/datasets.md section 5.4)::

    root/cuhk03_release/cuhk-03.mat                MATLAB v7.3: HDF5 + 512-byte MAT header
    root/cuhk03_new_protocol_config_detected.mat   MATLAB v5 (scipy.io.savemat)
    root/cuhk03_new_protocol_config_labeled.mat

``cuhk-03.mat`` holds ``detected`` and ``labeled`` as (1, 5) reference
datasets (one per camera pair), each pointing at a (10, n_ids) reference
array under ``#refs#`` (MATLAB column-major, so ``[()].T`` is (n_ids, 10)),
whose cells are uint8 (3, W, H) images or empty cells (uint64 zeros(2),
``MATLAB_empty=1``); ``testsets`` is (1, k) references to (2, m) float
``[pair, person]`` arrays.  ``detected`` and ``labeled`` show the same
people with different crops; ``labeled`` has one more empty cell (the real
file: 14,097 vs 14,096 images).

Each identity fills 2-3 (tiny) or 3-5 (small) of the 5 cells of each view;
the rest are empty -- the release's missing images, present in both sizes.
Test identities contribute one query per view, the rest go to the gallery.

Ground truth: ``splits`` for ``image_type="detected"`` (train, query, gallery
and all; ids are the global labels 1..n), plus extras ``cameras``,
``image_types`` ({"labeled": {"splits", "cameras"}}), ``empty_cells``
({image_type: n}), ``mat_file`` and ``config_files``.
"""
from __future__ import annotations

import itertools
import string
from pathlib import Path

import numpy as np

from .render import STYLES, appearance_for, camera_light, render_crop, stable_rng

NAME = "cuhk03"
IMAGE_TYPES = ("detected", "labeled")
PAIRS = 5
CELLS_PER_VIEW = 5
SIZES = {
    "tiny": dict(ids_per_pair=(3, 2, 2, 1, 1), per_view=(2, 3), test_ids=4, testsets=2),
    "small": dict(ids_per_pair=(10, 7, 5, 4, 3), per_view=(3, 5), test_ids=13, testsets=3),
}
MAT_HEADER = (
    "MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 "
    "HDF5 schema 1.00 ."
)


def cell_name(pair: int, person: int, cell: int) -> str:
    """torchreid's name without ``.png``; ``cell`` 1..10 runs across both views."""
    return f"{pair}_{person:03d}_{1 if cell <= CELLS_PER_VIEW else 2}_{cell:02d}"


def _person(name: str) -> tuple[int, int]:
    pair, person = name.split("_")[:2]
    return int(pair), int(person)


def camera_of(pair: int, cell: int) -> int:
    return (pair - 1) * 2 + (1 if cell <= CELLS_PER_VIEW else 2)


def crop_image(seed: int, image_type: str, pair: int, person: int, cell: int) -> np.ndarray:
    """The HxWx3 crop this writer stores for one cell (re-rendered on demand,
    so a test can compare a decoded cell with it)."""
    rng = stable_rng(NAME, seed, image_type, cell_name(pair, person, cell))
    width = int(rng.integers(30, 57))
    height = int(round(width * rng.uniform(2.2, 2.8)))
    look = appearance_for(seed, NAME, (pair, person))
    light = camera_light(seed, NAME, camera_of(pair, cell))
    return render_crop(STYLES[NAME], look, width, height, rng, light=light)


def _layout(seed: int, cfg: dict) -> dict[str, dict[tuple[int, int], list[int]]]:
    """``{image_type: {(pair, person): [filled cell numbers 1..10]}}``."""
    rng = stable_rng(NAME, seed, "layout")
    lo, hi = cfg["per_view"]
    detected = {}
    for pair, n_ids in enumerate(cfg["ids_per_pair"], start=1):
        for person in range(1, n_ids + 1):
            views = [int(rng.integers(lo, hi + 1)) for _ in range(2)]
            detected[(pair, person)] = list(range(1, views[0] + 1)) + list(range(6, 6 + views[1]))
    labeled = {k: list(v) for k, v in detected.items()}
    labeled[(1, 1)] = labeled[(1, 1)][:-1]          # one more missing hand-drawn box
    return {"detected": detected, "labeled": labeled}


def _global_labels(cfg: dict) -> dict[tuple[int, int], int]:
    pids = [(p, i) for p, n in enumerate(cfg["ids_per_pair"], start=1) for i in range(1, n + 1)]
    return {pid: n for n, pid in enumerate(pids, start=1)}


class _RefNamer:
    """MATLAB-like member names under ``#refs#`` (a, b, ..., z, ba, bb, ...)."""

    def __init__(self):
        self._n = itertools.count()

    def __call__(self) -> str:
        n, letters = next(self._n), string.ascii_lowercase
        name = letters[n % 26]
        while n >= 26:
            n = n // 26
            name = letters[n % 26] + name
        return name


def _store(refs, name: str, data: np.ndarray, matlab_class: bytes, empty: bool = False):
    ds = refs.create_dataset(name, data=data)
    ds.attrs["MATLAB_class"] = np.bytes_(matlab_class)
    if empty:
        ds.attrs["MATLAB_empty"] = np.uint8(1)
    return ds.ref


def _write_image_type(f, refs, namer, seed, image_type, filled, cfg) -> dict[str, tuple[int, int]]:
    """Store one image type; returns ``{name: (W, H)}`` of the filled cells."""
    import h5py

    sizes, pair_refs = {}, []
    for pair, n_ids in enumerate(cfg["ids_per_pair"], start=1):
        grid = np.empty((n_ids, 2 * CELLS_PER_VIEW), dtype=h5py.ref_dtype)
        for person in range(1, n_ids + 1):
            for cell in range(1, 2 * CELLS_PER_VIEW + 1):
                if cell in filled[(pair, person)]:
                    img = crop_image(seed, image_type, pair, person, cell)
                    grid[person - 1, cell - 1] = _store(refs, namer(), img.T, b"uint8")  # (3, W, H)
                    sizes[cell_name(pair, person, cell)] = (img.shape[1], img.shape[0])
                else:
                    grid[person - 1, cell - 1] = _store(refs, namer(), np.zeros(2, np.uint64), b"double", True)
        pair_refs.append(_store(refs, namer(), grid.T, b"cell"))
    top = f.create_dataset(image_type, data=np.array([pair_refs], dtype=h5py.ref_dtype))   # (1, 5)
    top.attrs["MATLAB_class"] = np.bytes_(b"cell")
    return sizes


def _write_testsets(f, refs, namer, seed, cfg) -> None:
    """Classic 1,367/100 style splits: (1, k) refs to (2, m) [pair, person] doubles."""
    import h5py

    rng = stable_rng(NAME, seed, "testsets")
    pids = np.array(sorted(_global_labels(cfg)), dtype=np.float64)
    sets = []
    for _ in range(cfg["testsets"]):
        chosen = pids[np.sort(rng.choice(len(pids), 2, replace=False))]
        sets.append(_store(refs, namer(), chosen.T.copy(), b"double"))
    ds = f.create_dataset("testsets", data=np.array([sets], dtype=h5py.ref_dtype))
    ds.attrs["MATLAB_class"] = np.bytes_(b"cell")


def _write_mat(path: Path, seed: int, layout: dict, cfg: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """Write ``cuhk-03.mat``; returns ``{image_type: {name: (W, H)}}``."""
    import h5py

    path.parent.mkdir(parents=True, exist_ok=True)
    namer = _RefNamer()
    with h5py.File(path, "w", userblock_size=512) as f:
        refs = f.create_group("#refs#")
        sizes = {t: _write_image_type(f, refs, namer, seed, t, layout[t], cfg) for t in IMAGE_TYPES}
        _write_testsets(f, refs, namer, seed, cfg)
    header = MAT_HEADER.ljust(116).encode("ascii") + b" " * 8 + b"\x00\x02" + b"IM"
    with open(path, "r+b") as fh:
        fh.write(header)
    return sizes


def _protocol(seed: int, image_type: str, filled: dict, test_pids: set) -> dict[str, list[str]]:
    """``{"train"|"query"|"gallery": [names]}``: one query per view per test id."""
    rng = stable_rng(NAME, seed, "protocol", image_type)
    split = {"train": [], "query": [], "gallery": []}
    for (pair, person), cells in sorted(filled.items()):
        names = [cell_name(pair, person, c) for c in cells]
        if (pair, person) not in test_pids:
            split["train"] += names
            continue
        for view in (1, 2):
            in_view = [n for n in names if int(n.split("_")[2]) == view]
            pick = in_view[int(rng.integers(len(in_view)))]
            split["query"].append(pick)
            split["gallery"] += [n for n in in_view if n != pick]
    return split


def _write_config(path: Path, filled: dict, labels: dict, split: dict) -> None:
    import scipy.io

    names = sorted(cell_name(p, i, c) for (p, i), cells in filled.items() for c in cells)
    position = {n: k for k, n in enumerate(names, start=1)}          # MATLAB is 1-based
    filelist = np.empty((len(names), 1), dtype=object)
    filelist[:, 0] = [n + ".png" for n in names]
    column = lambda values: np.asarray(values, dtype=np.float64).reshape(-1, 1)
    scipy.io.savemat(str(path), {
        "filelist": filelist,
        "labels": column([labels[_person(n)] for n in names]),
        "camId": column([int(n.split("_")[2]) for n in names]),
        **{f"{s}_idx": column(sorted(position[n] for n in split[s])) for s in ("train", "query", "gallery")},
    })


def _truth_for(filled, sizes, labels, split, test_pids) -> dict:
    """Expected parse of one image type: splits (with the parser's empty-cell
    attribution: train ids -> train, test ids -> gallery) and cameras."""
    def record(name):
        w, h = sizes[name]
        return {"boxes": [[0.0, 0.0, float(w), float(h)]], "ids": [labels[_person(name)]], "ignore": [],
                "width": w, "height": h}

    empty = {pid: 2 * CELLS_PER_VIEW - len(cells) for pid, cells in filled.items()}
    owners = {"train": [p for p in filled if p not in test_pids], "query": [],
              "gallery": sorted(test_pids), "all": list(filled)}
    out: dict = {"splits": {}, "cameras": {}}
    for s, names in {**split, "all": sorted(sizes)}.items():
        n_empty = sum(empty[p] for p in owners[s])
        out["splits"][s] = {"records": {n: record(n) for n in sorted(names)},
                            "skipped": {"empty_cell": n_empty} if n_empty else {}, "fixed": {}}
        out["cameras"][s] = {n: camera_of(_person(n)[0], int(n.split("_")[3])) for n in names}
    return out


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the copy under ``root`` and return the ground truth (CONTRACTS section 2)."""
    if size not in SIZES:
        raise ValueError(f"cuhk03 synth: size must be one of {tuple(SIZES)}, got {size!r}")
    root = Path(root)
    cfg = SIZES[size]
    layout = _layout(seed, cfg)
    labels = _global_labels(cfg)
    rng = stable_rng(NAME, seed, "test_ids")
    pids = sorted(labels)
    test_pids = {pids[i] for i in rng.choice(len(pids), cfg["test_ids"], replace=False)}
    mat_path = root / "cuhk03_release" / "cuhk-03.mat"
    sizes = _write_mat(mat_path, seed, layout, cfg)
    per_type, configs = {}, {}
    for image_type in IMAGE_TYPES:
        split = _protocol(seed, image_type, layout[image_type], test_pids)
        configs[image_type] = root / f"cuhk03_new_protocol_config_{image_type}.mat"
        _write_config(configs[image_type], layout[image_type], labels, split)
        per_type[image_type] = _truth_for(layout[image_type], sizes[image_type], labels, split, test_pids)
    return {
        **per_type["detected"],
        "image_types": {"labeled": per_type["labeled"]},
        "empty_cells": {t: sum(2 * CELLS_PER_VIEW - len(c) for c in layout[t].values()) for t in IMAGE_TYPES},
        "mat_file": str(mat_path),
        "config_files": {t: str(p) for t, p in configs.items()},
    }
