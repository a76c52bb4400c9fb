"""Atomic, reproducible webdataset shards and the per-dataset progress journal.

A shard is written to ``<name>.tar.tmp`` through webdataset's ``TarWriter``
with fixed tar metadata (mtime, owner, mode), fsynced and renamed into
place, so the same samples always give the same bytes and a killed build
never leaves a truncated ``.tar``.  After each shard the journal
(``<dataset>/progress.jsonl``, one line appended per shard) records the
shard's sha256, size, sample count, the record range it covers and its
counts, which is all a resume needs to continue exactly where the last good
shard ended.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path


from .files import TMP_SUFFIX, atomic_write_bytes, commit, sha256_file

# Fixed tar header fields: reproducible bytes regardless of when/who builds.
TAR_MTIME = 0.0
TAR_USER = "hybridps"
TAR_MODE = 0o444
USTAR_NAME_MAX = 100
JOURNAL_NAME = "progress.jsonl"
LEGACY_JOURNAL_NAME = "progress.json"      # the rewritten-per-shard journal of version 1
JOURNAL_VERSION = 2


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
    """``<out>/<dataset>/progress.jsonl``: finished shards per split.

    An append-only log of JSON lines, one per event, so a build of 4M records
    (4000 shards) writes one short line per shard instead of rewriting a
    journal that grows with every shard::

        {"version": 2, "fingerprint": FP}                  first line
        {"split": S, "plan": SHA, "keep": K}               (re)start S keeping its first K shards
        {"split": S, "shard": {...ShardEntry}}             one finished shard
        {"split": S, "done": true, "tail": {...} | null}   S complete

    A line torn by a crash (no newline, or not JSON) ends the log: it and
    anything after it are cut off before the next append.
    """

    def __init__(self, path: Path, fingerprint: str, splits: dict[str, SplitProgress] | None = None,
                 valid_bytes: int | None = None):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.splits = splits or {}
        self._valid_bytes = valid_bytes      # length of the usable log on disk; None: start a new one
        self._fh = None

    @classmethod
    def load(cls, path: Path, fingerprint: str) -> "Journal":
        """The journal on disk if it belongs to this build, else an empty one."""
        import json

        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError:
            return cls(path, fingerprint)
        splits: dict[str, SplitProgress] = {}
        good = 0
        for n, line in enumerate(data.split(b"\n")[:-1]):   # the part after the last newline is torn
            try:
                d = json.loads(line)
                if n == 0:
                    if d.get("version") != JOURNAL_VERSION or d.get("fingerprint") != fingerprint:
                        return cls(path, fingerprint)
                else:
                    cls._apply(splits, d)
            except (ValueError, KeyError, TypeError, AttributeError):
                break
            good += len(line) + 1
        return cls(path, fingerprint, splits, good) if good else cls(path, fingerprint)

    @staticmethod
    def _apply(splits: dict[str, SplitProgress], d: dict) -> None:
        split = d["split"]
        if "plan" in d:
            old = splits.get(split)
            keep = old.shards[: int(d["keep"])] if old is not None and old.plan == d["plan"] else []
            splits[split] = SplitProgress(d["plan"], keep)
        elif "shard" in d:
            splits[split].shards.append(ShardEntry.from_dict(d["shard"]))
        elif d.get("done") is True:
            splits[split].done = True
            splits[split].tail = None if d.get("tail") is None else Counts.from_dict(d["tail"])
        else:
            raise ValueError("unknown journal line")

    # ------------------------------------------------------------------ writing
    def _append(self, obj: dict) -> None:
        import json

        if self._fh is None:
            if self._valid_bytes is None:
                header = json.dumps({"version": JOURNAL_VERSION, "fingerprint": self.fingerprint}) + "\n"
                atomic_write_bytes(self.path, header.encode(), durable=False)
                self._valid_bytes = len(header)
            self._fh = open(self.path, "r+b")
            self._fh.truncate(self._valid_bytes)     # drop a torn tail before appending after it
            self._fh.seek(self._valid_bytes)
        line = (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()
        self._fh.write(line)
        self._fh.flush()
        # fsynced like the shard it records; a lost line only costs redoing that shard
        os.fsync(self._fh.fileno())
        self._valid_bytes += len(line)

    def start_split(self, split: str, plan: str, keep: int = 0) -> SplitProgress:
        """(Re)start ``split`` from plan ``plan``, keeping its first ``keep`` shards."""
        old = self.splits.get(split)
        prog = SplitProgress(plan, old.shards[:keep] if old is not None and old.plan == plan else [])
        self.splits[split] = prog
        self._append({"split": split, "plan": plan, "keep": len(prog.shards)})
        return prog

    def add_shard(self, split: str, entry: ShardEntry) -> None:
        self.splits[split].shards.append(entry)
        self._append({"split": split, "shard": entry.to_dict()})

    def split_done(self, split: str, tail: Counts | None) -> None:
        prog = self.splits[split]
        prog.done, prog.tail = True, tail
        self._append({"split": split, "done": True, "tail": None if tail is None else tail.to_dict()})

    def recorded_paths(self) -> list[str]:
        return [s.path for sp in self.splits.values() for s in sp.shards]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def journal_shard_paths(path: Path) -> list[str]:
    """Every shard path a journal file names (whatever its fingerprint), for
    ``--overwrite``'s clean-up; reads the old single-JSON journal too."""
    import json

    try:
        data = Path(path).read_bytes()
    except OSError:
        return []
    paths: list[str] = []
    for line in data.splitlines():
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if not isinstance(d, dict):
            continue
        shards = [d["shard"]] if isinstance(d.get("shard"), dict) else \
            [s for sp in (d.get("splits") or {}).values() if isinstance(sp, dict) for s in sp.get("shards", [])]
        paths += [s.get("path", "") for s in shards if isinstance(s, dict)]
    return [p for p in paths if isinstance(p, str)]
