"""Synthetic Market-1501 in the release layout (see data_prep/formats/market1501.py).

Writes ``root/Market-1501-v15.09.15/{bounding_box_train,bounding_box_test,query}``
with 128x64 JPEGs named ``<pid:04d>_c<cam>s<seq>_<frame:06d>_<box:02d>.jpg``.
Train and test identities are disjoint; a query holds at most one image per
camera per identity and the gallery shows every query identity again.  Edge
cases of the release, in both sizes: a ``Thumbs.db`` in every folder, junk
crops (pid ``-1``) and DPM false alarms (pid ``0000``) in the gallery folder.

Ground truth extras: ``cameras`` ({split: {key: camera}}) and ``release``
(the folder holding the split folders).
"""
from __future__ import annotations

from pathlib import Path

from .render import STYLES, appearance_for, camera_light, encode, render_crop, render_scene, stable_rng

NAME = "market1501"
RELEASE_DIR = "Market-1501-v15.09.15"
WIDTH, HEIGHT = 64, 128
CAMERAS = 6
SIZES = {
    "tiny": dict(train_ids=5, per_train=4, test_ids=4, query_cams=2, per_gallery=3, junk=2, distractors=2),
    "small": dict(train_ids=20, per_train=6, test_ids=16, query_cams=3, per_gallery=5, junk=4, distractors=4),
}
SPLIT_DIRS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
# A Windows thumbnail cache; its bytes do not matter, only that it is not an image.
THUMBS_DB = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504)


class _Namer:
    """Unique release file names (a name clash would silently drop a crop)."""

    def __init__(self, rng):
        self.rng = rng
        self.used: set[str] = set()

    def __call__(self, pid: int, cam: int) -> str:
        while True:
            seq, frame, box = self.rng.integers(1, 7), self.rng.integers(1, 200000), self.rng.integers(1, 9)
            pid_txt = "-1" if pid < 0 else f"{pid:04d}"
            name = f"{pid_txt}_c{cam}s{seq}_{frame:06d}_{box:02d}.jpg"
            if name not in self.used:
                self.used.add(name)
                return name


def _person_crop(seed: int, pid: int, cam: int, name: str):
    rng = stable_rng(NAME, seed, "crop", name)
    look = appearance_for(seed, NAME, pid)
    return render_crop(STYLES[NAME], look, WIDTH, HEIGHT, rng, light=camera_light(seed, NAME, cam))


def _junk_crop(seed: int, cam: int, name: str):
    """A badly aligned detection: a stranger mostly outside the frame."""
    rng = stable_rng(NAME, seed, "junk", name)
    look = appearance_for(seed, NAME, ("junk", name))
    box = [WIDTH * 0.55, HEIGHT * 0.35, WIDTH * 1.6, HEIGHT * 1.5]
    return render_scene(STYLES[NAME], WIDTH, HEIGHT, [(look, box)], rng, light=camera_light(seed, NAME, cam))


def _distractor_crop(seed: int, cam: int, name: str):
    """A DPM false alarm: background and street furniture, nobody."""
    rng = stable_rng(NAME, seed, "distractor", name)
    return render_scene(STYLES[NAME], WIDTH, HEIGHT, [], rng, occluders=2, light=camera_light(seed, NAME, cam))


def _truth_record() -> dict:
    return {"boxes": [[0.0, 0.0, float(WIDTH), float(HEIGHT)]], "ids": None, "ignore": [],
            "width": WIDTH, "height": HEIGHT}


def _plan(seed: int, cfg: dict) -> dict[str, list[tuple[int, int]]]:
    """``{split: [(pid, camera), ...]}`` including junk (-1) and distractors (0)."""
    rng = stable_rng(NAME, seed, "plan")
    pids = [int(p) for p in rng.choice(range(1, 1502), cfg["train_ids"] + cfg["test_ids"], replace=False)]
    train_pids, test_pids = sorted(pids[: cfg["train_ids"]]), sorted(pids[cfg["train_ids"]:])
    plan: dict[str, list[tuple[int, int]]] = {"train": [], "query": [], "gallery": []}
    for pid in train_pids:
        plan["train"] += [(pid, int(rng.integers(1, CAMERAS + 1))) for _ in range(cfg["per_train"])]
    for pid in test_pids:
        cams = [int(c) for c in rng.choice(range(1, CAMERAS + 1), cfg["query_cams"], replace=False)]
        plan["query"] += [(pid, cam) for cam in cams]
        # the first gallery view comes from a camera the queries do not use, so
        # every query has a cross-camera match (same-camera matches do not count)
        other = [c for c in range(1, CAMERAS + 1) if c not in cams]
        plan["gallery"].append((pid, int(rng.choice(other))))
        plan["gallery"] += [(pid, int(rng.integers(1, CAMERAS + 1))) for _ in range(cfg["per_gallery"] - 1)]
    plan["gallery"] += [(-1, int(rng.integers(1, CAMERAS + 1))) for _ in range(cfg["junk"])]
    plan["gallery"] += [(0, int(rng.integers(1, CAMERAS + 1))) for _ in range(cfg["distractors"])]
    return plan


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the copy under ``root`` and return the ground truth (CONTRACTS section 2)."""
    if size not in SIZES:
        raise ValueError(f"market1501 synth: size must be one of {tuple(SIZES)}, got {size!r}")
    release = Path(root) / RELEASE_DIR
    namer = _Namer(stable_rng(NAME, seed, "names"))
    truth: dict = {"splits": {}, "cameras": {}, "release": str(release)}
    for split, entries in _plan(seed, SIZES[size]).items():
        folder = release / SPLIT_DIRS[split]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "Thumbs.db").write_bytes(THUMBS_DB)
        records, cameras, junk = {}, {}, 0
        for pid, cam in entries:
            name = namer(pid, cam)
            if pid == -1:
                img, junk = _junk_crop(seed, cam, name), junk + 1
            elif pid == 0:
                img, junk = _distractor_crop(seed, cam, name), junk + 1
            else:
                img = _person_crop(seed, pid, cam, name)
                key = name[:-4]
                records[key] = {**_truth_record(), "ids": [pid]}
                cameras[key] = cam
            (folder / name).write_bytes(encode(img, "JPEG", quality=90))
        truth["splits"][split] = {"records": records, "skipped": {"junk_id": junk} if junk else {}, "fixed": {}}
        truth["cameras"][split] = cameras
    return truth
