"""Checks that keep bad shard bytes from training silently or exhausting memory.

* :func:`check_shard` -- a local shard against its manifest entry: size when
  the manifest records one, sha256 at first use.  Hashing every shard on
  every run would cost minutes on a full build, so a verified shard is
  remembered by (path, size, mtime, expected sha256) in a small JSON cache;
  any change to the file changes the key and it is hashed again.
* :func:`check_meta` -- a sample's json against the schema of CONTRACTS
  section 3 and the manifest (domain, id range), *before* its JPEG is decoded:
  a wrong type, a 3-value box, a 1e30 coordinate or a pid of 2**70 is a
  one-line error naming the shard and key, not a tensor-constructor traceback
  or a sample that quietly falls out of domain alignment.
* :func:`image_size` -- the JPEG header's size, read without decoding, so an
  11000x11000 header in a 10 KB file is refused before a 360 MB decode.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

log = logging.getLogger(__name__)

TASKS = ("det", "reid", "ps")
BOX_SLACK = 1.0       # px: builders clip boxes to the image; allow rounding at the border
CACHE_ENV = "HYBRIDPS_CACHE"


class IntegrityError(RuntimeError):
    """Raised with a one-line message; the loader turns it into its DataError."""


# --------------------------------------------------------------------------- shards
def verify_cache_path(cache_dir: str | None = None) -> Path:
    if cache_dir:
        return Path(cache_dir) / "verified-shards.json"
    base = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hybridps")
    return Path(base) / "verified-shards.json"


def _load_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _store_cache(path: Path, key: str) -> None:
    """Best effort: a cache that cannot be written only costs a re-hash next run."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _load_cache(path)
        data[key] = True
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("shard verification cache not written (%s)", e)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_shard(path: str, sha256: str | None, size: int | None = None, *, force: bool = False,
                cache_dir: str | None = None) -> None:
    """Raise :class:`IntegrityError` when ``path`` is not the shard the manifest describes."""
    st = os.stat(path)
    if size is not None and st.st_size != size:
        raise IntegrityError(f"shard {path}: {st.st_size} bytes but the manifest says {size} "
                             "(truncated or replaced; rebuild it or fix --shards)")
    if not sha256:
        return
    key = f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}|{sha256}"
    cache = verify_cache_path(cache_dir)
    if not force and _load_cache(cache).get(key):
        return
    got = sha256_file(path)
    if got != sha256:
        raise IntegrityError(f"shard {path}: sha256 {got[:12]}... does not match the manifest's {sha256[:12]}... "
                             "(modified after the build; rebuild it or fix --shards)")
    _store_cache(cache, key)


# --------------------------------------------------------------------------- samples
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def check_header(meta: Any, where: str) -> tuple[int, int]:
    """The fields needed before the image is opened; returns (width, height)."""
    if not isinstance(meta, dict):
        raise IntegrityError(f"{where}: json must be an object, got {type(meta).__name__}")
    for key in ("width", "height"):
        v = meta.get(key)
        if not _is_int(v) or not 1 <= v <= 1 << 31:
            raise IntegrityError(f"{where}: json key {key!r} must be a positive integer, got {v!r}")
    return meta["width"], meta["height"]


def _check_boxes(value: Any, key: str, where: str, w: int, h: int) -> int:
    if not isinstance(value, list):
        raise IntegrityError(f"{where}: json key {key!r} must be a list of [x1, y1, x2, y2], got {type(value).__name__}")
    for i, box in enumerate(value):
        if not isinstance(box, list) or len(box) != 4 or not all(_is_num(c) for c in box):
            raise IntegrityError(f"{where}: json key {key!r}[{i}] must be 4 finite numbers, got {box!r}"[:300])
        x1, y1, x2, y2 = box
        if not (-BOX_SLACK <= x1 <= x2 <= w + BOX_SLACK and -BOX_SLACK <= y1 <= y2 <= h + BOX_SLACK):
            raise IntegrityError(f"{where}: json key {key!r}[{i}] = {box} is not an x1<=x2, y1<=y2 box "
                                 f"inside the {w}x{h} image"[:300])
    return len(value)


