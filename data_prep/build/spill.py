"""A split's records on disk instead of in memory.

LUPerson has 4M crops; a :class:`~data_prep.record.Record` costs about a
kilobyte as Python objects, so holding every record of a split (as the build
once did) grew the builder's memory with the dataset.  A spill keeps them as
JSON lines in an anonymous temporary file next to the output (unlinked at
creation: a killed build leaves nothing behind) and streams them back in
order.  What stays in memory per record is 16 bytes: the line's offset and a
64-bit hash of its key for the duplicate-key check.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from ..record import ImageRef, Record

_READ_BLOCK = 1 << 20


def _plain(obj):
    """numpy scalars from a parser (e.g. a camera id) as plain JSON numbers."""
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dump_record(rec: Record) -> bytes:
    row = [rec.dataset, rec.split, rec.key, [rec.image.kind, rec.image.path, rec.image.key], rec.task,
           rec.labeled, rec.boxes, rec.ids, rec.ignore, rec.width, rec.height, rec.camera, rec.source, rec.extra]
    return json.dumps(row, separators=(",", ":"), default=_plain).encode() + b"\n"


def load_record(line: bytes) -> Record:
    (dataset, split, key, image, task, labeled, boxes, ids, ignore, width, height, camera, source,
     extra) = json.loads(line)
    return Record(dataset, split, key, ImageRef(*image), task, labeled, boxes, ids, ignore, width, height,
                  camera, source, extra)


def _key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


class RecordSpill:
    """Append-only record store; positions are append order, *indices* count
    only the records that were not dropped (duplicates, ``--limit``)."""

    def __init__(self, directory: str | Path | None = None):
        self._file = tempfile.TemporaryFile(dir=directory, prefix=".records-")
        self._fd = self._file.fileno()
        self._ends = array("Q")       # end offset of each line
        self._hashes = array("Q")     # key hash of each line
        self._dropped: set[int] = set()

    def __len__(self) -> int:
        return len(self._ends) - len(self._dropped)

    def append(self, rec: Record) -> None:
        line = dump_record(rec)
        self._file.write(line)
        self._ends.append((self._ends[-1] if self._ends else 0) + len(line))
        self._hashes.append(_key_hash(rec.key))

    def close(self) -> None:
        self._file.close()

    # ------------------------------------------------------------------ reading
    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(position, line) of every appended record, dropped ones included."""
        self._file.flush()
        total = self._ends[-1] if self._ends else 0
        offset, pos, buf = 0, 0, b""
        while offset < total:
            chunk = os.pread(self._fd, min(_READ_BLOCK, total - offset), offset)
            if not chunk:
                raise OSError(f"record spill truncated at byte {offset} of {total}")
            offset += len(chunk)
            buf += chunk
            lines = buf.split(b"\n")
            buf = lines.pop()
            for line in lines:
                yield pos, line
                pos += 1

    def _line_at(self, pos: int) -> bytes:
        self._file.flush()
        start = self._ends[pos - 1] if pos else 0
        return os.pread(self._fd, self._ends[pos] - start, start)

    def lines(self) -> Iterator[bytes]:
        """Kept records as their JSON lines, in order (for hashing)."""
        for pos, line in self._lines():
            if pos not in self._dropped:
                yield line

    def records(self) -> Iterator[Record]:
        for line in self.lines():
            yield load_record(line)

    def keys(self) -> Iterator[str]:
        for rec in self.records():
            yield rec.key

    # ------------------------------------------------------------------ dropping
    def keep_only(self, keys: set[str]) -> None:
        for pos, line in self._lines():
            if pos not in self._dropped and load_record(line).key not in keys:
                self._dropped.add(pos)

    def drop_duplicate_keys(self) -> list[Record]:
        """Drop every record whose key an earlier record already has; returns
        the dropped records in order.  Hash matches are confirmed on the keys
        themselves, so a 64-bit collision never drops a record."""
        if not self._hashes:
            return []
        h = np.frombuffer(self._hashes, dtype=np.uint64)
        order = np.argsort(h, kind="stable")
        sh = h[order]
        same = np.flatnonzero(sh[1:] == sh[:-1])
        if not len(same):
            return []
        groups: dict[int, list[int]] = {}
        for j in same:
            groups.setdefault(int(sh[j]), []).extend((int(order[j]), int(order[j + 1])))
        dropped = []
        for positions in groups.values():
            seen: set[str] = set()
            for pos in sorted(set(positions)):
                rec = load_record(self._line_at(pos))
                if rec.key in seen:
                    dropped.append((pos, rec))
                else:
                    seen.add(rec.key)
        dropped.sort(key=lambda x: x[0])
        self._dropped.update(pos for pos, _ in dropped)
        return [rec for _, rec in dropped]
