"""Atomic, reproducible webdataset shards and the per-dataset progress journal.

A shard is written to ``<name>.tar.tmp`` through webdataset's ``TarWriter``
with fixed tar metadata (mtime, owner, mode), fsynced and renamed into
place, so the same samples always give the same bytes and a killed build
never leaves a truncated ``.tar``.  After each shard the journal
(``<dataset>/progress.json``, written atomically) records the shard's
sha256, size, sample count, the record range it covers and its counts, which
is all a resume needs to continue exactly where the last good shard ended.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from .files import TMP_SUFFIX, atomic_write_json, commit, sha256_file

# Fixed tar header fields: reproducible bytes regardless of when/who builds.
TAR_MTIME = 0.0
TAR_USER = "hybridps"
TAR_MODE = 0o444
USTAR_NAME_MAX = 100
JOURNAL_NAME = "progress.json"
JOURNAL_VERSION = 1


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class _HashingFile:
    """Write-through file wrapper that hashes what it writes (saves a re-read)."""

    def __init__(self, f):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


class ShardSink:
    """One shard being written; :meth:`commit` publishes it atomically."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.tmp = self.final.with_name(self.final.name + TMP_SUFFIX)
        self._file = open(self.tmp, "wb")
        self._hashing = _HashingFile(self._file)
        import webdataset as wds  # lazily: it imports torch, which argument errors need not wait for

        self._tar = wds.TarWriter(
            self._hashing, encoder=False, mtime=TAR_MTIME, user=TAR_USER, group=TAR_USER, mode=TAR_MODE
        )
        # TarWriter means to write USTAR (its ``format`` argument) but opens
        # the stream with tarfile's PAX default; plain USTAR headers are what
        # every tar reader expects and cost half the time to build.
        self._tar.tarstream.format = tarfile.USTAR_FORMAT
        self.samples = 0

    def write(self, key: str, jpg: bytes, meta: bytes) -> None:
        if len(key.encode()) + len(".json") > USTAR_NAME_MAX:  # only PAX stores longer member names
            self._tar.tarstream.format = tarfile.PAX_FORMAT
        self._tar.write({"__key__": key, "jpg": jpg, "json": meta})
        self.samples += 1

    def flush(self) -> None:
        self._hashing.flush()

    def commit(self) -> tuple[str, int]:
        """Close, fsync, rename into place; returns (sha256, bytes)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        commit(self.tmp, self.final)
        return self._hashing.sha.hexdigest(), self._hashing.size

    def abort(self) -> None:
        """Drop the partial shard (the .tmp never becomes a .tar)."""
        try:
            self._tar.close()  # else tarfile flushes into a closed file when collected
        except Exception:
            pass
        finally:
            self._file.close()
            self.tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------- counts
@dataclass
class Counts:
    """What a range of records contributed to a split's totals."""

    samples: int = 0
    boxes: int = 0
    ignore_regions: int = 0
    skipped: Counter = field(default_factory=Counter)
    fixed: Counter = field(default_factory=Counter)
    dropped_records: list[int] = field(default_factory=list)          # record indices not written
    dropped_boxes: list[list[int]] = field(default_factory=list)      # [record index, box index]

    def to_dict(self) -> dict:
        return {
            "samples": self.samples, "boxes": self.boxes, "ignore_regions": self.ignore_regions,
            "skipped": dict(sorted(self.skipped.items())), "fixed": dict(sorted(self.fixed.items())),
            "dropped_records": self.dropped_records, "dropped_boxes": self.dropped_boxes,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Counts":
        return cls(d["samples"], d["boxes"], d["ignore_regions"], Counter(d["skipped"]), Counter(d["fixed"]),
                   list(d["dropped_records"]), [list(x) for x in d["dropped_boxes"]])

    def add(self, other: "Counts") -> None:
        self.samples += other.samples
        self.boxes += other.boxes
        self.ignore_regions += other.ignore_regions
        self.skipped.update(other.skipped)
        self.fixed.update(other.fixed)
        self.dropped_records += other.dropped_records
        self.dropped_boxes += other.dropped_boxes


@dataclass
class ShardEntry:
    path: str            # relative to the build directory
    samples: int
    sha256: str
    bytes: int
    start: int           # first record index covered
    end: int             # one past the last record index covered
    counts: Counts

    def to_dict(self) -> dict:
        return {"path": self.path, "samples": self.samples, "sha256": self.sha256, "bytes": self.bytes,
                "start": self.start, "end": self.end, "counts": self.counts.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "ShardEntry":
        return cls(d["path"], d["samples"], d["sha256"], d["bytes"], d["start"], d["end"], Counts.from_dict(d["counts"]))

    def verify(self, out_dir: Path) -> str | None:
        """None if the file on disk is this shard, else why not."""
        p = out_dir / self.path
        if not p.is_file():
            return "missing"
        if p.stat().st_size != self.bytes:
            return f"size {p.stat().st_size} != {self.bytes}"
        if sha256_file(p) != self.sha256:
            return "sha256 mismatch"
        return None


@dataclass
class SplitProgress:
    plan: str = ""                 # SplitPlan.plan_sha() the shards were made from
    shards: list[ShardEntry] = field(default_factory=list)
    done: bool = False
    tail: Counts | None = None     # counts of trailing records not in any shard (no samples at all)

    def to_dict(self) -> dict:
        return {"plan": self.plan, "shards": [s.to_dict() for s in self.shards], "done": self.done,
                "tail": None if self.tail is None else self.tail.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "SplitProgress":
        return cls(d["plan"], [ShardEntry.from_dict(s) for s in d["shards"]], d["done"],
                   None if d.get("tail") is None else Counts.from_dict(d["tail"]))

    def totals(self) -> Counts:
        c = Counts()
        for s in self.shards:
            c.add(s.counts)
        if self.tail is not None:
            c.add(self.tail)
        return c


class Journal:
    """``<out>/<dataset>/progress.json``: finished shards per split."""

    def __init__(self, path: Path, fingerprint: str, splits: dict[str, SplitProgress] | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.splits = splits or {}

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> "Journal":
        """The journal on disk if it belongs to this build, else an empty one."""
        import json

        path = Path(path)
        try:
            d = json.loads(path.read_text())
            if d.get("version") == JOURNAL_VERSION and d.get("fingerprint") == fingerprint:
                return cls(path, fingerprint, {k: SplitProgress.from_dict(v) for k, v in d["splits"].items()})
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return cls(path, fingerprint)

    def save(self) -> None:
        # A lost journal rename only costs redoing the last shard, so the
        # directory fsync (a few ms per shard) is skipped here.
        atomic_write_json(self.path, durable=False, obj={
            "version": JOURNAL_VERSION, "fingerprint": self.fingerprint,
            "splits": {k: v.to_dict() for k, v in self.splits.items()},
        })
