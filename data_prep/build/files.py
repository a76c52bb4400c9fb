"""Crash-safe file writes: write a temporary file, fsync, rename over.

A killed process leaves either the old file or the new one, never half of
one; the temporary names end in ``.tmp`` so a resume can sweep them.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Persist a rename: fsync the directory entry (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(tmp: Path, final: Path, durable: bool = True) -> None:
    """Atomically move a fully written, fsynced ``tmp`` onto ``final``;
    ``durable`` also fsyncs the directory so the rename survives a power cut."""
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    commit(tmp, path, durable)


def dumps_json(obj) -> str:
    """Deterministic JSON (sorted keys) so identical builds give identical files."""
    return json.dumps(obj, indent=1, sort_keys=True, allow_nan=False) + "\n"     # NaN is not JSON


def atomic_write_json(path: Path, obj, durable: bool = True) -> None:
    atomic_write_bytes(path, dumps_json(obj).encode("utf-8"), durable)


def sha256_file(path: Path, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(bufsize), b""):
            h.update(chunk)
    return h.hexdigest()
