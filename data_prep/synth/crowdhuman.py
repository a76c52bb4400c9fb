"""A fake CrowdHuman in the release layout (see data_prep/formats/crowdhuman.py).

Layout written under ``root`` (mixing the per-zip and merged extractions)::

    annotation_train.odgt, annotation_val.odgt
    CrowdHuman_train01/Images/<ID>.jpg     even train images
    Images/<ID>.jpg                        odd train images (merged extraction)
    CrowdHuman_val/Images/<ID>.jpg

Crowded scenes of 4-10 people at different scales, some crossing the border,
with poles/boxes occluding them.  Edge cases (both sizes): IDs with commas, a
person with ``extra.ignore=1``, a ``mask`` crowd region, an fbox at negative
x, ``head_attr.ignore=1`` on a valid body, a negative-height fbox, an fbox
entirely outside the image, an empty ``gtboxes``, a mask-only image, a
malformed line, a record whose image is missing, and a truncated JPEG (the
parser yields it; the builder drops it as ``corrupt_image``).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .render import STYLES, appearance_for, encode, place_people, render_scene, stable_rng
from .truth import SplitTruth

NAME = "crowdhuman"
SIZES = {"tiny": {"train": 10, "val": 4}, "small": {"train": 56, "val": 20}}
SCENE_SIZES = ((320, 240), (288, 216), (256, 240), (320, 200))


def _image_id(split: str, index: int) -> str:
    digest = hashlib.sha256(f"{split}/{index}".encode()).hexdigest()[:15]
    return f"{(273271 if split == 'train' else 284193) + index},{digest}"


def _key(image_id: str) -> str:
    # the format's key rule, spelled out independently of the parser
    return image_id.replace(",", "_")


def _clip(box_xyxy, w: int, h: int) -> list[float]:
    x1, y1, x2, y2 = box_xyxy
    return [float(min(max(x1, 0), w)), float(min(max(y1, 0), h)),
            float(min(max(x2, 0), w)), float(min(max(y2, 0), h))]


class _Split(SplitTruth):
    """Ground truth of one split, filled while writing."""

    def add_image(self, img: "_Image") -> None:
        """Count an image's box notes and, if it keeps a person, its record."""
        if img.degenerate:
            self.count(self.skipped, "degenerate_box", img.degenerate)
        if img.clipped:
            self.count(self.fixed, "box_clipped", img.clipped)
        if img.persons:
            self.records[_key(img.id)] = _record_truth(img)
        else:
            self.count(self.skipped, "no_person")


