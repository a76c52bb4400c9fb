"""Synthetic PoseTrack21 person-search release: ``images/{train,val}/<video>/
<frame>.jpg`` and ``posetrack_person_search/{train,val,query}.json``
(COCO-like: images / annotations / categories).

Each video follows 2-3 people along a track; identities (``person_id``) are
global and recur across videos of the same split, always with the same look.
Both sizes carry: ignore regions (``ignore_regions_x/y`` polygons, one
crossing the frame border), a box crossing the frame border, a degenerate
(zero-width) box, fractional boxes, and a query.json whose every annotation is
one query located in a val frame.  Image entries carry no width/height (as in
the release), so the parser reads them from the files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .render import STYLES, appearance_for, camera_light, encode, place_people, render_scene, stable_rng

NAME = "posetrack21"
FRAME_SIZE = (320, 180)
KEYPOINT_NAMES = (
    "nose", "head_bottom", "head_top", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
# Keypoint positions as fractions of the person box (x, y), matching the drawn figure.
_KEYPOINT_FRACTIONS = (
    (0.5, 0.1), (0.5, 0.18), (0.5, 0.01), (0.4, 0.1), (0.6, 0.1), (0.3, 0.2), (0.7, 0.2), (0.2, 0.38),
    (0.8, 0.38), (0.2, 0.55), (0.8, 0.55), (0.35, 0.57), (0.65, 0.57), (0.35, 0.77), (0.65, 0.77),
    (0.35, 0.96), (0.65, 0.96),
)

SIZES = {
    "tiny": {"videos": {"train": 3, "val": 2}, "frames": 8, "ids": {"train": 7, "val": 6}, "queries": 8},
    "small": {"videos": {"train": 12, "val": 8}, "frames": 10, "ids": {"train": 28, "val": 20}, "queries": 30},
}


# --------------------------------------------------------------------------- planning
def _tracks(rng, ids: list[int], load: dict, n_frames: int) -> list[dict]:
    """2-3 people per video, least-used ids first, each moving linearly."""
    chosen = sorted(ids, key=lambda p: (load[p], rng.random()))[: int(rng.integers(2, 4))]
    w, h = FRAME_SIZE
    starts = place_people(rng, w, h, len(chosen), min_h=0.35, max_h=0.8)
    tracks = []
    for t, (pid, box) in enumerate(zip(chosen, starts)):
        load[pid] += 1
        tracks.append({"pid": pid, "track": t, "box": box, "vx": float(rng.uniform(-4, 4)),
                       "present": [bool(rng.random() > 0.15) or t == 0 or f == 0 for f in range(n_frames)]})
    return tracks


def _bbox_at(track: dict, f: int, rng) -> list[float]:
    x1, y1, x2, y2 = track["box"]
    dx = track["vx"] * f + float(rng.uniform(-1, 1))
    return [round(x1 + dx, 2), round(y1 + float(rng.uniform(-1, 1)), 2), round(x2 - x1, 2), round(y2 - y1, 2)]


def _keypoints(bbox) -> list[float]:
    x, y, w, h = bbox
    out = []
    for fx, fy in _KEYPOINT_FRACTIONS:
        out += [round(x + fx * w, 2), round(y + fy * h, 2), 1]
    return out


def _plan_split(rng, split: str, cfg: dict, ids: list[int], first_video: int) -> tuple[list[dict], list[dict]]:
    images, anns = [], []
    load = {p: 0 for p in ids}
    source = "bonn" if split == "train" else "mpii"
    tag = "train" if split == "train" else "test"
    for v in range(cfg["videos"][split]):
        vid_num = first_video + v
        video = f"{vid_num:06d}_{source}_{tag}"
        tracks = _tracks(rng, ids, load, cfg["frames"])
        for f in range(cfg["frames"]):
            image_id = int(f"1{vid_num:06d}{f:04d}")
            images.append({"id": image_id, "file_name": f"images/{split}/{video}/{f:06d}.jpg", "frame_id": image_id,
                           "vid_id": f"{vid_num:06d}", "nframes": cfg["frames"], "is_labeled": True,
                           "has_labeled_person": True, "ignore_regions_x": [], "ignore_regions_y": []})
            for tr in tracks:
                if tr["present"][f]:
                    bbox = _bbox_at(tr, f, rng)
                    anns.append({"bbox": bbox, "image_id": image_id, "person_id": tr["pid"], "track_id": tr["track"],
                                 "category_id": 1, "keypoints": _keypoints(bbox),
                                 "bbox_head": [bbox[0] + 0.3 * bbox[2], bbox[1], 0.4 * bbox[2], 0.2 * bbox[3]]})
    _add_edge_cases(images, anns)
    for j, a in enumerate(anns):
        a["id"] = first_video * 100000 + j
    return images, anns


def _add_edge_cases(images: list[dict], anns: list[dict]) -> None:
    """Frame 0: two ignore regions (one crossing the left border); frame 2:
    a person crossing the right border; frame 3: a zero-width box."""
    w, h = FRAME_SIZE
    images[0]["ignore_regions_x"] = [[-12.0, 40.5, 40.5, -12.0], [200.0, 260.0, 230.0]]
    images[0]["ignore_regions_y"] = [[10.0, 10.0, 90.25, 90.25], [20.0, 20.0, 70.0]]
    crossing = next(a for a in anns if a["image_id"] == images[2]["id"])
    crossing["bbox"][0] = round(w - 0.5 * crossing["bbox"][2], 2)
    crossing["keypoints"] = _keypoints(crossing["bbox"])
    donor = next(a for a in anns if a["image_id"] == images[3]["id"])
    anns.append({**donor, "bbox": [55.0, 40.0, 0.0, 60.0], "keypoints": [0.0] * 51})


# --------------------------------------------------------------------------- truth
def _key(file_name: str) -> str:
    parts = Path(file_name).with_suffix("").parts[2:]
    return "_".join(parts)


def _expected_split(images: list[dict], anns: list[dict]) -> dict:
    w, h = FRAME_SIZE
    records, skipped, fixed = {}, {}, {}
    for im in images:
        boxes, ids = [], []
        for a in (a for a in anns if a["image_id"] == im["id"]):
            x, y, bw, bh = a["bbox"]
            if bw <= 0 or bh <= 0:
                skipped["degenerate_box"] = skipped.get("degenerate_box", 0) + 1
                continue
            box = [x, y, x + bw, y + bh]
            clipped = [max(box[0], 0.0), max(box[1], 0.0), min(box[2], float(w)), min(box[3], float(h))]
            if clipped != box:
                fixed["box_clipped"] = fixed.get("box_clipped", 0) + 1
            boxes.append(clipped)
            ids.append(a["person_id"])
        ignore = [[max(min(xs), 0.0), max(min(ys), 0.0), min(max(xs), float(w)), min(max(ys), float(h))]
                  for xs, ys in zip(im["ignore_regions_x"], im["ignore_regions_y"])]
        records[_key(im["file_name"])] = {"boxes": boxes, "ids": ids, "ignore": ignore, "width": w, "height": h}
    return {"records": records, "skipped": skipped, "fixed": fixed}


def _choose_queries(rng, images: list[dict], anns: list[dict], n: int) -> list[dict]:
    """Query annotations: boxes fully inside the frame, one per person first."""
    w, h = FRAME_SIZE
    inside = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][0] >= 0 and a["bbox"][1] >= 0
              and a["bbox"][0] + a["bbox"][2] <= w and a["bbox"][1] + a["bbox"][3] <= h]
    order = list(rng.permutation(len(inside)))
    chosen, seen = [], set()
    for j in order:
        if inside[j]["person_id"] not in seen:
            seen.add(inside[j]["person_id"])
            chosen.append(inside[j])
    chosen += [inside[j] for j in order if inside[j] not in chosen][: max(0, n - len(chosen))]
    return [{**a, "id": 900000000 + q} for q, a in enumerate(chosen[:n])]


def _expected_protocol(images: list[dict], queries: list[dict], val_truth: dict) -> dict:
    key_of = {im["id"]: _key(im["file_name"]) for im in images}
    out, positives = [], []
    for q in queries:
        x, y, bw, bh = q["bbox"]
        key = key_of[q["image_id"]]
        out.append({"image_key": key, "box": [x, y, x + bw, y + bh], "pid": q["person_id"]})
        positives.append([[k, r["boxes"][r["ids"].index(q["person_id"])]]
                          for k, r in val_truth["records"].items() if k != key and q["person_id"] in r["ids"]])
    return {"queries": out, "gallery": list(val_truth["records"]), "positives": positives}


# --------------------------------------------------------------------------- writing
def _write_images(root: Path, seed: int, images: list[dict], anns: list[dict]) -> None:
    w, h = FRAME_SIZE
    for im in images:
        people = [(appearance_for(seed, NAME, a["person_id"]), [a["bbox"][0], a["bbox"][1],
                   a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]])
                  for a in anns if a["image_id"] == im["id"] and a["bbox"][2] > 0]
        rng = stable_rng(NAME, seed, "pixels", im["id"])
        img = render_scene(STYLES[NAME], w, h, people, rng, occluders=int(rng.integers(0, 2)),
                           light=camera_light(seed, NAME, im["vid_id"]))
        path = root / im["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(img))


def _coco(images, anns) -> dict:
    return {"images": images, "annotations": anns,
            "categories": [{"supercategory": "person", "id": 1, "name": "person", "keypoints": list(KEYPOINT_NAMES)}]}


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write a PoseTrack21 person-search-like release under ``root``; return
    the truth (CONTRACTS section 2, splits "train" and "test" = val.json)
    plus ``protocol`` and ``num_train_ids``."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    cfg = SIZES[size]
    root = Path(root)
    rng = stable_rng(NAME, seed, size)
    pids = [int(p) for p in rng.choice(np.arange(1, 20000), cfg["ids"]["train"] + cfg["ids"]["val"], replace=False)]
    train_ids, val_ids = pids[: cfg["ids"]["train"]], pids[cfg["ids"]["train"]:]
    train_images, train_anns = _plan_split(rng, "train", cfg, train_ids, 1)
    val_images, val_anns = _plan_split(rng, "val", cfg, val_ids, 500)
    queries = _choose_queries(rng, val_images, val_anns, cfg["queries"])
    query_image_ids = {q["image_id"] for q in queries}

    _write_images(root, seed, train_images + val_images, train_anns + val_anns)
    out = root / "posetrack_person_search"
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps(_coco(train_images, train_anns)))
    (out / "val.json").write_text(json.dumps(_coco(val_images, val_anns)))
    (out / "query.json").write_text(json.dumps(_coco([im for im in val_images if im["id"] in query_image_ids], queries)))

    splits = {"train": _expected_split(train_images, train_anns), "test": _expected_split(val_images, val_anns)}
    return {
        "splits": splits,
        "protocol": _expected_protocol(val_images, queries, splits["test"]),
        "num_train_ids": len({a["person_id"] for a in train_anns}),
    }
