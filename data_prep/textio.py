"""Annotation text read line by line, each line decoded on its own.

``open(path, encoding="utf-8")`` raises UnicodeDecodeError at the first bad
byte and takes the whole dataset down with it; one damaged line should cost
that line (a ``malformed_annotation`` skip), not the build.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator


def utf8_lines(path: Path) -> Iterator[tuple[int, str | None, str]]:
    """``(lineno, stripped text or None, detail)`` per non-blank line; ``None``
    (with the decode error as detail) for a line that is not valid UTF-8.
    CRLF and LF files read alike."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                yield lineno, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if line:
                yield lineno, line, ""
