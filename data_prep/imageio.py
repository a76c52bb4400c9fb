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

# Default for --max-pixels: the largest dataset image (CrowdHuman, ~20 Mpx) fits
# three times over; a 10 KB JPEG claiming 11000x11000 (121 Mpx, 363 MB decoded)
# does not.
MAX_PIXELS = 64_000_000

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
        except OSError as e:  # permission, is-a-directory, I/O error: there, but not readable
            raise ImageError("unreadable_file", f"{ref.path}: {e.strerror or e}") from None
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
    except Image.DecompressionBombError as e:
        raise ImageError("too_large_image", str(e)) from None
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
    except PermissionError as e:
        # not a dataset fault: reported as what it is, never as a missing file
        raise ImageError("unreadable_file", f"{path}: {e}") from None
    except Image.DecompressionBombError as e:
        raise ImageError("too_large_image", f"{path}: {e}") from None
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


def check_pixels(width: int, height: int, max_pixels: int = MAX_PIXELS, what: str = "") -> None:
    """Refuse from the header, before a decode allocates width*height*3 bytes."""
    if width * height > max_pixels:
        raise ImageError("too_large_image", f"{what}{width}x{height} = {width * height} pixels > "
                                            f"--max-pixels {max_pixels}")


def _to_rgb8(im) -> np.ndarray:
    """HxWx3 uint8.  16-bit greyscale (PNG ``I;16``, or ``I`` holding 0..65535)
    is scaled to 8 bit: PIL's ``convert("RGB")`` clips it, which turns every
    value above 255 -- nearly the whole image -- into white."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(im, dtype=np.int64) if im.mode == "I" else np.asarray(im).astype(np.int64)
        arr = (np.clip(arr, 0, 65535) >> 8).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0)
        hi = float(arr.max()) if arr.size else 0.0
        arr = np.clip(arr / hi * 255.0 if hi > 255 else arr, 0, 255).astype(np.uint8)
        return np.repeat(arr[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"))


def decode_rgb(payload, fmt: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Full decode to HxWx3 uint8 RGB; raises ImageError('corrupt_image' or 'too_large_image')."""
    if fmt == "raw":
        return payload
    from PIL import Image

    try:
        with Image.open(io.BytesIO(payload)) as im:
            check_pixels(im.width, im.height, max_pixels)
            im.load()
            return _to_rgb8(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_large_image", str(e)) from None
    except Exception as e:
        raise ImageError("corrupt_image", str(e)) from None


_RST = frozenset(range(0xD0, 0xD8))


def check_jpeg_scan(data: bytes) -> None:
    """Entropy-coded data may only hold ``FF 00`` (a stuffed byte) or restart
    markers ``FF D0..D7`` in cyclic order; anything else inside a scan is
    corruption that PIL decodes silently into grey or shifted blocks."""
    i, n = 2, len(data)
    while i + 2 <= n:
        if data[i] != 0xFF:
            raise ImageError("corrupt_image", f"JPEG: byte {i} is not a marker")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker == 0xD9:
            return
        if i + 4 > n:
            break
        seg = int.from_bytes(data[i + 2:i + 4], "big")
        if seg < 2:
            raise ImageError("corrupt_image", f"JPEG: bad segment length at byte {i}")
        i += 2 + seg
        if marker != 0xDA:
            continue
        expected_rst = 0xD0
        while True:                       # walk the entropy-coded data of this scan
            j = data.find(b"\xff", i)
            if j < 0 or j + 1 >= n:
                raise ImageError("corrupt_image", "JPEG: scan data runs to the end of the file")
            nxt = data[j + 1]
            if nxt == 0x00 or nxt == 0xFF:
                i = j + (2 if nxt == 0x00 else 1)
                continue
            if nxt in _RST:
                if nxt != expected_rst:
                    raise ImageError("corrupt_image", f"JPEG: restart marker out of order at byte {j}")
                expected_rst = 0xD0 + (expected_rst - 0xD0 + 1) % 8
                i = j + 2
                continue
            i = j                          # the next marker segment (or EOI)
            break
    raise ImageError("corrupt_image", "JPEG: no EOI after the last scan")


def verify_jpeg_decode(data: bytes) -> None:
    """The ``--verify-decode`` check of a pass-through JPEG: scan structure,
    then a full decode."""
    check_jpeg_scan(data)
    decode_rgb(data, "jpeg", max_pixels=1 << 62)
