"""Stage 2 of a build, run in worker processes: read one record's image,
check it, encode it and produce the sample.

JPEGs pass through byte-identical (only an SOI/EOI check and a header read);
PNGs and raw arrays are decoded once and encoded to JPEG; re-ID crops are
decoded and re-encoded only when a canvas is baked.  Everything returned is
plain bytes/ints so results pickle cheaply back to the writer.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

from .. import imageio
from ..canvas import PLANNERS, apply_placement
from ..record import ImageRef, Record, box_is_degenerate, clip_box
from .options import CanvasOptions


@dataclass(frozen=True)
class EncodeSettings:
    jpeg_quality: int = 95
    canvas: CanvasOptions = field(default_factory=CanvasOptions)
    seed: int = 0
    # False in worker processes: a pass-through JPEG is re-read by the writer
    # from the page cache instead of being pickled back through a pipe.
    ship_passthrough: bool = True
    max_pixels: int = imageio.MAX_PIXELS
    verify_decode: bool = False
    max_side: int | None = None      # downscale images whose longer side is larger (--max-side)


@dataclass(frozen=True)
class Job:
    index: int          # position of the record in its split plan
    domain: int
    record: Record
    pids: list[int]


@dataclass
class Sample:
    index: int
    key: str
    jpg: bytes | None   # None: pass-through JPEG the writer reads itself (``jpg_len`` bytes)
    meta: bytes
    n_boxes: int
    n_ignore: int
    fixes: list[str] = field(default_factory=list)
    box_skips: list[tuple[str, str, str]] = field(default_factory=list)   # (reason, source, detail)
    dropped_boxes: list[int] = field(default_factory=list)               # box indices not written
    jpg_len: int = 0
    reload: tuple[ImageRef, str] | None = None   # (image, source) when ``jpg`` is None


@dataclass
class Dropped:
    index: int
    reason: str
    source: str
    detail: str = ""
    fixes: list[str] = field(default_factory=list)


def sample_key(dataset: str, split: str, key: str) -> str:
    return f"{dataset}-{split}-{key}"


def record_rng(seed: int, dataset: str, split: str, key: str) -> np.random.Generator:
    """Per-record randomness that does not depend on which worker runs it."""
    digest = hashlib.sha256(f"{seed}/{dataset}/{split}/{key}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}   # C4 DHT, C8 JPG, CC DAC


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the JPEG frame header by walking the marker
    segments -- a few microseconds, where opening with PIL costs ~0.2 ms per
    image on the pass-through path.  Falls back to PIL on anything unusual."""
    i, n = 2, len(data)
    while i + 9 < n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:           # fill byte
            i += 1
            continue
        if marker in _SOF_MARKERS:
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            if w > 0 and h > 0:
                return w, h
            break
        if marker == 0xDA:           # start of scan before any frame header
            break
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return imageio.image_size(data, "jpeg")


def _read(rec: Record, settings: EncodeSettings | None = None):
    """``(payload, fmt, (w, h))``; raises ImageError with a skip reason.  The
    size comes from the header and is checked against ``max_pixels`` before
    anything is decoded."""
    settings = settings or EncodeSettings()
    try:
        payload, fmt = imageio.load_encoded(rec.image)
    except imageio.ImageError:
        raise
    except Exception as e:  # LMDB/HDF5 errors from a damaged container
        raise imageio.ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None
    if fmt == "jpeg":
        imageio.check_jpeg_complete(payload)
        size = jpeg_size(payload)
        imageio.check_pixels(*size, settings.max_pixels)
        if settings.verify_decode:
            imageio.verify_jpeg_decode(payload)
        return payload, fmt, size
    if fmt == "png":
        imageio.check_pixels(*imageio.image_size(payload, fmt), settings.max_pixels)
        arr = imageio.decode_rgb(payload, fmt, settings.max_pixels)
        return arr, "raw", (arr.shape[1], arr.shape[0])
    if fmt == "raw":
        imageio.check_pixels(payload.shape[1], payload.shape[0], settings.max_pixels)
        return payload, fmt, (payload.shape[1], payload.shape[0])
    raise imageio.ImageError("corrupt_image", "neither JPEG nor PNG")


