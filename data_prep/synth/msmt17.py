"""Synthetic MSMT17 in the release layout (see data_prep/formats/msmt17.py).

One call writes both release versions side by side, as a user holding both
downloads would have them::

    root/MSMT17_V1/{train,test}/<pid:04d>/<name>.jpg + list_{train,val,query,gallery}.txt
    root/MSMT17_V2/{mask_train_v2,mask_test_v2}/...  (same lists, faces pixelated)

The parser picks ``MSMT17_V1`` from ``root``; ``root/MSMT17_V2`` is itself a
valid root (a version folder) for the V2 layout.  The truth's ``variants``
maps ``"V1"``/``"V2"`` to these two folders; both parse to the same truth.

Names ``<pid:04d>_<idx:03d>_<cam:02d>_<date><slot>_<frame:04d>_<box>.jpg``;
crops vary in size like the real ones.  Train and test identities are
different people whose labels both start at 0.  Edge cases, in both sizes:
``list_val.txt`` has CRLF line ends, ``list_query.txt`` blank trailing lines,
``list_train.txt`` one malformed line, ``list_gallery.txt`` one line naming
a file that is not there.

Ground truth extras: ``cameras`` ({split: {key: camera}}), ``variants``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .render import STYLES, appearance_for, camera_light, encode, render_crop, stable_rng

NAME = "msmt17"
CAMERAS = 15
SLOTS = [d + t for d in ("0113", "0114", "0302", "0303") for t in ("morning", "noon", "afternoon")]
VERSIONS = {"V1": ("MSMT17_V1", "train", "test"), "V2": ("MSMT17_V2", "mask_train_v2", "mask_test_v2")}
SIZES = {
    "tiny": dict(train_ids=4, per_train=5, per_val=1, test_ids=4, per_query=1, per_gallery=3),
    "small": dict(train_ids=16, per_train=6, per_val=2, test_ids=16, per_query=2, per_gallery=5),
}
MALFORMED_LINE = "0000/this-line-has-no-label.jpg"


def _crop_name(rng, pid: int, idx: int, cam: int) -> str:
    slot = SLOTS[int(rng.integers(len(SLOTS)))]
    return f"{pid:04d}_{idx:03d}_{cam:02d}_{slot}_{int(rng.integers(1, 10000)):04d}_{int(rng.integers(0, 4))}.jpg"


def _plan(seed: int, cfg: dict) -> dict[str, list[tuple[int, str]]]:
    """``{split: [(label, "<pid dir>/<file name>"), ...]}`` for the four lists."""
    rng = stable_rng(NAME, seed, "plan")
    plan: dict[str, list[tuple[int, str]]] = {"train": [], "val": [], "query": [], "gallery": []}
    for kind, n_ids, parts in (
        ("train", cfg["train_ids"], (("train", cfg["per_train"]), ("val", cfg["per_val"]))),
        ("test", cfg["test_ids"], (("query", cfg["per_query"]), ("gallery", cfg["per_gallery"]))),
    ):
        for pid in range(n_ids):
            idx = 0
            for split, count in parts:
                for _ in range(count):
                    cam = int(rng.integers(1, CAMERAS + 1))
                    plan[split].append((pid, f"{pid:04d}/{_crop_name(rng, pid, idx, cam)}"))
                    idx += 1
    return plan


def _render(seed: int, split: str, pid: int, rel: str) -> np.ndarray:
    kind = "test" if split in ("query", "gallery") else "train"
    rng = stable_rng(NAME, seed, "crop", kind, rel)
    width = int(rng.integers(28, 49))
    height = int(round(width * rng.uniform(2.0, 2.8)))
    cam = int(rel.split("/")[1].split("_")[2])
    look = appearance_for(seed, NAME, (kind, pid))
    return render_crop(STYLES[NAME], look, width, height, rng, light=camera_light(seed, NAME, cam))


def mask_face(img: np.ndarray, block: int = 4) -> np.ndarray:
    """V2 blurs faces: pixelate the head band at the top of the crop."""
    out = img.copy()
    band = max(block, int(img.shape[0] * 0.22))
    for y in range(0, band, block):
        for x in range(0, img.shape[1], block):
            tile = out[y : min(y + block, band), x : x + block]
            tile[...] = tile.reshape(-1, 3).mean(0).astype(np.uint8)
    return out


def _write_list(path: Path, lines: list[str], newline: str = "\n", trailing_blank: int = 0) -> None:
    text = "".join(line + newline for line in lines) + newline * trailing_blank
    path.write_bytes(text.encode("utf-8"))


def _list_lines(plan: dict, split: str) -> list[str]:
    lines = [f"{rel} {label}" for label, rel in plan[split]]
    if split == "train":
        lines.insert(len(lines) // 2, MALFORMED_LINE)
    if split == "gallery":
        # a well-formed line whose image is not in the folder
        lines.insert(1, "0000/0000_099_03_0302noon_0001_0.jpg 0")
    return lines


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write V1 and V2 copies under ``root`` and return the ground truth (CONTRACTS section 2)."""
    if size not in SIZES:
        raise ValueError(f"msmt17 synth: size must be one of {tuple(SIZES)}, got {size!r}")
    root = Path(root)
    plan = _plan(seed, SIZES[size])
    truth: dict = {
        "splits": {}, "cameras": {},
        "variants": {v: str(root / folder) for v, (folder, _, _) in VERSIONS.items()},
    }
    for split, entries in plan.items():
        records, cameras = {}, {}
        for label, rel in entries:
            img = _render(seed, split, label, rel)
            for folder, train_dir, test_dir in VERSIONS.values():
                path = root / folder / (test_dir if split in ("query", "gallery") else train_dir) / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = img if folder == VERSIONS["V1"][0] else mask_face(img)
                path.write_bytes(encode(pixels, "JPEG", quality=90))
            key = Path(rel).stem
            h, w = img.shape[:2]
            records[key] = {"boxes": [[0.0, 0.0, float(w), float(h)]], "ids": [label], "ignore": [],
                            "width": w, "height": h}
            cameras[key] = int(key.split("_")[2])
        skipped = {"train": {"malformed_annotation": 1}, "gallery": {"missing_file": 1}}.get(split, {})
        truth["splits"][split] = {"records": records, "skipped": skipped, "fixed": {}}
        truth["cameras"][split] = cameras
    for folder, _, _ in VERSIONS.values():
        for split in plan:
            crlf = split == "val"
            _write_list(root / folder / f"list_{split}.txt", _list_lines(plan, split),
                        newline="\r\n" if crlf else "\n", trailing_blank=2 if split == "query" else 0)
    return truth
