"""PoseTrack21, person-search split (COCO-like json).

Layout (docs/datasets.md section 4)::

    root/images/{train,val}/<video>/<frame>.jpg
    root/posetrack_person_search/{train.json, val.json, query.json}
        (some third-party code keeps them under root/annotations/posetrack_person_search/;
         both places are accepted)

Each json has ``images`` (id, file_name relative to root, frame_id, vid_id,
optional ignore_regions_x/y polygons) and ``annotations`` (bbox [x, y, w, h],
image_id, person_id, track_id, ...).  Splits: ``train`` = train.json,
``test`` = val.json (the gallery, in val.json image order).  query.json: every
annotation is one query.

``Record.ids`` is the raw ``person_id`` (-1 where an annotation has none or a
negative one).  The OIM LUT size is the number of distinct train person_ids
(:func:`num_train_ids`); the published counts (5,474 / 5,381 / 5,222)
disagree, so it is always computed, never hard-coded.  There are no camera
ids; the video id goes to ``Record.extra["video"]``.  Ignore regions become
their polygon's bounding box, clipped to the frame.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from ..protocol import GalleryImage, Protocol, Query
from ..imageio import header_size_or_reason
from ..record import ImageRef, ParseItem, Record, Skip, box_is_degenerate, clip_box, fit_box, safe_key

NAME = "posetrack21"
ORDER = 90          # position in listings (hybridps.registry)
TASK = "ps"
LABELED = True
SPLITS = ("train", "test")
DEFAULT_SPLITS = ("train",)
LICENSE_NOTICE = "PoseTrack21: research use only, under the PoseTrack terms (Doering et al., CVPR 2022)."

SPLIT_FILES = {"train": "train.json", "test": "val.json", "query": "query.json"}
ANNOTATION_DIRS = (Path("posetrack_person_search"), Path("annotations") / "posetrack_person_search")


def annotation_dir(root) -> Path:
    """The folder holding train/val/query.json (either accepted place)."""
    root = Path(root)
    for rel in ANNOTATION_DIRS:
        if (root / rel).is_dir():
            return root / rel
    tried = " or ".join(str(root / rel) for rel in ANNOTATION_DIRS)
    raise FileNotFoundError(f"PoseTrack21: no person-search annotation folder ({tried})")


def load_json(root, which: str) -> dict:
    """train | test | query json, checked for the COCO-like top-level keys."""
    path = annotation_dir(root) / SPLIT_FILES[which]
    if not path.is_file():
        raise FileNotFoundError(f"PoseTrack21: missing {path}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"PoseTrack21: {path} is not valid json: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "annotations")):
        raise ValueError(f"PoseTrack21: {path} needs 'images' and 'annotations' lists")
    return data


def image_key(file_name: str) -> str:
    """``images/train/000001_bonn_train/000000.jpg`` -> ``000001_bonn_train_000000``."""
    parts = Path(file_name).with_suffix("").parts
    if len(parts) >= 3 and parts[0] == "images":
        parts = parts[2:]
    return safe_key("_".join(parts))


def person_id(ann: dict) -> int:
    pid = ann.get("person_id")
    if pid is None:
        return -1
    pid = int(pid)
    return pid if pid >= 0 else -1


def num_train_ids(root) -> int:
    """Distinct labeled train person_ids: the OIM LUT size."""
    return len({pid for ann in load_json(root, "train")["annotations"] if (pid := person_id(ann)) >= 0})


def _xyxy(bbox) -> list[float]:
    x, y, w, h = (float(v) for v in bbox)
    return [x, y, x + w, y + h]


def _image_size(root: Path, image: dict):
    if image.get("width") and image.get("height"):
        return int(image["width"]), int(image["height"])
    return header_size_or_reason(root / image["file_name"])


def _ignore_regions(image: dict, width: int, height: int) -> list[list[float]]:
    regions = []
    for xs, ys in zip(image.get("ignore_regions_x") or [], image.get("ignore_regions_y") or []):
        if not xs or len(xs) != len(ys):
            continue
        box = clip_box([min(xs), min(ys), max(xs), max(ys)], width, height)
        if not box_is_degenerate(box):
            regions.append(box)
    return regions


def parse(root, split: str, **options) -> Iterator[ParseItem]:
    """Yield one Record per image of ``split`` ("train" | "test"), in json order."""
    if split not in SPLITS:
        raise ValueError(f"PoseTrack21: unknown split {split!r}; expected one of {SPLITS}")
    root = Path(root)
    data = load_json(root, split)
    by_image: dict = {}
    for ann in data["annotations"]:
        if not isinstance(ann, dict) or "image_id" not in ann or len(ann.get("bbox") or []) != 4:
            yield Skip(NAME, split, "malformed_annotation", SPLIT_FILES[split], f"annotation {ann!r:.80}")
            continue
        by_image.setdefault(ann["image_id"], []).append(ann)
    for image in data["images"]:
        yield from _record(root, split, image, by_image.get(image.get("id"), []))


def _record(root: Path, split: str, image: dict, anns: list[dict]) -> Iterator[ParseItem]:
    source = str(image.get("file_name", ""))
    if not source or "id" not in image:
        yield Skip(NAME, split, "malformed_annotation", SPLIT_FILES[split], f"image entry {image!r:.80}")
        return
    size = _image_size(root, image)
    if isinstance(size, str):
        yield Skip(NAME, split, size, source)
        return
    width, height = size
    boxes, ids = [], []
    for ann in anns:
        x, y, w, h = (float(v) for v in ann["bbox"])
        if w <= 0 or h <= 0:
            yield Skip(NAME, split, "degenerate_box", source, f"bbox={ann['bbox']}")
            continue
        clipped, notes = fit_box(_xyxy(ann["bbox"]), width, height, NAME, split, source,
                                 f"outside the frame: bbox={ann['bbox']}")
        yield from notes
        if clipped is None:
            continue
        boxes.append(clipped)
        ids.append(person_id(ann))
    if not boxes:
        yield Skip(NAME, split, "no_person", source)
        return
    yield Record(
        dataset=NAME, split=split, key=image_key(source), image=ImageRef("file", str(root / source)),
        task=TASK, labeled=LABELED, boxes=boxes, ids=ids, ignore=_ignore_regions(image, width, height),
        width=width, height=height, camera=None, source=source,
        extra={"video": image.get("vid_id"), "frame_id": image.get("frame_id"), "image_id": image["id"]},
    )


def load_protocol(root, gallery_size=None) -> Protocol:
    """PoseTrack21 person-search protocol: one query per query.json
    annotation (file order, raw person_id, xyxy box as given); the gallery is
    every val.json frame (val.json order) except each query's own frame, so
    ``per_query_gallery`` is None."""
    if gallery_size not in (None, -1, "full"):
        raise ValueError(f"PoseTrack21: the gallery is always the whole val set; gallery_size={gallery_size!r} is not supported")
    root = Path(root)
    gallery = [
        GalleryImage(key=r.key, image=r.image, boxes=r.boxes, pids=r.ids, camera=None)
        for r in parse(root, "test")
        if isinstance(r, Record)
    ]
    data = load_json(root, "query")
    images = {im.get("id"): im for im in data["images"]}
    queries = []
    for ann in data["annotations"]:
        image = images.get(ann.get("image_id"))
        if image is None or len(ann.get("bbox") or []) != 4:
            raise ValueError(f"PoseTrack21: query annotation {ann.get('id')!r} has no image entry or no 4-value bbox")
        queries.append(Query(
            index=len(queries), image_key=image_key(image["file_name"]),
            image=ImageRef("file", str(root / image["file_name"])), box=_xyxy(ann["bbox"]),
            pid=person_id(ann), camera=None,
        ))
    return Protocol(dataset=NAME, queries=queries, gallery=gallery, per_query_gallery=None, gallery_size=None,
                    notes={"ignore_cam_id": True})
