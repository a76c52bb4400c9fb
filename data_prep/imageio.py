"""Fetch image bytes behind an :class:`~data_prep.record.ImageRef`.

``load_encoded(ref)`` returns ``(bytes, fmt)`` with fmt in {"jpeg", "png",
"raw"}; for ``raw`` the bytes are replaced by an HxWx3 uint8 array.  The
builder decides whether bytes pass through unchanged (JPEG) or are encoded
(PNG, raw arrays).  Open LMDB environments and HDF5 files are cached per
process, so worker processes each keep their own handles.
"""
from __future__ import annotations

import io
from functools import lru_cache

import numpy as np

from .record import ImageRef

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIG = b"\x89PNG\r\n\x1a\n"


class ImageError(Exception):
    """An image could not be read; ``reason`` is a manifest skip reason."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def sniff_format(data: bytes) -> str:
    if data[:2] == JPEG_SOI:
        return "jpeg"
    if data[:8] == PNG_SIG:
        return "png"
    return "unknown"


@lru_cache(maxsize=8)
def _lmdb_env(path: str):
    import lmdb

    return lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, subdir=True)


@lru_cache(maxsize=4)
def _h5_file(path: str):
    import h5py

    return h5py.File(path, "r")


def load_encoded(ref: ImageRef):
    """Return ``(payload, fmt)``.  Raises :class:`ImageError` on failure."""
    if ref.kind == "file":
        try:
            with open(ref.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ImageError("missing_file", ref.path) from None
        except OSError as e:  # permission, is-a-directory, ...
            raise ImageError("missing_file", f"{ref.path}: {e}") from None
        return data, sniff_format(data)
    if ref.kind == "lmdb":
        env = _lmdb_env(ref.path)
        with env.begin(write=False) as txn:
            data = txn.get(ref.key.encode("ascii"))
        if data is None:
            raise ImageError("missing_file", f"{ref.path}:{ref.key}")
        data = bytes(data)
        return data, sniff_format(data)
    if ref.kind == "hdf5":
        f = _h5_file(ref.path)
        if ref.key not in f:
            raise ImageError("missing_file", f"{ref.path}:{ref.key}")
        arr = np.asarray(f[ref.key][()])
        if arr.ndim != 3 or arr.size == 0:
            raise ImageError("empty_cell", f"{ref.path}:{ref.key} shape={arr.shape}")
        # MATLAB stores (H, W, 3) column-major, which HDF5 exposes as (3, W, H).
        img = np.ascontiguousarray(arr.T).astype(np.uint8)
        return img, "raw"
    raise ValueError(f"unknown ImageRef kind {ref.kind!r}")


def image_size(payload, fmt: str) -> tuple[int, int]:
    """(width, height) from the header only (no full decode)."""
    if fmt == "raw":
        h, w = payload.shape[:2]
        return int(w), int(h)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as im:
            return int(im.width), int(im.height)
    except Exception as e:  # PIL raises several types for garbage
        raise ImageError("corrupt_image", str(e)) from None


def header_size(path) -> tuple[int, int]:
    """(width, height) of an image file from its header only (no pixel
    decode).  Raises :class:`ImageError` with reason ``missing_file`` or
    ``corrupt_image``."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return int(im.width), int(im.height)
    except FileNotFoundError:
        raise ImageError("missing_file", str(path)) from None
    except Exception as e:  # PIL raises several types for unreadable headers
        raise ImageError("corrupt_image", f"{path}: {e}") from None


def header_size_or_reason(path) -> tuple[int, int] | str:
    """Like :func:`header_size`, but returns the skip reason instead of raising."""
    try:
        return header_size(path)
    except ImageError as e:
        return e.reason


def check_jpeg_complete(data: bytes) -> None:
    """Cheap integrity check for pass-through JPEGs: start-of-image marker,
    and an end-of-image marker within the last bytes (some encoders pad)."""
    if data[:2] != JPEG_SOI:
        raise ImageError("corrupt_image", "no JPEG SOI marker")
    if JPEG_EOI not in data[-16:]:
        raise ImageError("corrupt_image", "JPEG truncated (no EOI marker)")


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def decode_rgb(payload, fmt: str) -> np.ndarray:
    """Full decode to HxWx3 uint8 RGB; raises ImageError('corrupt_image')."""
    if fmt == "raw":
        return payload
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as im:
            im.load()
            return np.asarray(im.convert("RGB"))
    except Exception as e:
        raise ImageError("corrupt_image", str(e)) from None
