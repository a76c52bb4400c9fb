"""Two-view, box-aware augmentation (the SimSiam branch's two views).

Each view: horizontal flip -> a crop that keeps at least one person whole ->
resize into the model's size range (scale jitter via a random short side) ->
colour jitter.  Boxes go through the same geometry as
``tv_tensors.BoundingBoxes``.  Every box carries a ``track`` index (its row in
the source sample), so the model can pair a person's embedding in view 1
with the same person in view 2; a box that the crop cuts below
``min_visible`` of its area, or that ends smaller than ``min_box_size``, is
dropped from *that* view only.

All randomness comes from the numpy generator passed in (seeded per plan
position by the loader), never from torch's global RNG, so augmentation is
reproducible across workers, ranks and resumed runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F


@dataclass(frozen=True)
class ViewParams:
    min_size: tuple[int, ...] = (800,)
    max_size: int = 1333
    flip_prob: float = 0.5
    crop_prob: float = 0.5
    crop_scale: tuple[float, float] = (0.6, 1.0)
    min_visible: float = 0.5
    min_box_size: float = 2.0
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.05)

    @classmethod
    def from_config(cls, data_cfg, model_cfg) -> "ViewParams":
        """From a DataConfig and the ModelConfig.  Views are resized to the
        model's own input size: its transform would rescale them there anyway
        (one interpolation instead of two); the crop is the scale jitter."""
        return cls((int(model_cfg.min_size),), int(model_cfg.max_size), data_cfg.flip_prob, data_cfg.crop_prob,
                   tuple(data_cfg.crop_scale), data_cfg.min_visible, data_cfg.min_box_size,
                   tuple(data_cfg.color_jitter))


def _areas(b: torch.Tensor) -> torch.Tensor:
    return (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)


def sample_crop(width: int, height: int, boxes: torch.Tensor, rng: np.random.Generator,
                scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(left, top, crop_w, crop_h) of a random crop that contains one randomly
    chosen box entirely (the crop grows to fit it), so no view loses everyone."""
    cw = int(round(width * rng.uniform(*scale)))
    ch = int(round(height * rng.uniform(*scale)))
    if len(boxes):
        x1, y1, x2, y2 = boxes[int(rng.integers(len(boxes)))].tolist()
        cw = max(cw, int(np.ceil(x2)) - int(np.floor(x1)))
        ch = max(ch, int(np.ceil(y2)) - int(np.floor(y1)))
        cw, ch = min(max(cw, 1), width), min(max(ch, 1), height)
        lo_x, hi_x = max(0, int(np.ceil(x2)) - cw), min(int(np.floor(x1)), width - cw)
        lo_y, hi_y = max(0, int(np.ceil(y2)) - ch), min(int(np.floor(y1)), height - ch)
    else:
        cw, ch = max(cw, 1), max(ch, 1)
        lo_x, hi_x, lo_y, hi_y = 0, width - cw, 0, height - ch
    left = int(rng.integers(lo_x, max(lo_x, hi_x) + 1))
    top = int(rng.integers(lo_y, max(lo_y, hi_y) + 1))
    return left, top, cw, ch


def _jitter_colour(img: torch.Tensor, rng: np.random.Generator, strength) -> torch.Tensor:
    b, c, s, h = strength
    if b:
        img = F.adjust_brightness(img, float(rng.uniform(max(0.0, 1 - b), 1 + b)))
    if c:
        img = F.adjust_contrast(img, float(rng.uniform(max(0.0, 1 - c), 1 + c)))
    if s:
        img = F.adjust_saturation(img, float(rng.uniform(max(0.0, 1 - s), 1 + s)))
    if h:
        img = F.adjust_hue(img, float(rng.uniform(-h, h)))
    return img


def augment_view(image: torch.Tensor, boxes: torch.Tensor, pids: torch.Tensor, ignore: torch.Tensor,
                 rng: np.random.Generator, p: ViewParams) -> dict:
    """One augmented view.  ``image``: uint8 [3,H,W]; returns a float [0,1]
    image and the kept boxes with their ``pids`` and ``track`` indices."""
    h, w = image.shape[-2:]
    track = torch.arange(len(boxes), dtype=torch.int64)
    bx = tv_tensors.BoundingBoxes(boxes.reshape(-1, 4), format="XYXY", canvas_size=(h, w))
    ig = tv_tensors.BoundingBoxes(ignore.reshape(-1, 4), format="XYXY", canvas_size=(h, w))
    img = tv_tensors.Image(image)

    if rng.random() < p.flip_prob:
        img, bx, ig = F.horizontal_flip(img), F.horizontal_flip(bx), F.horizontal_flip(ig)

    keep = torch.ones(len(bx), dtype=torch.bool)
    if rng.random() < p.crop_prob:
        full_area = _areas(bx.as_subclass(torch.Tensor))
        left, top, cw, ch = sample_crop(w, h, bx.as_subclass(torch.Tensor), rng, p.crop_scale)
        img = F.crop(img, top, left, ch, cw)
        bx = F.crop(bx, top, left, ch, cw)
        ig = F.crop(ig, top, left, ch, cw)
        # F.crop clamps boxes to the crop, so the remaining area is what is visible
        keep &= _areas(bx.as_subclass(torch.Tensor)) >= p.min_visible * full_area.clamp(min=1e-6)
        h, w = ch, cw

    short = int(p.min_size[int(rng.integers(len(p.min_size)))])
    scale = min(short / min(h, w), p.max_size / max(h, w))
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    img, bx, ig = F.resize(img, [nh, nw], antialias=True), F.resize(bx, [nh, nw]), F.resize(ig, [nh, nw])

    b = bx.as_subclass(torch.Tensor).clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, nw)      # float rounding in resize can overshoot by ~1e-5
    b[:, 1::2] = b[:, 1::2].clamp(0, nh)
    keep &= ((b[:, 2] - b[:, 0]) >= p.min_box_size) & ((b[:, 3] - b[:, 1]) >= p.min_box_size)
    g = ig.as_subclass(torch.Tensor)
    g = g[((g[:, 2] - g[:, 0]) >= 1) & ((g[:, 3] - g[:, 1]) >= 1)]

    out = F.to_dtype(img.as_subclass(torch.Tensor), torch.float32, scale=True)
    out = _jitter_colour(out, rng, p.color_jitter).clamp_(0, 1)
    return {"image": out, "boxes": b[keep].float().contiguous(), "pids": pids[keep].clone(),
            "track": track[keep], "ignore": g.float().contiguous()}


def make_two_views(image, boxes, pids, ignore, rng: np.random.Generator, p: ViewParams) -> tuple[dict, dict]:
    """Two independent augmentations of the same image (same track indices)."""
    return augment_view(image, boxes, pids, ignore, rng, p), augment_view(image, boxes, pids, ignore, rng, p)