def _reconcile(rec: Record, size: tuple[int, int], fixes: list[str]):
    """Boxes and ignore regions in the real image frame.  Re-ID crops are the
    whole image by definition; other boxes are clipped when the header size
    disagrees with the parser's."""
    w, h = size
    if rec.task == "reid":
        if rec.width is not None and (rec.width, rec.height) != (w, h):
            fixes.append("image_size_mismatch")
        return [[0.0, 0.0, float(w), float(h)] for _ in rec.boxes], [list(b) for b in rec.ignore]
    if rec.width is None or rec.height is None or (rec.width, rec.height) == (w, h):
        return [list(map(float, b)) for b in rec.boxes], [list(map(float, b)) for b in rec.ignore]
    fixes.append("image_size_mismatch")
    return [clip_box(b, w, h) for b in rec.boxes], [clip_box(b, w, h) for b in rec.ignore]


def _bake_canvas(pixels, fmt: str, boxes, ignore, rec: Record, job_seed: int, canvas: CanvasOptions,
                 max_pixels: int = imageio.MAX_PIXELS):
    img = imageio.decode_rgb(pixels, fmt, max_pixels)
    size = (img.shape[1], img.shape[0])
    rng = record_rng(job_seed, rec.dataset, rec.split, rec.key)
    if canvas.mode == "expand_resize":
        placement = PLANNERS[canvas.mode](size, rng, canvas.size, canvas.ratio_range, canvas.fill)
    else:
        placement = PLANNERS[canvas.mode](size, rng, canvas.size, canvas.scale_range, canvas.fill)
    out, new_boxes = apply_placement(img, boxes, placement)
    new_ignore = placement.map_boxes(ignore).tolist() if ignore else []
    return out, new_boxes.tolist(), new_ignore, placement.to_dict()


def _usable_boxes(rec: Record, boxes):
    """Drop boxes that clipping made degenerate; returns kept indices and skips."""
    keep = [i for i, b in enumerate(boxes) if not box_is_degenerate(b)]
    skips = [("degenerate_box", rec.source, f"box {i} degenerate after clipping")
             for i in range(len(boxes)) if i not in keep]
    return keep, skips


def _encode_pixels(pixels, fmt: str, rec: Record, boxes, ignore, settings: EncodeSettings):
    """``(jpg or None, size, boxes, ignore, canvas_meta)``: pass-through JPEG,
    encoded PNG/raw, or a baked canvas for re-ID crops."""
    if rec.task == "reid" and settings.canvas.mode != "none":
        img, boxes, ignore, canvas_meta = _bake_canvas(pixels, fmt, boxes, ignore, rec, settings.seed, settings.canvas,
                                                        settings.max_pixels)
        return imageio.encode_jpeg(img, settings.jpeg_quality), settings.canvas.size, boxes, ignore, canvas_meta
    if fmt == "jpeg":
        return (pixels if settings.ship_passthrough else None), None, boxes, ignore, None
    return imageio.encode_jpeg(pixels, settings.jpeg_quality), None, boxes, ignore, None


