"""A fake LUPerson / LUPerson-NL in the shapes copies circulate in
(see data_prep/formats/luperson.py for how each is recognised).

Layout written under ``root`` (``root`` itself is the common ``LUP/`` copy)::

    images/CC_CC_VVVV_IIIIIIII.jpg      crops named like convert_lmdb keys
    CFS_list.pkl                        basenames in "CFS score" order: all but
                                        two crops, plus one name with no file
    lmdbs/{lmdb/, keys.pkl}             keys.pkl = plain list (+ a key not in the LMDB)
    lmdb_300_30/{lmdb/, keys.pkl}       keys.pkl = {'keys': [...]}
    flat_lmdb/{data.mdb, keys.pkl}      LMDB files beside keys.pkl, dict form
    lupnl_lmdb/{lmdb/, keys.pkl}        LUPerson-NL: {'keys', 'pids'}, keys
                                        VVVVV_PPPPPP_FFFFFFF_OO, 2-3 crops per pid
    extracted/<country>/<city>/<frame>_<obj>.jpg   extract.py tree; one name
                                        repeats in two cities, plus a notes.txt

Every crop is a different person except within an NL pid (same look).  The
truth's ``splits`` describe ``root``; ``variants`` give each other folder with
the options to parse it and its own ``splits``.
"""
from __future__ import annotations

import pickle
from pathlib import Path

from .render import STYLES, appearance_for, encode, render_crop, stable_rng

NAME = "luperson"
SIZES = {
    "tiny": {"images": 20, "lmdbs": 12, "lmdb_300_30": 8, "flat_lmdb": 3, "nl_pids": 5, "tree": 3},
    "small": {"images": 100, "lmdbs": 60, "lmdb_300_30": 40, "flat_lmdb": 6, "nl_pids": 24, "tree": 8},
}
LMDB_MAP_SIZE = 1 << 28


def _crop(seed: int, identity, index) -> tuple[bytes, int, int]:
    """A JPEG person crop of varying size (LUPerson crops are detector boxes)."""
    rng = stable_rng(seed, NAME, "crop", identity, index)
    w = int(rng.integers(40, 81))
    h = int(round(w * rng.uniform(1.8, 2.6)))
    look = appearance_for(seed, NAME, identity)
    return encode(render_crop(STYLES[NAME], look, w, h, rng), "JPEG", quality=90), w, h


def _lup_key(i: int) -> str:
    """convert_lmdb's key: country, city, video and image indices."""
    return f"{i % 3:02d}_{(i // 3) % 2:02d}_{i % 7:04d}_{i:08d}"


def _truth_entry(w: int, h: int, pid: int = -1) -> dict:
    return {"boxes": [[0.0, 0.0, float(w), float(h)]], "ids": [pid], "ignore": [], "width": w, "height": h}


def _split(records: dict, skipped: dict | None = None) -> dict:
    return {"train": {"records": records, "skipped": skipped or {}, "fixed": {}}}