class _Image:
    """One odgt line being built: gtboxes plus the people to draw."""

    def __init__(self, image_id: str, width: int, height: int):
        self.id, self.width, self.height = image_id, width, height
        self.gtboxes: list[dict] = []
        self.draw: list[tuple] = []          # (look, xyxy) for the renderer
        self.persons: list[list[float]] = []
        self.ignore: list[list[float]] = []
        self.clipped = 0
        self.degenerate = 0

    def add(self, fbox_xywh, tag="person", extra=None, head_ignore=0, look=None):
        """Add a gtbox and record what parsing it must give."""
        x, y, w, h = (int(round(v)) for v in fbox_xywh)
        vis_h = max(1, int(h * 0.8))
        entry = {
            "tag": tag,
            "hbox": [x + w // 3, y, max(1, w // 3), max(1, h // 8)],
            "head_attr": {} if tag == "mask" else {"ignore": head_ignore, "occ": 0, "unsure": 0},
            "fbox": [x, y, w, h],
            "vbox": [x, y, w, h] if tag == "mask" else [x, y, w, vis_h],
            "extra": extra if extra is not None else {"box_id": len(self.gtboxes), "occ": 0},
        }
        self.gtboxes.append(entry)
        if look is not None and w > 0 and h > 0:
            self.draw.append((look, [x, y, x + w, y + h]))
        if w < 0 or h < 0:
            self.degenerate += 1
            return
        clipped = _clip([x, y, x + w, y + h], self.width, self.height)
        if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
            self.degenerate += 1
            return
        if clipped != [x, y, x + w, y + h]:
            self.clipped += 1
        is_ignore = tag != "person" or (extra or {}).get("ignore", 0) != 0
        (self.ignore if is_ignore else self.persons).append(clipped)

    def odgt_line(self, flip: bool) -> str:
        # key order differs between lines in the release; never rely on it
        gtboxes = [dict(reversed(list(g.items()))) if flip else g for g in self.gtboxes]
        obj = {"gtboxes": gtboxes, "ID": self.id} if flip else {"ID": self.id, "gtboxes": gtboxes}
        return json.dumps(obj)


def _crowd(img: _Image, rng, seed: int, n: int) -> None:
    """n ordinary people, some crossing the image border."""
    for j, b in enumerate(place_people(rng, img.width, img.height, n, 0.2, 0.75, allow_outside=True)):
        look = appearance_for(seed, NAME, f"{img.id}/{j}")
        img.add([b[0], b[1], b[2] - b[0], b[3] - b[1]], look=look)


def _edge_cases(img: _Image, case: str, seed: int) -> None:
    """Add the recipe's edge case ``case`` to an image."""
    look = appearance_for(seed, NAME, f"{img.id}/{case}")
    W, H = img.width, img.height
    if case == "extra_ignore":
        img.add([W * 0.1, H * 0.3, W * 0.12, H * 0.5], extra={"ignore": 1, "box_id": 90, "occ": 1, "unsure": 0}, look=look)
    elif case == "mask":
        mx, my, mw, mh = W * 0.55, H * 0.05, W * 0.4, H * 0.3
        for k in range(4):  # a distant crowd, drawn but not annotated per person
            cl = appearance_for(seed, NAME, f"{img.id}/crowd{k}")
            img.draw.append((cl, [mx + k * mw / 4, my + mh * 0.2, mx + (k + 0.8) * mw / 4, my + mh]))
        img.add([mx, my, mw, mh], tag="mask", extra={"ignore": 1})
    elif case == "negative_x":
        img.add([-int(W * 0.08), H * 0.2, W * 0.2, H * 0.7], look=look)
    elif case == "head_ignore":
        img.add([W * 0.4, H * 0.25, W * 0.15, H * 0.6], head_ignore=1, look=look)
    elif case == "negative_size":
        img.add([W * 0.3, H * 0.3, W * 0.1, -H * 0.2])
    elif case == "outside":
        img.add([W + 10, H * 0.2, W * 0.1, H * 0.3])


# Which edge cases go into which image of a split (index -> cases).
TRAIN_CASES = {0: ("extra_ignore", "mask", "negative_x", "head_ignore"), 1: ("negative_size", "outside")}
VAL_CASES = {0: ("mask", "negative_x")}


def _build_image(split: str, index: int, seed: int, cases, crowd: bool = True) -> tuple[_Image, object]:
    rng = stable_rng(seed, NAME, split, index)
    w, h = SCENE_SIZES[index % len(SCENE_SIZES)]
    img = _Image(_image_id(split, index), w, h)
    if crowd:
        _crowd(img, rng, seed, int(rng.integers(4, 11)))
    for case in cases:
        _edge_cases(img, case, seed)
    return img, rng


def _render(img: _Image, rng) -> bytes:
    pixels = render_scene(STYLES[NAME], img.width, img.height, img.draw, rng, occluders=int(rng.integers(1, 4)))
    return encode(pixels, "JPEG", quality=90)


def _image_dir(root: Path, split: str, index: int) -> Path:
    if split == "val":
        return root / "CrowdHuman_val" / "Images"
    return root / ("CrowdHuman_train01/Images" if index % 2 == 0 else "Images")


def _record_truth(img: _Image) -> dict:
    return {"boxes": img.persons, "ids": [-1] * len(img.persons), "ignore": img.ignore,
            "width": img.width, "height": img.height}


def _write_split(root: Path, split: str, n: int, seed: int, cases: dict, truth: _Split) -> None:
    lines: list[str] = []
    for index in range(n):
        img, rng = _build_image(split, index, seed, cases.get(index, ()))
        folder = _image_dir(root, split, index)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{img.id}.jpg").write_bytes(_render(img, rng))
        lines.append(img.odgt_line(flip=index % 3 == 1))
        truth.add_image(img)
    lines += _special_lines(root, split, n, seed, truth)
    (root / f"annotation_{split}.odgt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _special_lines(root: Path, split: str, n: int, seed: int, truth: _Split) -> list[str]:
    """Lines for: empty gtboxes, mask only, missing image, truncated JPEG, malformed JSON."""
    lines = []
    folder = _image_dir(root, split, 0)
    # empty gtboxes: the image exists but holds nobody annotated
    empty, rng = _build_image(split, n, seed, (), crowd=False)
    (folder / f"{empty.id}.jpg").write_bytes(_render(empty, rng))
    lines.append(empty.odgt_line(flip=False))
    truth.add_image(empty)
    if split == "train":
        only_mask, rng = _build_image(split, n + 1, seed, ("mask",), crowd=False)
        (folder / f"{only_mask.id}.jpg").write_bytes(_render(only_mask, rng))
        lines.append(only_mask.odgt_line(flip=True))
        truth.add_image(only_mask)
    # annotated, but its image was never extracted
    missing, _ = _build_image(split, n + 2, seed, ())
    lines.append(missing.odgt_line(flip=False))
    truth.count(truth.skipped, "missing_file")
    # a JPEG cut short: its header still parses, the builder's EOI check drops it
    broken, rng = _build_image(split, n + 3, seed, ())
    data = _render(broken, rng)
    (folder / f"{broken.id}.jpg").write_bytes(data[: len(data) * 2 // 3])
    lines.append(broken.odgt_line(flip=True))
    truth.add_image(broken)
    truth.builder_skipped.setdefault("corrupt_image", []).append(_key(broken.id))
    # a line cut in half (as after an interrupted download)
    lines.insert(len(lines) // 2, '{"ID": "299999,deadbeef", "gtboxes": [{"tag": "person", "fbox": [1, 2')
    truth.count(truth.skipped, "malformed_annotation")
    return lines


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the fake CrowdHuman under ``root``; return the ground truth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, cases in (("train", TRAIN_CASES), ("val", VAL_CASES)):
        truth = _Split()
        _write_split(root, split, SIZES[size][split], seed, cases, truth)
        splits[split] = truth.as_dict()
    return {
        "splits": splits,
        "edge_cases": {
            "extra_ignore": _key(_image_id("train", 0)),
            "mask": _key(_image_id("train", 0)),
            "negative_x": _key(_image_id("train", 0)),
            "head_ignore": _key(_image_id("train", 0)),
            "negative_size": _key(_image_id("train", 1)),
            "comma_id": _image_id("train", 0),
        },
    }
