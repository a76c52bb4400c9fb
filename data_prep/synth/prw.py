"""Synthetic PRW-v16.04.20 release (frames, per-frame .mat annotations,
frame/ID index .mat files, CRLF query_info.txt, query_box crops).

Six cameras: c1-c5 share one frame size and c6 has a smaller, differently
shaped one (scaled-down analogues of 1920x1080 and 720x576).  Labeled people
recur across frames and cameras with a fixed look (the re-ID signal), next
to unlabeled (-2) passers-by, street furniture occluders and per-camera
lighting.  Both sizes carry the release's edge cases: every annotation
variable name (box_new / anno_file / anno_previous), negative-x boxes (in
annotations and in query_info.txt), boxes crossing the frame border, a
degenerate box, a frame with only -2 persons, fractional coordinates, CRLF
line endings, ID_test.mat's variable named ``ID_test2``, pid gaps and
training ids that also walk through test frames.

The returned truth holds what the parser must produce (boxes after the
standard clip-then-convert-then-truncate rule and border clipping) and the
expected protocol: queries (standard query-box rule) and, per query, the
gallery frames that contain the query person.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .render import STYLES, appearance_for, camera_light, encode, place_people, render_scene, stable_rng

NAME = "prw"
CAMERAS = (1, 2, 3, 4, 5, 6)
FRAME_SIZE = {cam: (320, 180) for cam in CAMERAS[:5]} | {6: (144, 116)}
BOX_VARIABLES = ("box_new", "anno_file", "anno_previous")
UNLABELED = -2

SIZES = {
    "tiny": {"train_frames": 22, "test_frames": 15, "train_ids": 6, "test_ids": 5, "queries": 8},
    "small": {"train_frames": 150, "test_frames": 80, "train_ids": 24, "test_ids": 16, "queries": 30},
    "bench": {"train_frames": 150, "test_frames": 120, "train_ids": 24, "test_ids": 40, "queries": 120},
}


@dataclass
class Person:
    pid: int                       # raw PRW pid, -2 = unlabeled
    xywh: tuple                    # raw annotation values (4 decimals)
    look_name: str


@dataclass
class Frame:
    name: str
    camera: int
    people: list[Person] = field(default_factory=list)

    @property
    def size(self) -> tuple[int, int]:
        return FRAME_SIZE[self.camera]


# --------------------------------------------------------------------------- planning
def _frame_names(rng, n: int, taken: set) -> list[tuple[str, int]]:
    names = []
    while len(names) < n:
        cam = int(CAMERAS[len(names) % len(CAMERAS)]) if len(names) < len(CAMERAS) else int(rng.integers(1, 7))
        name = f"c{cam}s{int(rng.integers(1, 5))}_{int(rng.integers(1, 200000)):06d}"
        if name not in taken:
            taken.add(name)
            names.append((name, cam))
    return sorted(names)


def _xywh(box) -> tuple:
    x1, y1, x2, y2 = box
    return (round(x1, 4), round(y1, 4), round(x2 - x1, 4), round(y2 - y1, 4))


def _pick_ids(rng, counts: dict, k: int) -> list[int]:
    """The k least-seen identities (random tie-break), so all recur."""
    order = sorted(counts, key=lambda p: (counts[p], rng.random()))
    chosen = order[:k]
    for p in chosen:
        counts[p] += 1
    return chosen


def _plan_split(rng, split: str, n_frames: int, ids: list[int], visitors: list[int], taken: set) -> list[Frame]:
    counts = {p: 0 for p in ids}
    frames = []
    for i, (name, cam) in enumerate(_frame_names(rng, n_frames, taken)):
        w, h = FRAME_SIZE[cam]
        frame = Frame(name, cam)
        labeled = [] if i == 1 else _pick_ids(rng, counts, int(rng.integers(1, 4)))
        if split == "test" and visitors and i % 5 == 4:
            labeled.append(int(rng.choice(visitors)))
        n_bg = 2 if i == 1 else int(rng.integers(0, 3))
        boxes = place_people(rng, w, h, len(labeled) + n_bg, min_h=0.35, max_h=0.85)
        pids = labeled + [UNLABELED] * n_bg
        for j, (pid, box) in enumerate(zip(pids, boxes)):
            look = f"p{pid}" if pid != UNLABELED else f"bg-{name}-{j}"
            frame.people.append(Person(pid, _xywh(box), look))
        frames.append(frame)
    _add_edge_cases(rng, frames)
    return frames


def _add_edge_cases(rng, frames: list[Frame]) -> None:
    """Frame 1 holds only -2 persons (set in planning); frame 2 a labeled
    person leaving through the left edge (negative x); frame 3 a degenerate
    box; frame 4 a person crossing the right and bottom borders."""
    left = frames[2].people[0]
    x, y, w, h = left.xywh
    left.xywh = (-round(0.25 * w + 1.7031, 4), y, w, h)
    frames[3].people.append(Person(UNLABELED, (40.25, 30.5, -1.5, 50.0), "degenerate"))
    fw, fh = frames[4].size
    cross = frames[4].people[0]
    x, y, w, h = cross.xywh
    cross.xywh = (round(fw - 0.6 * w, 4), round(fh - 0.9 * h, 4), w, h)


# --------------------------------------------------------------------------- expected parse
def expected_box(xywh, width: int, height: int):
    """(box or None, fixes, skip reason) under the standard rule: clip the
    raw values to >= 0, convert, truncate toward zero, clip to the frame."""
    x, y, w, h = (max(float(v), 0.0) for v in xywh)
    if w <= 0 or h <= 0:
        return None, [], "degenerate_box"
    fixes = ["box_shifted"] if (xywh[0] < 0 or xywh[1] < 0) else []
    raw = [math.trunc(x), math.trunc(y), math.trunc(x + w), math.trunc(y + h)]
    box = [float(min(raw[0], width)), float(min(raw[1], height)), float(min(raw[2], width)), float(min(raw[3], height))]
    if box != [float(v) for v in raw]:
        fixes.append("box_clipped")
    if box[2] - box[0] < 1 or box[3] - box[1] < 1:
        return None, fixes, "degenerate_box"
    return box, fixes, None


def _expected_split(frames: list[Frame]) -> dict:
    records, skipped, fixed = {}, {}, {}
    for frame in frames:
        w, h = frame.size
        boxes, ids = [], []
        for person in frame.people:
            box, fixes, skip = expected_box(person.xywh, w, h)
            for f in fixes:
                fixed[f] = fixed.get(f, 0) + 1
            if skip:
                skipped[skip] = skipped.get(skip, 0) + 1
                continue
            boxes.append(box)
            ids.append(-1 if person.pid == UNLABELED else person.pid)
        records[frame.name] = {"boxes": boxes, "ids": ids, "ignore": [], "width": w, "height": h,
                               "camera": frame.camera}
    return {"records": records, "skipped": skipped, "fixed": fixed}


# --------------------------------------------------------------------------- queries
def _choose_queries(rng, frames: list[Frame], n_queries: int, test_ids: list[int]) -> list[tuple[int, str, tuple]]:
    """(pid, frame, xywh) per query: every test id at least once, only
    persons that appear in another test frame, the negative-x person always."""
    occurrences = {}
    for frame in frames:
        for person in frame.people:
            if person.pid in test_ids and person.xywh[2] > 0:
                occurrences.setdefault(person.pid, []).append((frame.name, person.xywh))
    candidates = [(pid, f, xywh) for pid, occ in occurrences.items() if len(occ) >= 2 for f, xywh in occ]
    forced = [c for c in candidates if c[2][0] < 0]
    chosen = list(forced)
    for pid in test_ids:
        if not any(c[0] == pid for c in chosen):
            own = [c for c in candidates if c[0] == pid]
            if own:
                chosen.append(own[int(rng.integers(len(own)))])
    rest = [c for c in candidates if c not in chosen]
    rng.shuffle(rest)
    chosen += rest[: max(0, n_queries - len(chosen))]
    return sorted(chosen, key=lambda c: (c[0], c[1]))


def standard_query_box(xywh_text: list[str]) -> list[float]:
    x, y, w, h = (float(v) for v in xywh_text)
    return [float(max(math.trunc(v), 0)) for v in (x, y, x + w, y + h)]


def _expected_protocol(queries, test_truth: dict) -> dict:
    out_queries, positives = [], []
    gallery = list(test_truth["records"])
    for pid, frame, xywh in queries:
        out_queries.append({"image_key": frame, "pid": pid, "camera": int(frame[1]),
                            "box": standard_query_box([f"{v:.4f}" for v in xywh])})
        hits = []
        for key, rec in test_truth["records"].items():
            if key != frame and pid in rec["ids"]:
                hits.append([key, rec["boxes"][rec["ids"].index(pid)]])
        positives.append(hits)
    return {"queries": out_queries, "gallery": gallery, "positives": positives}


# --------------------------------------------------------------------------- writing
def _cell(names: list[str]) -> np.ndarray:
    cell = np.empty((len(names), 1), dtype=object)
    for i, n in enumerate(names):
        cell[i, 0] = np.array([n])
    return cell


def _render(frame: Frame, seed: int) -> np.ndarray:
    w, h = frame.size
    rng = stable_rng(NAME, seed, "pixels", frame.name)
    people = []
    for p in frame.people:
        x, y, bw, bh = p.xywh
        if bw > 0 and bh > 0:
            people.append((appearance_for(seed, NAME, p.look_name), [x, y, x + bw, y + bh]))
    return render_scene(STYLES[NAME], w, h, people, rng, occluders=int(rng.integers(0, 3)),
                        light=camera_light(seed, NAME, frame.camera))


def _write_frames(root: Path, frames: list[Frame], seed: int, index_offset: int) -> dict[str, np.ndarray]:
    import scipy.io

    images = {}
    for i, frame in enumerate(frames):
        img = _render(frame, seed)
        images[frame.name] = img
        (root / "frames" / f"{frame.name}.jpg").write_bytes(encode(img))
        anno = np.array([[p.pid, *p.xywh] for p in frame.people], dtype=np.float64).reshape(-1, 5)
        variable = BOX_VARIABLES[(i + index_offset) % len(BOX_VARIABLES)]
        scipy.io.savemat(str(root / "annotations" / f"{frame.name}.jpg.mat"), {variable: anno})
    return images


def _write_queries(root: Path, queries, images: dict) -> None:
    from PIL import Image

    lines = []
    for pid, frame, xywh in queries:
        lines.append(f"{pid} {xywh[0]:.4f} {xywh[1]:.4f} {xywh[2]:.4f} {xywh[3]:.4f} {frame}")
        x1, y1, x2, y2 = (int(v) for v in standard_query_box([f"{v:.4f}" for v in xywh]))
        crop = images[frame][y1:y2, x1:x2]
        Image.fromarray(crop).save(root / "query_box" / f"{pid}_{frame}.jpg", quality=90)
    (root / "query_info.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write a PRW-v16.04.20-like release under ``root``; return the truth
    (CONTRACTS section 2) plus ``protocol``, ``train_ids`` and ``test_ids``."""
    import scipy.io

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    cfg = SIZES[size]
    root = Path(root)
    for sub in ("frames", "annotations", "query_box"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = stable_rng(NAME, seed, size)
    pids = [int(p) for p in rng.choice(np.arange(1, 934), cfg["train_ids"] + cfg["test_ids"], replace=False)]
    train_ids, test_ids = sorted(pids[: cfg["train_ids"]]), sorted(pids[cfg["train_ids"]:])
    taken: set = set()
    train = _plan_split(rng, "train", cfg["train_frames"], train_ids, [], taken)
    test = _plan_split(rng, "test", cfg["test_frames"], test_ids, train_ids, taken)
    queries = _choose_queries(rng, test, cfg["queries"], test_ids)

    _write_frames(root, train, seed, 0)
    test_images = _write_frames(root, test, seed, 1)
    _write_queries(root, queries, test_images)
    scipy.io.savemat(str(root / "frame_train.mat"), {"img_index_train": _cell([f.name for f in train])})
    scipy.io.savemat(str(root / "frame_test.mat"), {"img_index_test": _cell([f.name for f in test])})
    scipy.io.savemat(str(root / "ID_train.mat"), {"ID_train": np.array([train_ids], dtype=np.float64)})
    scipy.io.savemat(str(root / "ID_test.mat"), {"ID_test2": np.array([test_ids], dtype=np.float64)})

    splits = {"train": _expected_split(train), "test": _expected_split(test)}
    return {
        "splits": splits,
        "protocol": _expected_protocol(queries, splits["test"]),
        "train_ids": train_ids,
        "test_ids": test_ids,
        "box_variables": {s: sorted({BOX_VARIABLES[(i + off) % 3] for i in range(len(fr))})
                          for s, fr, off in (("train", train, 0), ("test", test, 1))},
    }