def check_meta(meta: dict, where: str, expect: dict | None = None) -> None:
    """Every json field the loader uses, against the schema and the manifest.

    ``expect``: ``{"domain": int, "id_range": [lo, hi], "num_ids": int,
    "num_domains": int}`` from the manifest (any key may be missing)."""
    expect = expect or {}
    w, h = check_header(meta, where)
    d = meta.get("domain")
    if not _is_int(d):
        raise IntegrityError(f"{where}: json key 'domain' must be an integer, got {d!r}")
    if expect.get("domain") is not None and d != expect["domain"]:
        raise IntegrityError(f"{where}: json key 'domain' is {d}, but the manifest gives this shard's dataset "
                             f"domain {expect['domain']} (it would fall out of domain alignment)")
    n_dom = expect.get("num_domains")
    if n_dom is not None and not 0 <= d < n_dom:
        raise IntegrityError(f"{where}: json key 'domain' is {d}, outside the manifest's domains 0..{n_dom - 1}")
    if meta.get("task") not in TASKS:
        raise IntegrityError(f"{where}: json key 'task' must be one of {TASKS}, got {meta.get('task')!r}")
    if not isinstance(meta.get("labeled"), bool):
        raise IntegrityError(f"{where}: json key 'labeled' must be true/false, got {meta.get('labeled')!r}")
    n = _check_boxes(meta.get("boxes"), "boxes", where, w, h)
    if meta.get("ignore") is not None:
        _check_boxes(meta["ignore"], "ignore", where, w, h)
    pids = meta.get("pids")
    if not isinstance(pids, list) or not all(_is_int(p) for p in pids):
        raise IntegrityError(f"{where}: json key 'pids' must be a list of integers, got {pids!r}"[:300])
    if len(pids) != n:
        raise IntegrityError(f"{where}: {n} boxes but {len(pids)} pids")
    lo, hi = 0, expect.get("num_ids")
    if isinstance(expect.get("id_range"), (list, tuple)) and len(expect["id_range"]) == 2:
        lo, hi = expect["id_range"]
    for i, p in enumerate(pids):
        # -1 = unlabeled person (CONTRACTS section 3); anything else is a LUT row
        if p != -1 and (p < lo or (hi is not None and p >= hi) or p >= 1 << 62):
            span = f"[{lo}, {hi})" if hi is not None else f">= {lo}"
            raise IntegrityError(f"{where}: json key 'pids'[{i}] = {p} is outside this dataset's id range {span} "
                                 "and is not -1 (unlabeled)")
    canvas = meta.get("canvas")
    if canvas is not None and not isinstance(canvas, dict):
        raise IntegrityError(f"{where}: json key 'canvas' must be null or an object, got {canvas!r}"[:300])


