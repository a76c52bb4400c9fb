"""A fake EuroCity Persons in the release layout (see data_prep/formats/ecp.py).

Layout written under ``root`` (which plays ``ECP/``)::

    day/img/{train,val}/<city>/<city>_NNNNN.png
    day/labels/{train,val}/<city>/<city>_NNNNN.json
    night/img/{train,val}/...   night/labels/{train,val}/...

Frames are 320x176 street scenes (the real ones are 1920x1024); the JSON
states the size it was drawn at, as the format allows.  Edge cases (both
sizes): a pedestrian ``occluded>40``, a rider with a ``bicycle`` child, a
rider without one, both ``*-far-away`` groups, a ``depiction`` group, a
``depiction`` pedestrian, a parked top-level ``bicycle``, ``sitting-lying``
and ``behind-glass`` pedestrians, ``Orient`` spelling, an unknown identity, a
box leaving the frame, a frame with ``children: []``, a label whose image is
missing and a label file that is not JSON.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from .render import STYLES, appearance_for, place_people, render_scene, stable_rng

NAME = "ecp"
WIDTH, HEIGHT = 320, 176
# (time, split) -> frames per city; cities per (time, split)
SIZES = {
    "tiny": {("day", "train"): 5, ("day", "val"): 3, ("night", "train"): 3, ("night", "val"): 2},
    "small": {("day", "train"): 24, ("day", "val"): 12, ("night", "train"): 14, ("night", "val"): 8},
}
CITIES = {"train": ("testcity", "berlin"), "val": ("wuerzburg",)}


def _obj(identity: str, box, tags=(), children=(), orient=None, orient_key="orient") -> dict:
    x0, y0, x1, y1 = (round(float(v), 1) for v in box)
    obj = {"identity": identity, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
           "tags": list(tags), "children": list(children)}
    if orient is not None:
        obj[orient_key] = float(orient)
    return obj


def _clip(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [min(max(x0, 0.0), WIDTH), min(max(y0, 0.0), HEIGHT), min(max(x1, 0.0), WIDTH), min(max(y1, 0.0), HEIGHT)]


class _Frame:
    """Objects of one frame plus what parsing them must give."""

    def __init__(self):
        self.children: list[dict] = []
        self.draw: list[tuple] = []
        self.persons: list[list[float]] = []
        self.orients: list = []
        self.ignore: list[list[float]] = []
        self.skipped: dict[str, int] = {}
        self.fixed: dict[str, int] = {}

    def _note(self, table, reason):
        table[reason] = table.get(reason, 0) + 1

    def _expect(self, obj: dict, target: list) -> bool:
        box = [obj["x0"], obj["y0"], obj["x1"], obj["y1"]]
        clipped = _clip(box)
        if clipped != box:
            self._note(self.fixed, "box_clipped")
        target.append(clipped)
        return True

    def person(self, obj: dict, look, ignored: bool = False, orient=None) -> None:
        self.children.append(obj)
        self.draw.append((look, [obj["x0"], obj["y0"], obj["x1"], obj["y1"]]))
        if ignored:
            self._expect(obj, self.ignore)
        else:
            self._expect(obj, self.persons)
            self.orients.append(orient)

    def region(self, obj: dict, dropped: bool = False) -> None:
        self.children.append(obj)
        if dropped:
            self._note(self.skipped, "depiction")
        else:
            self._expect(obj, self.ignore)

    def other(self, obj: dict, unknown: bool = False) -> None:
        self.children.append(obj)
        if unknown:
            self._note(self.skipped, "unknown_class")


def _street(frame: _Frame, rng, seed: int, tag: str) -> None:
    """Ordinary walking pedestrians, a few crossing the frame edge."""
    n = int(rng.integers(2, 6))
    for j, box in enumerate(place_people(rng, WIDTH, HEIGHT, n, 0.25, 0.7, allow_outside=True)):
        orient = float(rng.integers(0, 360))
        occl = ["occluded>10"] if rng.random() < 0.3 else []
        frame.person(_obj("pedestrian", box, occl, orient=orient), appearance_for(seed, NAME, f"{tag}/{j}"), orient=orient)


def _edge_cases(frame: _Frame, case: str, seed: int, tag: str) -> None:
    look = appearance_for(seed, NAME, f"{tag}/{case}")
    if case == "occluded40":
        frame.person(_obj("pedestrian", [20, 40, 50, 120], ["occluded>40"], orient=10.0), look, orient=10.0)
    elif case == "rider_bicycle":
        bike = _obj("bicycle", [95, 80, 150, 130], orient=90.0)
        frame.person(_obj("rider", [105, 45, 140, 115], children=[bike], orient=45.0), look, orient=90.0)
    elif case == "rider_alone":
        frame.person(_obj("rider", [160, 50, 185, 118], orient=200.0), look, orient=200.0)
    elif case == "far_away":
        frame.region(_obj("person-group-far-away", [230, 60, 260, 75]))
    elif case == "rider_group":
        frame.region(_obj("rider+vehicle-group-far-away", [262, 62, 290, 76]))
    elif case == "depiction_group":
        frame.region(_obj("person-group-far-away", [5, 5, 40, 30], ["depiction"]), dropped=True)
    elif case == "depiction_person":
        frame.person(_obj("pedestrian", [280, 10, 300, 50], ["depiction"]), look, ignored=True)
    elif case == "parked_bicycle":
        frame.other(_obj("bicycle", [200, 120, 240, 150]))
    elif case == "sitting":
        frame.person(_obj("pedestrian", [60, 100, 90, 140], ["sitting-lying"]), look, ignored=True)
    elif case == "behind_glass":
        frame.person(_obj("pedestrian", [190, 70, 205, 110], ["behind-glass"]), look, ignored=True)
    elif case == "Orient":
        frame.person(_obj("pedestrian", [240, 80, 265, 150], orient=315.0, orient_key="Orient"), look, orient=315.0)
    elif case == "unknown":
        frame.other(_obj("dog", [150, 150, 170, 165]), unknown=True)
    elif case == "border":
        frame.person(_obj("pedestrian", [-12.5, 90, 18, 180], orient=0.0), look, orient=0.0)


# (time, split, city index, frame index) -> edge cases of that frame
CASES = {
    ("day", "train", 0, 0): ("occluded40", "rider_bicycle", "far_away", "depiction_group", "parked_bicycle",
                             "sitting", "Orient"),
    ("day", "train", 0, 1): ("rider_alone", "rider_group", "depiction_person", "behind_glass", "unknown", "border"),
    ("night", "val", 0, 0): ("rider_bicycle", "far_away", "sitting", "Orient"),
}


def _png(pixels) -> bytes:
    # fast zlib level: noisy synthetic pixels barely compress, level 6 only costs time
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_frame(root: Path, time: str, split: str, city: str, stem: str, frame: _Frame, rng, image: bool) -> None:
    labels = root / time / "labels" / split / city
    labels.mkdir(parents=True, exist_ok=True)
    doc = {"identity": "frame", "imagewidth": WIDTH, "imageheight": HEIGHT, "tags": [], "children": frame.children}
    (labels / f"{stem}.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
    if image:
        style = STYLES["ecp_night" if time == "night" else "ecp"]
        pixels = render_scene(style, WIDTH, HEIGHT, frame.draw, rng, occluders=int(rng.integers(0, 3)))
        folder = root / time / "img" / split / city
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}.png").write_bytes(_png(pixels))


class _SplitTruth:
    def __init__(self):
        self.records, self.orient, self.skipped, self.fixed = {}, {}, {}, {}

    def count(self, table: dict, reason: str, n: int = 1) -> None:
        table[reason] = table.get(reason, 0) + n

    def add(self, key: str, frame: _Frame) -> None:
        for table, notes in ((self.skipped, frame.skipped), (self.fixed, frame.fixed)):
            for reason, n in notes.items():
                self.count(table, reason, n)
        if not frame.persons:
            self.count(self.skipped, "no_person")
            return
        self.records[key] = {"boxes": frame.persons, "ids": [-1] * len(frame.persons),
                             "ignore": frame.ignore, "width": WIDTH, "height": HEIGHT}
        self.orient[key] = frame.orients


def _write_city(root, time, split, ci, city, n, seed, truth: _SplitTruth) -> None:
    for fi in range(n):
        stem = f"{city}_{fi:05d}"
        rng = stable_rng(seed, NAME, time, split, city, fi)
        frame = _Frame()
        _street(frame, rng, seed, f"{time}/{split}/{stem}")
        for case in CASES.get((time, split, ci, fi), ()):
            _edge_cases(frame, case, seed, f"{time}/{split}/{stem}")
        _write_frame(root, time, split, city, stem, frame, rng, image=True)
        truth.add(f"{time}_{city}_{stem}", frame)


def _write_specials(root: Path, time: str, split: str, n: int, seed: int, truth: _SplitTruth) -> None:
    """Empty frame, label without image, unreadable label (first city only)."""
    city = CITIES[split][0]
    rng = stable_rng(seed, NAME, time, split, "specials")
    _write_frame(root, time, split, city, f"{city}_{n:05d}", _Frame(), rng, image=True)
    truth.count(truth.skipped, "no_person")
    if time == "day":
        lonely = _Frame()
        _street(lonely, rng, seed, f"{time}/{split}/lonely")
        _write_frame(root, time, split, city, f"{city}_{n + 1:05d}", lonely, rng, image=False)
        truth.count(truth.skipped, "missing_file")
        stem = f"{city}_{n + 2:05d}"
        _write_frame(root, time, split, city, stem, _Frame(), rng, image=True)
        label = root / time / "labels" / split / city / f"{stem}.json"
        label.write_text('{"identity": "frame", "imagewidth": 320, "children": [', encoding="utf-8")
        truth.count(truth.skipped, "malformed_annotation")


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the fake ECP under ``root`` (as ``ECP/``); return the ground truth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    root = Path(root)
    truths = {split: _SplitTruth() for split in ("train", "val")}
    for (time, split), n in SIZES[size].items():
        for ci, city in enumerate(CITIES[split]):
            _write_city(root, time, split, ci, city, n, seed, truths[split])
        _write_specials(root, time, split, n, seed, truths[split])
    return {
        "splits": {s: {"records": t.records, "skipped": t.skipped, "fixed": t.fixed} for s, t in truths.items()},
        "orient": {s: t.orient for s, t in truths.items()},
        "image_size_in_json": [WIDTH, HEIGHT],
        "edge_cases": {"frame0": "day_testcity_testcity_00000", "frame1": "day_testcity_testcity_00001",
                       "night": "night_wuerzburg_wuerzburg_00000"},
    }