def _write_images(root: Path, n: int, seed: int) -> dict:
    """``images/`` + ``CFS_list.pkl``: the main root's truth."""
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for i in range(n):
        key = _lup_key(i)
        data, w, h = _crop(seed, key, 0)
        (folder / f"{key}.jpg").write_bytes(data)
        sizes[key] = (w, h)
    order = list(sizes)
    stable_rng(seed, NAME, "cfs").shuffle(order)
    listed = order[:-2]                     # CFS keeps the best-scored part
    names = [f"{k}.jpg" for k in listed]
    names.insert(len(names) // 2, f"{_lup_key(n + 50)}.jpg")   # listed, never extracted
    (root / "CFS_list.pkl").write_bytes(pickle.dumps(names))
    records = {k: _truth_entry(*sizes[k]) for k in listed}
    return {"splits": _split(records, {"missing_file": 1}), "order": listed, "unlisted": order[-2:],
            "name_list": names}


def _write_lmdb(path: Path, items: dict[str, bytes]) -> None:
    import lmdb

    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(str(path), map_size=LMDB_MAP_SIZE, subdir=True)
    with env.begin(write=True) as txn:
        for key, data in items.items():
            txn.put(key.encode("ascii"), data)
    env.close()


def _lmdb_variant(root: Path, folder: str, keys: list[str], seed: int, keys_pickle, flat: bool = False,
                  absent: tuple[str, ...] = (), pids: dict[str, int] | None = None) -> dict:
    """Write one LMDB copy; ``absent`` keys are listed in keys.pkl but not stored."""
    items, records = {}, {}
    for key in keys:
        identity = ("pid", pids[key]) if pids else key
        data, w, h = _crop(seed, identity, key)
        items[key] = data
        records[key] = _truth_entry(w, h, pids[key] if pids else -1)
    base = root / folder
    _write_lmdb(base if flat else base / "lmdb", items)
    listed = sorted(keys + list(absent))
    (base / "keys.pkl").write_bytes(pickle.dumps(keys_pickle(listed)))
    skipped = {"missing_file": len(absent)} if absent else {}
    return {"root": folder, "options": {}, "splits": _split(records, skipped), "order": sorted(keys)}


def _nl_keys(n_pids: int, seed: int) -> dict[str, int]:
    """LUPerson-NL keys ``VVVVV_PPPPPP_FFFFFFF_OO`` -> pid, 2-3 crops per pid."""
    rng = stable_rng(seed, NAME, "nl")
    keys = {}
    for p in range(n_pids):
        pid = 100 + 7 * p
        video = 1 + p // 2
        for c in range(int(rng.integers(2, 4))):
            keys[f"{video:05d}_{pid:06d}_{10 * c + p:07d}_{c:02d}"] = pid
    return keys


def _write_tree(root: Path, n_per_city: int, seed: int) -> dict:
    """extract.py's ``<country>/<city>/<frame:08d>_<obj:04d>.jpg`` tree."""
    records = {}
    for country, city in (("france", "paris"), ("japan", "tokyo")):
        folder = root / "extracted" / country / city
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n_per_city):
            stem = f"{i * 25:08d}_{i % 2:04d}"   # the same stems in both cities
            data, w, h = _crop(seed, f"{country}/{city}/{stem}", 0)
            (folder / f"{stem}.jpg").write_bytes(data)
            records[f"{country}_{city}_{stem}"] = _truth_entry(w, h)
    (root / "extracted" / "france" / "notes.txt").write_text("not an image\n")
    return {"root": "extracted", "options": {}, "splits": _split(records), "order": sorted(records)}


def write(root: Path, seed: int = 0, size: str = "tiny") -> dict:
    """Write the fake LUPerson copies under ``root``; return the ground truth."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    n = SIZES[size]
    root = Path(root)
    main = _write_images(root, n["images"], seed)
    lmdb_keys = [_lup_key(1000 + i) for i in range(n["lmdbs"])]
    dict_keys = [_lup_key(2000 + i) for i in range(n["lmdb_300_30"])]
    flat_keys = [_lup_key(3000 + i) for i in range(n["flat_lmdb"])]
    nl = _nl_keys(n["nl_pids"], seed)
    nl_variant = _lmdb_variant(root, "lupnl_lmdb", list(nl), seed,
                               lambda ks: {"keys": ks, "pids": [nl[k] for k in ks]}, pids=nl)
    nl_variant["options"] = {"use_nl_pids": True}
    variants = {
        "lmdb_list": _lmdb_variant(root, "lmdbs", lmdb_keys, seed, list, absent=(_lup_key(1999),)),
        "lmdb_dict": _lmdb_variant(root, "lmdb_300_30", dict_keys, seed, lambda ks: {"keys": ks}),
        "lmdb_flat": _lmdb_variant(root, "flat_lmdb", flat_keys, seed, lambda ks: {"keys": ks}, flat=True),
        "nl": nl_variant,
        "tree": _write_tree(root, n["tree"], seed),
    }
    return {**main, "variants": variants, "nl_pids": nl}