_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # frame headers (C4 DHT, C8 JPG, CC DAC)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(width, height, components)`` from a JPEG's frame header, walking the marker
    segments (a few microseconds; PIL's open parses every table in Python, ~0.3 ms).
    None for anything that is not a plain JPEG header: the caller falls back to PIL."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 9 < n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in _SOF:
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return (w, h, data[i + 9]) if w > 0 and h > 0 else None
        if marker == 0xDA or 0xD0 <= marker <= 0xD9:
            return None
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def check_pixels(w: int, h: int, where: str, max_pixels: int) -> None:
    if w * h > max_pixels:
        raise IntegrityError(f"{where}: image header says {w}x{h} = {w * h / 1e6:.0f} Mpx, more than "
                             f"data.max_pixels = {max_pixels / 1e6:.0f} Mpx (not decoded)")


def open_image(data: bytes, where: str, max_pixels: int) -> Image.Image:
    """Open (not decode) an image and refuse it when its header is too large."""
    try:
        with warnings.catch_warnings():
            # PIL warns above its own limit before we get to refuse with ours
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise IntegrityError(f"{where}: image header is too large to decode safely ({e})") from None
    except (OSError, ValueError) as e:
        raise IntegrityError(f"{where}: image does not decode ({e})") from None
    try:
        check_pixels(*im.size, where, max_pixels)
    except IntegrityError:
        im.close()
        raise
    return im


# --------------------------------------------------------------------------- the manifest
def check_manifest(man: Any, where: str) -> None:
    """The manifest fields the loader and the model size themselves by
    (CONTRACTS section 3): a wrong type is a one-line error here instead of a
    KeyError later, and ``num_ids`` (the OIM LUT rows, num_ids x emb_dim
    floats) cannot be inflated past the datasets' id ranges."""
    if not isinstance(man, dict):
        raise IntegrityError(f"{where}: manifest must be a JSON object, got {type(man).__name__}")
    num_ids, domains, datasets = man.get("num_ids"), man.get("domains"), man.get("datasets")
    if not _is_int(num_ids) or num_ids < 1:
        raise IntegrityError(f"{where}: manifest 'num_ids' must be a positive integer, got {num_ids!r}"[:300])
    if not isinstance(domains, list) or not all(isinstance(d, str) for d in domains) or len(set(domains)) != len(domains):
        raise IntegrityError(f"{where}: manifest 'domains' must be a list of distinct dataset names"[:300])
    if not isinstance(datasets, dict) or set(datasets) != set(domains):
        raise IntegrityError(f"{where}: manifest 'datasets' must be an object with one entry per name in 'domains'")
    ends = []
    for name, entry in datasets.items():
        at = f"{where}: manifest datasets[{name!r}]"
        if not isinstance(entry, dict):
            raise IntegrityError(f"{at} must be an object")
        if entry.get("domain") != domains.index(name) or not _is_int(entry.get("domain")):
            raise IntegrityError(f"{at}['domain'] is {entry.get('domain')!r}, but {name!r} is domain "
                                 f"{domains.index(name)} in 'domains'"[:300])
        if entry.get("task") not in TASKS:
            raise IntegrityError(f"{at}['task'] must be one of {TASKS}, got {entry.get('task')!r}"[:300])
        r = entry.get("id_range")
        if r is not None:
            if not (isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r) and 0 <= r[0] <= r[1] <= num_ids):
                raise IntegrityError(f"{at}['id_range'] must be [lo, hi] with 0 <= lo <= hi <= num_ids, got {r!r}"[:300])
            ends.append(r[1])
        splits = entry.get("splits", {})
        if not isinstance(splits, dict):
            raise IntegrityError(f"{at}['splits'] must be an object")
        for split, info in splits.items():
            shards = info.get("shards", []) if isinstance(info, dict) else None
            if not isinstance(shards, list):
                raise IntegrityError(f"{at}['splits'][{split!r}]['shards'] must be a list")
            for i, shard in enumerate(shards):
                _check_shard_entry(shard, f"{at}['splits'][{split!r}]['shards'][{i}]")
    if ends and len(ends) == len(datasets) and num_ids != max(ends):
        raise IntegrityError(f"{where}: manifest 'num_ids' is {num_ids}, but the datasets' id ranges end at {max(ends)}")


def _check_shard_entry(shard: Any, at: str) -> None:
    if not isinstance(shard, dict):
        raise IntegrityError(f"{at} must be an object")
    path = shard.get("path")
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in Path(path).parts:
        # paths are relative to the build directory; an absolute or ../ path would read outside it
        raise IntegrityError(f"{at}['path'] must be a relative path inside the build, got {path!r}"[:300])
    if not _is_int(shard.get("samples")) or shard["samples"] < 0:
        raise IntegrityError(f"{at}['samples'] must be a non-negative integer, got {shard.get('samples')!r}"[:300])
    sha = shard.get("sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
        raise IntegrityError(f"{at}['sha256'] must be 64 hex digits, got {sha!r}"[:300])
    size = shard.get("size", shard.get("bytes"))
    if size is not None and (not _is_int(size) or size < 0):
        raise IntegrityError(f"{at}['size'] must be a non-negative integer, got {size!r}"[:300])
