"""Random access to tar shards: sample ``i`` of shard ``s`` by byte offset.

The shards are uncompressed tars, so one pass over the headers gives every member's
offset; a sample is then a few seeks.  Each shard is checked against the manifest
(sha256, size) before its first use.
"""
from __future__ import annotations

import os
import re
import tarfile
from typing import Any, Sequence

from hybridps.pretrain.data.config import DataError
from hybridps.pretrain.data.source import ShardInfo, _is_remote, fetch_to_cache
from hybridps.pretrain.integrity import IntegrityError, check_shard


_KEY_RE = re.compile(r"^((?:.*/)?[^./]+)\.([^/]*)$")   # webdataset's key/extension split


class ShardReader:
    """Reads sample ``i`` of shard ``s`` by byte offset.  Indexes and file
    handles are built lazily, so each dataloader worker keeps its own."""

    def __init__(self, shards: Sequence[ShardInfo], cache_dir: str | None = None, verify: bool = False):
        self.shards = list(shards)
        self.cache_dir = cache_dir
        self.verify = verify            # re-hash even shards the verification cache knows
        self._checked: set[int] = set()
        self._index: dict[int, list[tuple[str, dict[str, tuple[int, int]]]]] = {}
        self._files: dict[int, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def _local_path(self, s: int) -> str:
        info = self.shards[s]
        if not _is_remote(info.url):
            if not os.path.isfile(info.url):
                raise DataError(f"shard not found: {info.url}")
            path = info.url
        elif self.cache_dir is None:
            raise DataError(f"shard {info.url!r} is remote: set data.cache_dir for the local copy")
        else:
            path = str(fetch_to_cache(info.url, self.cache_dir, info.sha256))
        if s not in self._checked:
            # the bytes must be the build's: a tampered shard would otherwise train silently
            try:
                check_shard(path, info.sha256, info.size, force=self.verify, cache_dir=self.cache_dir)
            except IntegrityError as e:
                raise DataError(str(e)) from None
            self._checked.add(s)
        return path

    def index(self, s: int) -> list[tuple[str, dict[str, tuple[int, int]]]]:
        """[(key, {ext: (offset, size)})] of shard ``s`` in tar order."""
        if s not in self._index:
            path = self._local_path(s)
            samples: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(path, "r:") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        hit = _KEY_RE.match(m.name)
                        if hit is None:
                            continue
                        samples.setdefault(hit.group(1), {})[hit.group(2)] = (m.offset_data, m.size)
            except tarfile.TarError as e:
                raise DataError(f"{path}: not a readable tar shard ({e})") from None
            expected = self.shards[s].samples
            if len(samples) != expected:
                raise DataError(f"{path}: {len(samples)} samples but the manifest says {expected}")
            self._index[s] = list(samples.items())
        return self._index[s]

    def expect(self, s: int) -> dict:
        """What the manifest says every sample of shard ``s`` must satisfy."""
        info = self.shards[s]
        return {"domain": info.domain, "id_range": info.id_range}

    def key(self, s: int, i: int) -> str:
        return self.index(s)[i][0]

    def read(self, s: int, i: int) -> dict:
        """The raw webdataset sample ``{"__key__", "<ext>": bytes, ...}``."""
        key, members = self.index(s)[i]
        f = self._files.get(s)
        if f is None:
            f = self._files[s] = open(self._local_path(s), "rb")
        sample: dict[str, Any] = {"__key__": key}
        for ext, (offset, size) in members.items():
            f.seek(offset)
            sample[ext] = f.read(size)
        return sample