def fit_max_side(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """``size`` scaled so its longer side is ``max_side`` (unchanged if it already fits)."""
    w, h = size
    if max(w, h) <= max_side:
        return size
    s = max_side / max(w, h)
    return max(1, min(max_side, round(w * s))), max(1, min(max_side, round(h * s)))


def _scale_boxes(boxes, sx: float, sy: float) -> list[list[float]]:
    return [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in boxes]


def downscale(pixels, fmt: str, size: tuple[int, int]) -> np.ndarray:
    """Decode (JPEGs at a DCT-reduced size no smaller than ``size``: 1/2 to 1/8
    of the pixels are never decoded) and resize to exactly ``size`` (w, h)."""
    import io

    from PIL import Image

    try:
        if fmt == "jpeg":
            with Image.open(io.BytesIO(pixels)) as im:
                im.draft("RGB", size)
                im.load()
                img = Image.fromarray(imageio._to_rgb8(im))
        else:
            img = Image.fromarray(np.ascontiguousarray(pixels))
        return np.asarray(img.resize(size, Image.Resampling.BILINEAR))
    except Exception as e:
        raise imageio.ImageError("corrupt_image", f"{type(e).__name__}: {e}") from None


def encode_job(job: Job, settings: EncodeSettings) -> Sample | Dropped:
    """Read, check and encode one record; a :class:`Dropped` says why not."""
    rec = job.record
    fixes: list[str] = []
    resize = None
    try:
        pixels, fmt, size = _read(rec, settings)
        boxes, ignore = _reconcile(rec, size, fixes)
        baked = rec.task == "reid" and settings.canvas.mode != "none"   # the canvas size bounds those
        if settings.max_side is not None and not baked:
            target = fit_max_side(size, settings.max_side)
            sx, sy = target[0] / size[0], target[1] / size[1]
            resize = {"max_side": settings.max_side, "scale": [sx, sy], "orig_size": [size[0], size[1]]}
            if target != size:
                boxes, ignore = _scale_boxes(boxes, sx, sy), _scale_boxes(ignore, sx, sy)
        keep, box_skips = _usable_boxes(rec, boxes)
        if not keep:
            return Dropped(job.index, "no_person", rec.source, "no usable box", fixes)
        boxes = [boxes[i] for i in keep]
        ignore = [b for b in ignore if not box_is_degenerate(b)]
        if resize is not None and target != size:
            pixels, fmt, size = downscale(pixels, fmt, target), "raw", target
        jpg, canvas_size, boxes, ignore, canvas_meta = _encode_pixels(pixels, fmt, rec, boxes, ignore, settings)
    except imageio.ImageError as e:
        return Dropped(job.index, e.reason, rec.source, e.detail, fixes)
    size = canvas_size or size
    meta = {
        "dataset": rec.dataset, "split": rec.split, "domain": job.domain, "task": rec.task,
        "labeled": rec.labeled, "width": int(size[0]), "height": int(size[1]),
        "boxes": boxes, "pids": [job.pids[i] for i in keep], "local_ids": [rec.ids[i] for i in keep],
        "ignore": ignore, "camera": rec.camera, "source": rec.source, "canvas": canvas_meta,
    }
    if settings.max_side is not None:
        meta["resize"] = resize     # None for baked canvases
    return Sample(
        index=job.index, key=sample_key(rec.dataset, rec.split, rec.key), jpg=jpg,
        meta=json.dumps(meta, sort_keys=True, separators=(",", ":"), default=_plain).encode(),
        n_boxes=len(boxes), n_ignore=len(ignore), fixes=fixes, box_skips=box_skips,
        dropped_boxes=[i for i in range(len(job.pids)) if i not in keep],
        jpg_len=len(pixels) if fmt == "jpeg" and canvas_meta is None else 0,
        reload=(rec.image, rec.source) if jpg is None else None,
    )


def reload_passthrough(image: ImageRef, expected_len: int) -> bytes:
    """The pass-through bytes a worker checked, read again by the writer."""
    data, fmt = imageio.load_encoded(image)
    if fmt != "jpeg" or len(data) != expected_len:
        raise imageio.ImageError("corrupt_image", "file changed while the build was reading it")
    imageio.check_jpeg_complete(data)
    return data


def _plain(obj):
    """numpy scalars from a parser (e.g. a camera id) as plain JSON numbers."""
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


# --------------------------------------------------------------------------- pool glue
_SETTINGS: EncodeSettings | None = None


def init_worker(settings: EncodeSettings) -> None:
    """Pool initializer: keep the settings and drop LMDB/HDF5 handles a
    forked worker may have inherited (each process opens its own)."""
    global _SETTINGS
    _SETTINGS = settings
    imageio._lmdb_env.cache_clear()
    imageio._h5_file.cache_clear()


def run_job(job: Job) -> Sample | Dropped:
    assert _SETTINGS is not None, "init_worker was not called"
    return encode_job(job, _SETTINGS)
