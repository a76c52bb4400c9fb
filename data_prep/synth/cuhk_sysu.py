"""Synthetic CUHK-SYSU release: ``Image/SSM/s<N>.jpg`` plus the annotation
``.mat`` files with the exact struct/cell nesting of the real ones
(Images.mat, Person.mat, pool.mat, Train.mat, TestG50..TestG4000.mat,
subset/Occlusion.mat, subset/Resolution.mat).

Scenes hold labeled identities (training ids appear in several training
images, test ids in a query image and 1-3 gallery images, always with the
same look) and unlabeled passers-by.  Both sizes carry the release's quirks:
uint16 ``idlocate`` in the TestG files, positives first with empty (1x0)
``idlocate`` for negatives, a query whose own image is listed as a positive
gallery entry, a duplicated gallery name whose second box matches no
annotated box, a degenerate box, an image whose only box is degenerate and a
box crossing the image border.

The pool is tiny, so ``TestG{K}`` lists ``min(K, pool - 1)`` gallery entries
(the real files always list exactly K); the negatives are drawn separately
for every K, so the files differ in content and order.  The subset files
(a quarter of the queries each: a random "occluded" set and the smallest
query boxes as "low resolution") use the two layouts the parser reads, since
the public sources do not describe their inside: ``Occlusion1`` has the TestG
structure (Query/Gallery per subset query, gallery from TestG100) and
``Test_Size`` is a plain struct list of queries (imname, idlocate, ishard,
idname).  Their query positions are the truth's ``query_subsets``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .render import STYLES, appearance_for, camera_light, encode, place_people, render_scene, stable_rng

NAME = "cuhk_sysu"
GALLERY_SIZES = (50, 100, 500, 1000, 2000, 4000)
SCENE_SIZES = ((320, 240), (300, 200), (280, 210), (240, 300))

SIZES = {
    "tiny": {"train_images": 24, "test_images": 15, "train_ids": 6, "test_ids": 8},
    "small": {"train_images": 120, "test_images": 75, "train_ids": 30, "test_ids": 40},
}


@dataclass
class Box:
    xywh: tuple[int, int, int, int]
    identity: str | None           # idname ("p123") or None for a passer-by
    look: str


@dataclass
class Scene:
    name: str                      # "s123.jpg"
    width: int
    height: int
    boxes: list[Box] = field(default_factory=list)

    def find(self, identity: str) -> Box:
        return next(b for b in self.boxes if b.identity == identity)


# --------------------------------------------------------------------------- planning
def _int_box(box) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = box
    return (int(round(x1)), int(round(y1)), max(4, int(round(x2 - x1))), max(8, int(round(y2 - y1))))


def _populate(rng, scene: Scene, identities: list[str]) -> None:
    n_bg = int(rng.integers(1, 3))
    placed = place_people(rng, scene.width, scene.height, len(identities) + n_bg, min_h=0.3, max_h=0.8)
    for j, box in enumerate(placed):
        ident = identities[j] if j < len(identities) else None
        xywh = _int_box(box)
        while any(b.xywh == xywh for b in scene.boxes):  # exact-match labelling needs distinct boxes
            xywh = (xywh[0] + 1, *xywh[1:])
        scene.boxes.append(Box(xywh, ident, ident or f"bg-{scene.name}-{j}"))


def _assign(rng, identities: list[str], scenes: list[Scene], lo: int, hi: int) -> dict[str, list[Scene]]:
    """Each identity -> lo..hi distinct scenes (the first one is its query
    scene for test identities)."""
    out = {}
    load = {s.name: 0 for s in scenes}
    for ident in identities:
        k = int(rng.integers(lo, hi + 1))
        order = sorted(scenes, key=lambda s: (load[s.name], rng.random()))[:k]
        for s in order:
            load[s.name] += 1
        out[ident] = order
    return out


def _plan(rng, cfg: dict):
    n_img = cfg["train_images"] + cfg["test_images"]
    numbers = rng.choice(np.arange(1, 20000), n_img, replace=False)
    scenes = []
    for n in numbers:
        w, h = SCENE_SIZES[int(rng.integers(len(SCENE_SIZES)))]
        scenes.append(Scene(f"s{int(n)}.jpg", w, h))
    train_scenes, pool = scenes[: cfg["train_images"]], scenes[cfg["train_images"]:]
    id_numbers = rng.choice(np.arange(1, 12000), cfg["train_ids"] + cfg["test_ids"], replace=False)
    idnames = [f"p{int(n)}" for n in id_numbers]
    train_ids, test_ids = idnames[: cfg["train_ids"]], idnames[cfg["train_ids"]:]
    nobody = train_scenes[0]  # reserved: gets only a degenerate box
    train_app = _assign(rng, train_ids, train_scenes[1:], 2, 4)
    test_app = _assign(rng, test_ids, pool, 2, 4)
    members = {s.name: [] for s in scenes}
    for app in (train_app, test_app):
        for ident, ss in app.items():
            for s in ss:
                members[s.name].append(ident)
    for s in scenes:
        if s is not nobody:
            _populate(rng, s, members[s.name])
    return scenes, train_scenes, pool, train_ids, test_ids, train_app, test_app, nobody


def _add_box_edge_cases(train_scenes: list[Scene], nobody: Scene) -> None:
    nobody.boxes.append(Box((30, 40, 25, 0), None, "degenerate"))
    a, b = train_scenes[1], train_scenes[2]
    a.boxes.append(Box((12, 20, 0, 60), None, "degenerate"))
    x, y, w, h = b.boxes[-1].xywh
    b.boxes[-1].xywh = (b.width - w // 2, y, w, h)  # half outside the right border


# --------------------------------------------------------------------------- protocol plan
def _galleries(seed: int, pool: list[Scene], test_ids, test_app) -> dict[int, list]:
    """Per gallery size K: per query [(scene name, xywh or None)], positives first."""
    out = {}
    for K in GALLERY_SIZES:
        cap = min(K, len(pool) - 1)
        per_query = []
        for i, ident in enumerate(test_ids):
            query_scene, *positive_scenes = test_app[ident]
            positives = [(s.name, s.find(ident).xywh) for s in positive_scenes]
            if i == 0:   # quirk: the query's own image listed as a positive
                positives.insert(0, (query_scene.name, query_scene.find(ident).xywh))
            if i == 1:   # quirk: a duplicated name whose second box matches nothing
                name, (x, y, w, h) = positives[0]
                positives.insert(1, (name, (x + 2, y, w, h)))
            holders = {s.name for s in test_app[ident]}
            negatives = [s.name for s in pool if s.name not in holders]
            order = stable_rng(NAME, seed, "gallery", K, i).permutation(len(negatives))
            n_neg = max(0, min(cap - len(positives), len(negatives)))
            per_query.append(positives + [(negatives[j], None) for j in order[:n_neg]])
        out[K] = per_query
    return out


# --------------------------------------------------------------------------- .mat writing
def _s(text: str) -> np.ndarray:
    return np.array([text])


def _scene_struct(entries, dtype=np.float64) -> np.ndarray:
    """1xN struct array (imname, idlocate, ishard)."""
    arr = np.zeros((1, len(entries)), dtype=[("imname", "O"), ("idlocate", "O"), ("ishard", "O")])
    for j, (name, xywh) in enumerate(entries):
        loc = np.array([xywh], dtype=dtype) if xywh is not None else np.zeros((1, 0), dtype=dtype)
        arr[0, j] = (_s(name), loc, np.array([[0]], dtype=np.uint8))
    return arr


def _person_struct(idname: str, scenes: list[Scene]) -> np.ndarray:
    arr = np.zeros((1, 1), dtype=[("idname", "O"), ("nAppear", "O"), ("scene", "O")])
    arr[0, 0] = (_s(idname), np.array([[len(scenes)]], dtype=np.float64),
                 _scene_struct([(s.name, s.find(idname).xywh) for s in scenes]))
    return arr


def _write_images_mat(path: Path, scenes: list[Scene], order) -> None:
    import scipy.io

    img = np.zeros((1, len(scenes)), dtype=[("imname", "O"), ("nAppear", "O"), ("box", "O")])
    for col, idx in enumerate(order):
        s = scenes[idx]
        box = np.zeros((1, len(s.boxes)), dtype=[("idlocate", "O"), ("ishard", "O")])
        for j, b in enumerate(s.boxes):
            box[0, j] = (np.array([b.xywh], dtype=np.float64), np.array([[0]], dtype=np.uint8))
        img[0, col] = (_s(s.name), np.array([[len(s.boxes)]], dtype=np.float64), box)
    scipy.io.savemat(str(path), {"Img": img})


def _testg_struct(test_ids, test_app, galleries: list, indices) -> np.ndarray:
    arr = np.zeros((1, len(indices)), dtype=[("Query", "O"), ("Gallery", "O")])
    for col, i in enumerate(indices):
        ident = test_ids[i]
        qs = test_app[ident][0]
        query = np.zeros((1, 1), dtype=[("imname", "O"), ("idlocate", "O"), ("ishard", "O"), ("idname", "O")])
        query[0, 0] = (_s(qs.name), np.array([qs.find(ident).xywh], dtype=np.uint16),
                       np.array([[0]], dtype=np.uint8), _s(ident))
        arr[0, col] = (query, _scene_struct(galleries[i], dtype=np.uint16))
    return arr


def _write_mats(root: Path, rng, scenes, train_ids, test_ids, train_app, test_app, pool, galleries) -> dict:
    import scipy.io

    ann = root / "annotation"
    tt, subset = ann / "test" / "train_test", ann / "test" / "subset"
    tt.mkdir(parents=True, exist_ok=True)
    subset.mkdir(parents=True, exist_ok=True)
    _write_images_mat(ann / "Images.mat", scenes, rng.permutation(len(scenes)))
    everyone = {**train_app, **test_app}
    person = np.zeros((1, len(everyone)), dtype=[("idname", "O"), ("nAppear", "O"), ("scene", "O")])
    for j, (ident, ss) in enumerate(everyone.items()):
        person[0, j] = _person_struct(ident, ss)[0, 0]
    scipy.io.savemat(str(ann / "Person.mat"), {"Person": person})
    pool_cell = np.empty((len(pool), 1), dtype=object)
    for j, s in enumerate(pool):
        pool_cell[j, 0] = _s(s.name)
    scipy.io.savemat(str(ann / "pool.mat"), {"pool": pool_cell})
    train_cell = np.empty((len(train_ids), 1), dtype=object)
    for k, ident in enumerate(train_ids):
        train_cell[k, 0] = _person_struct(ident, train_app[ident])
    scipy.io.savemat(str(tt / "Train.mat"), {"Train": train_cell})
    every = range(len(test_ids))
    for K in GALLERY_SIZES:
        testg = _testg_struct(test_ids, test_app, galleries[K], every)
        scipy.io.savemat(str(tt / f"TestG{K}.mat"), {f"TestG{K}": testg})
    occluded = sorted(int(i) for i in rng.choice(len(test_ids), max(1, len(test_ids) // 4), replace=False))
    by_area = sorted(every, key=lambda i: np.prod(test_app[test_ids[i]][0].find(test_ids[i]).xywh[2:]))
    small = sorted(by_area[: max(1, len(test_ids) // 4)])
    scipy.io.savemat(str(subset / "Occlusion.mat"),
                     {"Occlusion1": _testg_struct(test_ids, test_app, galleries[100], occluded)})
    scipy.io.savemat(str(subset / "Resolution.mat"), {"Test_Size": _query_list_struct(test_ids, test_app, small)})
    return {"occlusion": occluded, "resolution": small}


def _query_list_struct(test_ids, test_app, indices) -> np.ndarray:
    """A subset as a plain 1xN struct list of queries (the second layout the parser reads)."""
    arr = np.zeros((1, len(indices)), dtype=[("imname", "O"), ("idlocate", "O"), ("ishard", "O"), ("idname", "O")])
    for col, i in enumerate(indices):
        ident = test_ids[i]
        qs = test_app[ident][0]
        arr[0, col] = (_s(qs.name), np.array([qs.find(ident).xywh], dtype=np.uint16),
                       np.array([[0]], dtype=np.uint8), _s(ident))
    return arr


def _write_images(root: Path, seed: int, scenes: list[Scene]) -> None:
    out = root / "Image" / "SSM"
    out.mkdir(parents=True, exist_ok=True)
    for s in scenes:
        rng = stable_rng(NAME, seed, "pixels", s.name)
        people = [(appearance_for(seed, NAME, b.look), _xyxy(b.xywh)) for b in s.boxes if b.xywh[2] > 0 and b.xywh[3] > 0]
        img = render_scene(STYLES[NAME], s.width, s.height, people, rng, occluders=int(rng.integers(0, 2)),
                           light=camera_light(seed, NAME, s.name))
        (out / s.name).write_bytes(encode(img))


# --------------------------------------------------------------------------- truth
def _xyxy(xywh) -> list[float]:
    x, y, w, h = xywh
    return [float(x), float(y), float(x + w), float(y + h)]


def _expected_split(scenes: list[Scene], label: dict[str, int]) -> dict:
    records, skipped, fixed = {}, {}, {}
    for s in scenes:
        boxes, ids = [], []
        for b in s.boxes:
            if b.xywh[2] <= 0 or b.xywh[3] <= 0:
                skipped["degenerate_box"] = skipped.get("degenerate_box", 0) + 1
                continue
            x1, y1, x2, y2 = _xyxy(b.xywh)
            clipped = [max(x1, 0.0), max(y1, 0.0), min(x2, float(s.width)), min(y2, float(s.height))]
            if clipped != [x1, y1, x2, y2]:
                fixed["box_clipped"] = fixed.get("box_clipped", 0) + 1
            boxes.append(clipped)
            ids.append(label.get(b.identity, -1) if b.identity else -1)
        if not boxes:
            skipped["no_person"] = skipped.get("no_person", 0) + 1
            continue
        records[s.name[:-4]] = {"boxes": boxes, "ids": ids, "ignore": [], "width": s.width, "height": s.height}
    return {"records": records, "skipped": skipped, "fixed": fixed}


def _expected_protocol(test_ids, test_app, galleries) -> dict:
    queries = []
    for i, ident in enumerate(test_ids):
        qs = test_app[ident][0]
        queries.append({"image_key": qs.name[:-4], "box": _xyxy(qs.find(ident).xywh), "pid": i})
    per_size = {K: [[[n[:-4], _xyxy(x) if x is not None else None] for n, x in g] for g in galleries[K]]
                for K in GALLERY_SIZES}
    per_size[-1] = per_size[50]
    return {"queries": queries, "per_query_gallery": per_size}


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write a CUHK-SYSU-like release under ``root``; return the truth
    (CONTRACTS section 2) plus ``protocol`` (queries and per-query galleries
    for every gallery size, -1 = TestG50's), ``num_train_ids`` and
    ``query_subsets`` (query positions of the occlusion / resolution files)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    root = Path(root)
    rng = stable_rng(NAME, seed, size)
    scenes, train_scenes, pool, train_ids, test_ids, train_app, test_app, nobody = _plan(rng, SIZES[size])
    _add_box_edge_cases(train_scenes, nobody)
    galleries = _galleries(seed, pool, test_ids, test_app)
    _write_images(root, seed, scenes)
    subsets = _write_mats(root, rng, scenes, train_ids, test_ids, train_app, test_app, pool, galleries)

    train_sorted = sorted(train_scenes, key=lambda s: s.name)
    test_truth = _expected_split(pool, {ident: i for i, ident in enumerate(test_ids)})
    test_truth["skipped"]["unmatched_identity_box"] = 1  # the duplicated entry's shifted box
    return {
        "splits": {
            "train": _expected_split(train_sorted, {ident: k for k, ident in enumerate(train_ids)}),
            "test": test_truth,
        },
        "protocol": _expected_protocol(test_ids, test_app, galleries),
        "pool": [s.name[:-4] for s in pool],
        "num_train_ids": len(train_ids),
        "query_subsets": subsets,
    }
