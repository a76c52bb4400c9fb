"""Put a re-ID crop on a canvas, with exact box bookkeeping.

Re-ID crops carry no context; the paper (PretrainPS, Sec. "data unification",
Tab. 4) places each crop on a larger canvas so the detector sees the person
at many scales:

* :func:`expand_resize` (the paper's choice) -- the crop sits at a random
  position on a canvas whose sides are a random multiple ``r ~ U(ratio_range)``
  of the crop's sides ("canvas of different ratios of the original image"),
  letterboxed to the output's aspect and resized to the fixed output size.
  One ratio serves both axes and the resize is uniform, so **the person keeps
  its aspect ratio** (a stretched person would teach the detector shapes it
  never meets); only its scale and position change.
* :func:`random_paste` (the ablation) -- the crop, scaled by a random factor
  from ``scale_range`` and shrunk further if it still does not fit, is pasted
  at a random position on a fixed-size canvas; no stretching.

Both functions are split into a *plan* (pure geometry, a :class:`Placement`)
and :func:`apply_placement` (pixels and boxes), so the shard builder can
record the parameters and the online loader can reuse the same code.

The crop is resized straight into an integer pixel rectangle of the output,
so the mapped boxes are exact: a box ``b`` on the crop maps to
``region[:2] + b * (region size / crop size)`` and the crop's pixels occupy
exactly ``region``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

FILLS = ("mean", "constant", "replicate")
# ImageNet mean RGB: a constant fill that normalises to ~0 in the model input.
CONSTANT_FILL = (124, 116, 104)


@dataclass(frozen=True)
class Placement:
    """Where a ``src_size`` crop lands on an ``out_size`` canvas.

    ``region`` = ``[x0, y0, x1, y1]`` (integers, x1/y1 exclusive) of the
    output that the resized crop covers.  ``ratio`` is the canvas/crop side
    ratio drawn per axis (expand_resize) and ``scale`` the crop scale
    (random_paste); the other one is ``None``.
    """

    mode: str
    src_size: tuple[int, int]       # (W, H) of the crop
    out_size: tuple[int, int]       # (W, H) of the output canvas
    region: tuple[int, int, int, int]
    ratio: tuple[float, float] | None = None
    scale: float | None = None
    fill: str = "mean"

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("src_size", "out_size", "region", "ratio"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    def map_boxes(self, boxes) -> np.ndarray:
        """Map xyxy boxes on the crop to xyxy boxes on the output canvas."""
        b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        x0, y0, x1, y1 = self.region
        sx = (x1 - x0) / self.src_size[0]
        sy = (y1 - y0) / self.src_size[1]
        out = np.empty_like(b)
        out[:, 0::2] = x0 + b[:, 0::2] * sx
        out[:, 1::2] = y0 + b[:, 1::2] * sy
        return out


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _check_sizes(src_size, out_size) -> tuple[tuple[int, int], tuple[int, int]]:
    sw, sh = (int(v) for v in src_size)
    ow, oh = (int(v) for v in out_size)
    if sw < 1 or sh < 1:
        raise ValueError(f"crop size must be positive, got {src_size}")
    if ow < 1 or oh < 1:
        raise ValueError(f"canvas size must be positive, got {out_size}")
    return (sw, sh), (ow, oh)


def _check_fill(fill: str) -> None:
    if fill not in FILLS:
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")


def plan_expand_resize(
    src_size: Sequence[int],
    rng,
    out_size: Sequence[int] = (256, 512),
    ratio_range: Sequence[float] = (1.0, 3.0),
    fill: str = "mean",
) -> Placement:
    """Draw an expand_resize placement (see the module docstring)."""
    (sw, sh), (ow, oh) = _check_sizes(src_size, out_size)
    lo, hi = float(ratio_range[0]), float(ratio_range[1])
    if not 1.0 <= lo <= hi:
        raise ValueError(f"ratio_range must satisfy 1 <= lo <= hi, got {tuple(ratio_range)}")
    _check_fill(fill)
    rng = _as_rng(rng)
    r = float(rng.uniform(lo, hi))
    # The canvas is (sw*r, sh*r), letterboxed to the output aspect and resized uniformly;
    # instead of building it we place the crop directly in output pixels: one scale for
    # both axes, set by the axis that limits.
    scale = min(ow / (r * sw), oh / (r * sh))
    cw, ch = sw * scale, sh * scale
    x0 = float(rng.uniform(0.0, ow - cw))
    y0 = float(rng.uniform(0.0, oh - ch))
    region = _snap(x0, y0, x0 + cw, y0 + ch, ow, oh)
    return Placement("expand_resize", (sw, sh), (ow, oh), region, ratio=(r, r), fill=fill)


def plan_random_paste(
    src_size: Sequence[int],
    rng,
    out_size: Sequence[int] = (256, 512),
    scale_range: Sequence[float] = (1.0, 1.0),
    fill: str = "mean",
) -> Placement:
    """Draw a random_paste placement: crop scaled by ``s ~ U(scale_range)``,
    shrunk (aspect kept) if it does not fit, at a uniform random position."""
    (sw, sh), (ow, oh) = _check_sizes(src_size, out_size)
    lo, hi = float(scale_range[0]), float(scale_range[1])
    if not 0.0 < lo <= hi:
        raise ValueError(f"scale_range must satisfy 0 < lo <= hi, got {tuple(scale_range)}")
    _check_fill(fill)
    rng = _as_rng(rng)
    s = float(rng.uniform(lo, hi))
    s = min(s, ow / sw, oh / sh)
    cw, ch = max(1, min(ow, round(sw * s))), max(1, min(oh, round(sh * s)))
    x0 = int(rng.integers(0, ow - cw + 1))
    y0 = int(rng.integers(0, oh - ch + 1))
    return Placement("random_paste", (sw, sh), (ow, oh), (x0, y0, x0 + cw, y0 + ch), scale=s, fill=fill)


def _snap(x0: float, y0: float, x1: float, y1: float, ow: int, oh: int) -> tuple[int, int, int, int]:
    """Round a float rectangle to whole output pixels (at least 1x1, inside)."""
    ix0 = min(max(int(round(x0)), 0), ow - 1)
    iy0 = min(max(int(round(y0)), 0), oh - 1)
    ix1 = min(max(int(round(x1)), ix0 + 1), ow)
    iy1 = min(max(int(round(y1)), iy0 + 1), oh)
    return ix0, iy0, ix1, iy1


def _resize(img: np.ndarray, w: int, h: int) -> np.ndarray:
    if img.shape[1] == w and img.shape[0] == h:
        return img
    from PIL import Image

    return np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))


def apply_placement(img: np.ndarray, boxes, placement: Placement) -> tuple[np.ndarray, np.ndarray]:
    """Render ``img`` (HxWx3 uint8, the crop) per ``placement``; returns the
    ``out_size`` canvas and the mapped boxes (n, 4) float64."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected an HxWx3 uint8 image, got {img.shape} {img.dtype}")
    if (img.shape[1], img.shape[0]) != tuple(placement.src_size):
        raise ValueError(
            f"image is {img.shape[1]}x{img.shape[0]} but the placement was planned for "
            f"{placement.src_size[0]}x{placement.src_size[1]}"
        )
    ow, oh = placement.out_size
    x0, y0, x1, y1 = placement.region
    patch = _resize(img, x1 - x0, y1 - y0)
    if placement.fill == "replicate":
        canvas = np.pad(patch, ((y0, oh - y1), (x0, ow - x1), (0, 0)), mode="edge")
    else:
        if placement.fill == "mean":
            value = img.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        else:
            value = np.array(CONSTANT_FILL, np.uint8)
        canvas = np.empty((oh, ow, 3), np.uint8)
        canvas[:] = value
        canvas[y0:y1, x0:x1] = patch
    return canvas, placement.map_boxes(boxes)


def expand_resize(
    img: np.ndarray,
    boxes,
    rng,
    out_size: Sequence[int] = (256, 512),
    ratio_range: Sequence[float] = (1.0, 3.0),
    fill: str = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's expand_resize: crop on a canvas ``r`` times its size
    (``r ~ U(ratio_range)``), letterboxed and resized to ``out_size`` (W, H), aspect kept."""
    p = plan_expand_resize((img.shape[1], img.shape[0]), rng, out_size, ratio_range, fill)
    return apply_placement(img, boxes, p)


def random_paste(
    img: np.ndarray,
    boxes,
    rng,
    out_size: Sequence[int] = (256, 512),
    scale_range: Sequence[float] = (1.0, 1.0),
    fill: str = "mean",
) -> tuple[np.ndarray, np.ndarray]:
    """The paper's random_paste ablation: crop pasted at a random position on
    a fixed ``out_size`` (W, H) canvas, downscaled if it does not fit."""
    p = plan_random_paste((img.shape[1], img.shape[0]), rng, out_size, scale_range, fill)
    return apply_placement(img, boxes, p)


PLANNERS = {"expand_resize": plan_expand_resize, "random_paste": plan_random_paste}
