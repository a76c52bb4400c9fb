"""Stage 0, the source: the manifest and where each shard's bytes are.

Resolves a ``data_prep`` build directory, or shard URLs / ``pipe:`` commands plus a
manifest, into a :class:`ShardSource` (one :class:`ShardInfo` per shard in manifest
order); remote shards are fetched once into a local cache for random access.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import webdataset as wds

from hybridps.pretrain.data.config import DataError
from hybridps.pretrain.integrity import IntegrityError, check_manifest


@dataclass(frozen=True)
class ShardInfo:
    dataset: str
    split: str
    url: str            # local path, or a URL / `pipe:` command
    samples: int
    sha256: str | None
    domain: int | None = None           # manifest domain of the dataset (checked per sample)
    id_range: tuple[int, int] | None = None
    size: int | None = None             # bytes, when the manifest records it


@dataclass
class ShardSource:
    """The manifest plus where each shard's bytes are."""

    manifest: dict
    manifest_sha256: str
    shards: list[ShardInfo]

    @property
    def num_ids(self) -> int:
        return int(self.manifest["num_ids"])

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])


def _manifest_shards(manifest: dict, splits: dict[str, list[str]] | None) -> list[tuple[str, str, dict]]:
    """(dataset, split, shard entry) in manifest order, restricted to ``splits``."""
    datasets = manifest.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise DataError("manifest has no 'datasets'")
    if splits:
        unknown = sorted(set(splits) - set(datasets))
        if unknown:
            raise DataError(f"data.splits names datasets not in the manifest: {unknown}")
    out = []
    for name, entry in datasets.items():
        wanted = (splits or {}).get(name)
        available = entry.get("splits", {})
        if wanted is not None:
            missing = sorted(set(wanted) - set(available))
            if missing:
                raise DataError(f"{name}: splits {missing} not in the manifest (has {sorted(available)})")
        for split, info in available.items():
            if wanted is not None and split not in wanted:
                continue
            for shard in info.get("shards", []):
                out.append((name, split, shard))
    return out


def _read_manifest(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise DataError(f"manifest not found: {path} (build shards with `python -m hybridps.data_prep build`)")
    raw = path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: manifest must be a JSON object, got {type(manifest).__name__}")
    for key in ("num_ids", "domains", "datasets"):
        if key not in manifest:
            raise DataError(f"{path}: manifest lacks {key!r}")
    try:
        check_manifest(manifest, str(path))
    except IntegrityError as e:
        raise DataError(str(e)) from None
    return manifest, hashlib.sha256(raw).hexdigest()


def _id_range(entry: dict) -> tuple[int, int] | None:
    r = entry.get("id_range")
    return (r[0], r[1]) if isinstance(r, list) and len(r) == 2 else None


def _match_urls(urls: Sequence[str], rel_paths: list[str]) -> list[str]:
    """Map each manifest shard path to the one URL that contains it."""
    import braceexpand

    expanded = [u for pattern in urls for u in braceexpand.braceexpand(pattern)]
    out = []
    for rel in rel_paths:
        hits = [u for u in expanded if rel in u]
        if len(hits) != 1:
            what = "no URL" if not hits else f"{len(hits)} URLs"
            raise DataError(f"manifest shard {rel!r} matches {what} in data.urls")
        out.append(hits[0])
    return out


def open_source(shards: str | None = None, urls: Sequence[str] | None = None,
                manifest: str | None = None, splits: dict | None = None) -> ShardSource:
    """Resolve a build directory (or URLs + manifest) into a :class:`ShardSource`."""
    if urls:
        if not manifest:
            raise DataError("shard URLs need a manifest path")
        man, sha = _read_manifest(Path(manifest))
        entries = _manifest_shards(man, splits)
        locations = _match_urls(urls, [e[2]["path"] for e in entries])
    elif shards or manifest:
        man_path = Path(manifest) if manifest else Path(shards) / "manifest.json"
        man, sha = _read_manifest(man_path)
        root = Path(shards) if shards else man_path.parent
        entries = _manifest_shards(man, splits)
        locations = [str(root / e[2]["path"]) for e in entries]
    else:
        raise DataError("no data: give --shards DIR (a data_prep build) or data.urls + data.manifest")
    infos = [ShardInfo(d, s, loc, int(e["samples"]), e.get("sha256"), man["datasets"][d].get("domain"),
                       _id_range(man["datasets"][d]), e.get("size", e.get("bytes")))
             for (d, s, e), loc in zip(entries, locations)]
    return ShardSource(man, sha, infos)


def _is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def fetch_to_cache(url: str, cache_dir: str | Path, sha256: str | None) -> Path:
    """Copy a remote/`pipe:` shard into ``cache_dir`` once (atomic rename, so
    concurrent workers are harmless) and verify it against the manifest."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    name = sha256 or hashlib.sha256(url.encode()).hexdigest()
    target = cache_dir / f"{name}.tar"
    if target.is_file():
        return target
    tmp = cache_dir / f".{name}.{uuid.uuid4().hex}.part"
    digest = hashlib.sha256()
    try:
        with wds.gopen(url, "rb") as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"could not fetch shard {url!r}: {e}") from None
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise DataError(f"shard {url!r}: sha256 {digest.hexdigest()} != manifest {sha256}")
    os.replace(tmp, target)
    return target
