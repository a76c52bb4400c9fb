"""The sample stages around the decode, and their composition per batch.

read_samples -> decode_samples (decode.py) -> unify_reid -> make_views -> collate;
:func:`batch_stages` chains them with webdataset's pipeline for one batch of plan
positions, :func:`device_batch` runs the stages after the decode on the GPU.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds

from hybridps.pretrain.augment import ViewParams, make_two_views
from hybridps.pretrain.data.config import DataConfig, DataError
from hybridps.pretrain.data.decode import decode_on_device, decode_samples
from hybridps.pretrain.data.plan import PlanItem, _plan_key, _rng
from hybridps.pretrain.data.reader import ShardReader


def read_samples(items: Iterable[tuple[int, PlanItem, int]], reader: ShardReader) -> Iterator[dict]:
    """(plan position, address, aug seed) -> raw sample dicts."""
    for pos, (s, i, r), seed in items:
        sample = reader.read(s, i)
        sample["__key__"] = _plan_key(sample["__key__"], r)
        sample["__pos__"] = pos
        sample["__seed__"] = seed
        sample["__shard__"] = reader.shards[s].url
        sample["__expect__"] = reader.expect(s)
        yield sample



def unify_reid(samples: Iterable[dict], mode: str = "expand_resize", out_size: Sequence[int] = (256, 512),
               ratio_range: Sequence[float] = (1.0, 3.0), scale_range: Sequence[float] = (1.0, 1.0)) -> Iterator[dict]:
    """Put re-ID crops that were not baked onto a canvas by the builder
    (task "reid", canvas null) on a canvas online (paper: data unification)."""
    from hybridps.data_prep import canvas

    for sample in samples:
        if sample["task"] == "reid" and sample["canvas"] is None:
            rng = _rng(sample["__seed__"], 0xCA)
            device = sample["image"].device          # the canvas is drawn with numpy on the CPU
            img = sample["image"].permute(1, 2, 0).cpu().numpy()
            if mode == "expand_resize":
                out, boxes = canvas.expand_resize(img, sample["boxes"].numpy(), rng, out_size, ratio_range)
            elif mode == "random_paste":
                out, boxes = canvas.random_paste(img, sample["boxes"].numpy(), rng, out_size, scale_range)
            else:
                raise DataError(f"unknown re-ID canvas mode {mode!r}")
            sample = dict(sample, image=torch.from_numpy(np.ascontiguousarray(out)).permute(2, 0, 1).to(device),
                          boxes=torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                          canvas={"mode": mode, "online": True})
        yield sample


def make_views(samples: Iterable[dict], params: ViewParams) -> Iterator[dict]:
    """Two independently augmented views per image (pretrain/augment.py)."""
    for sample in samples:
        rng = _rng(sample["__seed__"], 0xA6)
        v1, v2 = make_two_views(sample["image"], sample["boxes"], sample["pids"], sample["ignore"], rng, params)
        out = {k: v for k, v in sample.items() if k not in ("image", "boxes", "pids", "ignore")}
        out["view1"], out["view2"] = v1, v2
        yield out


def collate(samples: Sequence[dict]) -> dict:
    """List of viewed samples -> the batch the trainer consumes (keys last:
    accelerate's batch-size probing trips over a leading list of strings)."""
    def view(name):
        return {
            "images": [s[name]["image"] for s in samples],
            "targets": [{k: s[name][k] for k in ("boxes", "pids", "track", "ignore")} for s in samples],
        }

    return {
        "view1": view("view1"),
        "view2": view("view2"),
        "domain": torch.tensor([s["domain"] for s in samples], dtype=torch.int64),
        "labeled": torch.tensor([s["labeled"] for s in samples], dtype=torch.bool),
        "keys": [s["__key__"] for s in samples],
    }


def view_stages(samples: Iterable[dict], cfg: DataConfig, params: ViewParams) -> Iterator[dict]:
    """Decoded samples -> two views each (on whatever device their images are)."""
    return make_views(unify_reid(samples, cfg.reid_canvas, cfg.canvas_size, cfg.canvas_ratio, cfg.paste_scale),
                      params)


def batch_stages(items: Iterable, reader: ShardReader, cfg: DataConfig, params: ViewParams) -> Iterator[dict]:
    """Compose the sample stages with webdataset's pipeline (one sample list -> samples).
    With ``decode: cuda`` it stops after the checks: the views are made on the GPU."""
    stages = [lambda: iter(items), lambda src: read_samples(src, reader),
              lambda src: decode_samples(src, cfg.max_pixels, cfg.decode)]
    if cfg.decode != "cuda":
        stages.append(lambda src: view_stages(src, cfg, params))
    return iter(wds.DataPipeline(*stages))


def device_batch(samples: list[dict], cfg: DataConfig, params: ViewParams, device="cuda") -> dict:
    """A worker's checked, still encoded batch -> the collated batch, decoded and augmented
    on ``device`` (transforms.v2 run on GPU tensors; the random draws are the same numpy
    generators as on the CPU, so the crops, flips and box lists are the CPU path's)."""
    return collate(list(view_stages(decode_on_device(samples, device), cfg, params)))
