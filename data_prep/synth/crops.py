"""A fake folder of re-ID crops (see data_prep/formats/crops.py).

Layout written under ``root`` (the ``labels=folders`` shape)::

    <identity>/<n>.jpg            one folder per identity, names of several
                                  kinds (0001, alice, p_17); one identity keeps
                                  its crops in camera sub-folders (cam1/, cam2/)
    loose_<k>.jpg                 unsorted crops: unlabeled, each its own identity
    .ipynb_checkpoints/<n>.jpg    hidden: ignored
    notes.txt, empty/             not images / no images: ignored

Every identity's crops share one look; loose crops are strangers.  Edge cases
(both sizes): a ``.png`` next to a ``.jpg`` of the same name (one key ->
``duplicate_key``), a file that is not an image (``corrupt_image``) and a
truncated JPEG whose header parses (the builder drops it as ``corrupt_image``).

The truth's ``splits`` describe ``root`` as parsed by default; ``variants``
give the same tree parsed with ``labels=none`` (every crop unlabeled).
"""
from __future__ import annotations

from pathlib import Path

from .render import STYLES, appearance_for, camera_light, encode, render_crop, stable_rng

NAME = "crops"
SIZES = {"tiny": {"ids": 5, "per_id": 3, "loose": 3}, "small": {"ids": 24, "per_id": 5, "loose": 10}}


def _identity_names(n: int) -> list[str]:
    """``n`` (>= 5) folder names of several kinds, not in sorted order."""
    return ["bob", "alice", *(f"{i:04d}" for i in range(1, n - 3)), "walker-9", "p_17"]


def _crop(seed: int, identity, index, camera: int = 0) -> tuple[bytes, int, int]:
    rng = stable_rng(seed, NAME, "crop", identity, index)
    w = int(rng.integers(32, 65))
    h = int(round(w * rng.uniform(2.0, 2.6)))
    look = appearance_for(seed, NAME, identity)
    img = render_crop(STYLES[NAME], look, w, h, rng, light=camera_light(seed, NAME, camera))
    return encode(img, "JPEG", quality=90), w, h


def _entry(w: int, h: int, pid: int) -> dict:
    return {"boxes": [[0.0, 0.0, float(w), float(h)]], "ids": [pid], "ignore": [], "width": w, "height": h}


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the crops folder under ``root``; return the ground truth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    cfg = SIZES[size]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    names = _identity_names(cfg["ids"])
    sorted_names = sorted(names)
    records, skipped, builder_skipped = {}, {}, {}
    sizes: dict[str, tuple[int, int]] = {}
    for name in names:
        pid = sorted_names.index(name)              # the parser's label: position in sorted order
        nested = name == names[2]                   # this identity's crops sit in camera folders
        for i in range(cfg["per_id"]):
            sub = f"cam{1 + i % 2}/" if nested else ""
            rel = f"{name}/{sub}{i:04d}.jpg"
            data, w, h = _crop(seed, name, i, camera=1 + i % 2 if nested else 0)
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
            key = rel[:-4].replace("/", "_")
            records[key] = _entry(w, h, pid)
            sizes[key] = (w, h)
    first = names[0]
    # a .png beside a .jpg of the same stem: the .jpg sorts first and keeps the key
    data, w, h = _crop(seed, first, "dup")
    (root / first / "0000.png").write_bytes(data)
    skipped["duplicate_key"] = 1
    # bytes that are no image, and a JPEG cut short (its header still parses)
    (root / first / "garbage.jpg").write_bytes(b"this is not a JPEG file\n" * 4)
    skipped["corrupt_image"] = 1
    data, w, h = _crop(seed, first, "cut")
    (root / first / "truncated.jpg").write_bytes(data[: len(data) * 2 // 3])
    records[f"{first}_truncated"] = _entry(w, h, sorted_names.index(first))
    builder_skipped["corrupt_image"] = [f"{first}_truncated"]
    for k in range(cfg["loose"]):
        data, w, h = _crop(seed, ("loose", k), 0)
        (root / f"loose_{k}.jpg").write_bytes(data)
        records[f"loose_{k}"] = _entry(w, h, -1)
    hidden = root / ".ipynb_checkpoints"
    hidden.mkdir(exist_ok=True)
    (hidden / "0000-checkpoint.jpg").write_bytes(_crop(seed, "hidden", 0)[0])
    (root / "notes.txt").write_text("crops exported by a tracker\n")
    (root / "empty").mkdir(exist_ok=True)

    split = {"records": records, "skipped": skipped, "fixed": {},
             "builder_skipped": {r: len(k) for r, k in builder_skipped.items()},
             "builder_skipped_keys": builder_skipped}
    unlabeled = {k: {**r, "ids": [-1]} for k, r in records.items()}
    return {
        "splits": {"train": split},
        "identities": sorted_names,
        "variants": {"unlabeled": {"root": ".", "options": {"labels": "none"},
                                   "splits": {"train": {**split, "records": unlabeled}}}},
    }
