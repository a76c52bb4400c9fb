"""A fake COCO-format person-detection set (see data_prep/formats/coco.py).

Layout written under ``root``::

    annotations/instances_train.json      train/<name>.jpg, train/extra/<name>.jpg
    annotations/instances_val2017.json    val2017/<name>.jpg  (found as instances_val*.json)

Categories are ``bicycle`` (id 1), ``car`` (3) and ``person`` (7): the person
category is found by name, not by COCO's id 1.  Scenes hold 2-6 people, some
crossing the border; each also has a bicycle annotation (not drawn) that the
parser must ignore.  Edge cases (train, both sizes): a crowd region (``iscrowd: 1``) ->
ignore region, a zero-width and a negative-height box, a box entirely outside
the image, a 3-value bbox, an ``iscrowd`` that is a string, an annotation of
an unknown image, an image with only cars, an image with no annotation, an
image whose file is missing, an image whose JSON size disagrees with its
header, a ``file_name`` escaping the folder, a non-object image entry, a
file in a sub-folder (``extra/...``) and a truncated JPEG (the builder drops
it as ``corrupt_image``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .render import STYLES, appearance_for, encode, place_people, render_scene, stable_rng
from .truth import SplitTruth

NAME = "coco"
SIZES = {"tiny": {"train": 8, "val": 3}, "small": {"train": 40, "val": 12}}
SCENE_SIZES = ((320, 240), (288, 224), (256, 256))
CATEGORIES = [{"id": 1, "name": "bicycle", "supercategory": "vehicle"},
              {"id": 3, "name": "car", "supercategory": "vehicle"},
              {"id": 7, "name": "person", "supercategory": "person"}]
PERSON, BICYCLE, CAR = 7, 1, 3
ANNOTATION = {"train": "instances_train.json", "val": "instances_val2017.json"}
IMAGE_DIR = {"train": "train", "val": "val2017"}


class _Scene:
    """One image being built: its JSON entries, what to draw and what parsing must give."""

    def __init__(self, split: str, index: int, file_name: str, width: int, height: int):
        self.split, self.index, self.file_name = split, index, file_name
        self.width, self.height = width, height
        self.anns: list[dict] = []
        self.draw: list[tuple] = []
        self.persons: list[list[float]] = []
        self.ignore: list[list[float]] = []
        self.fixed = 0
        self.degenerate = 0
        self.json_size: tuple[int, int] | None = None

    def add(self, xywh, category: int = PERSON, look=None, **fields) -> None:
        x, y, w, h = (round(float(v), 2) for v in xywh)
        self.anns.append({"category_id": category, "bbox": [x, y, w, h], "area": round(abs(w * h), 2),
                          "iscrowd": 0, **fields})
        if look is not None and w > 0 and h > 0:
            self.draw.append((look, [x, y, x + w, y + h]))
        if category != PERSON:
            return
        box = [x, y, x + w, y + h]             # the parser's arithmetic, spelled out
        if w <= 0 or h <= 0:
            self.degenerate += 1
            return
        clipped = [min(max(box[0], 0.0), float(self.width)), min(max(box[1], 0.0), float(self.height)),
                   min(max(box[2], 0.0), float(self.width)), min(max(box[3], 0.0), float(self.height))]
        if clipped != box:
            self.fixed += 1
        if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
            self.degenerate += 1
            return
        (self.ignore if fields.get("iscrowd") == 1 else self.persons).append(clipped)

    @property
    def key(self) -> str:
        return self.file_name.rsplit(".", 1)[0].replace("/", "_")


def _scene(split: str, index: int, seed: int, people: bool = True, sub: str = "") -> tuple[_Scene, object]:
    rng = stable_rng(seed, NAME, split, index)
    w, h = SCENE_SIZES[index % len(SCENE_SIZES)]
    sc = _Scene(split, index, f"{sub}{split}_{index:06d}.jpg", w, h)
    if people:
        for j, b in enumerate(place_people(rng, w, h, int(rng.integers(2, 7)), 0.25, 0.8, allow_outside=True)):
            sc.add([b[0], b[1], b[2] - b[0], b[3] - b[1]], look=appearance_for(seed, NAME, f"{split}/{index}/{j}"))
        # another category: annotated only, the parser must leave it out
        sc.add([w * 0.05, h * 0.7, w * 0.2, h * 0.15], category=BICYCLE)
    return sc, rng


def _edge_cases(sc: _Scene, seed: int) -> list[dict]:
    """Train image 0 and 1 carry the box-level cases; returns broken raw annotations."""
    W, H = sc.width, sc.height
    if sc.index == 0:
        for k in range(3):                      # a distant group, annotated as one crowd region
            look = appearance_for(seed, NAME, f"crowd/{k}")
            sc.draw.append((look, [W * (0.6 + 0.1 * k), H * 0.1, W * (0.68 + 0.1 * k), H * 0.35]))
        sc.add([W * 0.6, H * 0.08, W * 0.32, H * 0.3], iscrowd=1)
        sc.add([-W * 0.06, H * 0.3, W * 0.18, H * 0.5], look=appearance_for(seed, NAME, "left_edge"))
        return []
    if sc.index == 1:
        sc.add([W * 0.3, H * 0.3, 0, H * 0.3])              # zero width
        sc.add([W * 0.5, H * 0.5, W * 0.1, -H * 0.2])       # negative height
        sc.add([W + 20, H * 0.2, W * 0.1, H * 0.3])         # entirely outside: clipped, then nothing left
        return [{"category_id": PERSON, "bbox": [1, 2, 3], "iscrowd": 0},
                {"category_id": PERSON, "bbox": [5, 5, 20, 40], "iscrowd": "yes"}]
    return []


def _render(sc: _Scene, rng) -> bytes:
    return encode(render_scene(STYLES[NAME], sc.width, sc.height, sc.draw, rng, occluders=int(rng.integers(1, 3))),
                  "JPEG", quality=90)


def _write_split(root: Path, split: str, n: int, seed: int) -> dict:
    truth = SplitTruth()
    folder = root / IMAGE_DIR[split]
    scenes: list[_Scene] = []
    broken_anns: list[dict] = []

    def store(sc: _Scene, data: bytes | None) -> None:
        if data is not None:
            path = folder / sc.file_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        scenes.append(sc)

    def expect_record(sc: _Scene) -> None:
        if sc.fixed:
            truth.count(truth.fixed, "box_clipped", sc.fixed)
        if sc.degenerate:
            truth.count(truth.skipped, "degenerate_box", sc.degenerate)
        truth.records[sc.key] = {"boxes": sc.persons, "ids": [-1] * len(sc.persons), "ignore": sc.ignore,
                                 "width": sc.width, "height": sc.height}

    for index in range(n):
        sc, rng = _scene(split, index, seed, sub="extra/" if index == 2 else "")
        if split == "train":
            broken_anns += [{**a, "image_id": index + 1} for a in _edge_cases(sc, seed)]
        store(sc, _render(sc, rng))
        expect_record(sc)
    if broken_anns:
        truth.count(truth.skipped, "malformed_annotation", len(broken_anns))
    raw_images: list = []
    if split == "train":
        raw_images = _special_images(split, n, seed, truth, store, expect_record)
    images, anns = [], []
    for i, sc in enumerate(scenes):
        w, h = sc.json_size or (sc.width, sc.height)
        images.append({"id": i + 1, "file_name": sc.file_name, "width": w, "height": h})
        anns += [{**a, "image_id": i + 1} for a in sc.anns]
    anns += broken_anns
    if split == "train":
        anns.append({"category_id": PERSON, "bbox": [1, 1, 20, 40], "iscrowd": 0, "image_id": 99999})
        truth.count(truth.skipped, "malformed_annotation")
    for k, a in enumerate(anns):
        a["id"] = 1000 + k
    stable_rng(seed, NAME, split, "order").shuffle(anns)     # annotation order never matters
    doc = {"info": {"description": "hybridps synthetic COCO-format persons"}, "licenses": [],
           "images": images + raw_images, "annotations": anns, "categories": CATEGORIES}
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "annotations" / ANNOTATION[split]).write_text(json.dumps(doc))
    return truth.as_dict()


def _special_images(split: str, n: int, seed: int, truth: SplitTruth, store, expect_record) -> list:
    """Images with no usable person, a missing file, a size mismatch and a
    truncated JPEG; returns two broken raw image entries to append."""
    cars, rng = _scene(split, n, seed, people=False)
    cars.add([30, 120, 80, 50], category=CAR)
    store(cars, _render(cars, rng))
    nobody, rng = _scene(split, n + 1, seed, people=False)
    store(nobody, _render(nobody, rng))
    truth.count(truth.skipped, "no_person", 2)
    missing, _ = _scene(split, n + 2, seed)
    store(missing, None)                               # annotated, never written
    truth.count(truth.skipped, "missing_file")
    resized, rng = _scene(split, n + 3, seed)
    resized.json_size = (resized.width * 2, resized.height * 2)   # annotated on a larger copy
    store(resized, _render(resized, rng))
    truth.count(truth.skipped, "malformed_annotation")
    broken, rng = _scene(split, n + 4, seed)
    data = _render(broken, rng)
    store(broken, data[: len(data) * 2 // 3])          # the header parses; the builder's EOI check drops it
    expect_record(broken)
    truth.builder_skipped.setdefault("corrupt_image", []).append(broken.key)
    truth.count(truth.skipped, "malformed_annotation", 2)
    return [{"id": 5000, "file_name": "../outside.jpg", "width": 10, "height": 10}, ["not", "an", "object"]]


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the fake COCO-format set under ``root``; return the ground truth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    return {"splits": {split: _write_split(root, split, SIZES[size][split], seed) for split in ("train", "val")},
            "category_id": PERSON}
