"""Our own layout (``hybridps``): the search model's state_dict, CONTRACTS section 4.

Also the home of the head templates that NAE4PS/SeqNet exports share: the
shapes follow the backbone's C4/C5 widths and fresh values follow the
reference models' own initialisation (docs/clients.md section 3).
"""
from __future__ import annotations

from typing import Iterator, Mapping

import torch

from .. import arch as archs
from .base import BACKBONE, BOX_HEAD, REID_LOSS, Conversion, bn_entry, linear_default, \
    mark_unused, normal, normalise_rpn

NAME = "hybridps"
ORDER = 50          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "hybridps search model (NAE layout: backbone.*, rpn.head.*, roi_heads.{box_head,box_predictor,embedding_head}.*)"
OWN_PREFIXES = (BACKBONE, "rpn.head.", BOX_HEAD, "roi_heads.box_predictor.bbox_pred.", "roi_heads.embedding_head.")
FOREIGN_MARKERS = ("bottom_up.", "roi_heads.reid_head.", "roi_heads.box_predictor.cls_score.",
                   "roi_heads.faster_rcnn_predictor.", "backbone.stem.", "backbone.res2.")
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

# (key, shape, init) where init names how a fresh value is made
HeadSpec = tuple[str, tuple[int, ...], str]
RPN_CONV = "rpn.head.conv.0.0."


def detect(keys: set[str]) -> bool:
    # extra modules of the pre-training model (e.g. loss heads) are allowed: they are reported unused
    return any(k.startswith(BACKBONE) for k in keys) and \
        not any(m in k for k in keys for m in FOREIGN_MARKERS) and \
        not any(k.startswith(("roi_head.", "rpn_head.", "neck.")) for k in keys)


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """Identity, except that old RPN conv names are renamed and OIM buffers dropped."""
    conv = Conversion(NAME)
    for key, value in sd.items():
        new = normalise_rpn(key)
        if new.startswith(OWN_PREFIXES):
            conv.put(new, value, key)
    if any(k.startswith(REID_LOSS) for k in sd):
        conv.notes.append("roi_heads.reid_loss.{lut,cq} dropped: OIM memories are dataset-specific")
    return mark_unused(conv, sd.keys())


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, **_: object) -> Conversion:
    """Canonical -> canonical file (for initialising our own pre-training / fine-tuning)."""
    conv = to_canonical(canon)
    conv.layout = NAME
    return conv


def _bn(prefix: str, n: int, weight_init: str) -> Iterator[HeadSpec]:
    for entry in BN:
        shape = () if entry == "num_batches_tracked" else (n,)
        init = weight_init if entry == "weight" else f"bn_{entry}"
        yield f"{prefix}.{entry}", shape, init


def rpn_specs(c4: int, anchors: int = 15) -> list[HeadSpec]:
    """torchvision RPNHead on C4 (5 sizes x 3 ratios); N(0, 0.01) weights, zero bias."""
    return [(RPN_CONV + "weight", (c4, c4, 3, 3), "normal"), (RPN_CONV + "bias", (c4,), "zero"),
            ("rpn.head.cls_logits.weight", (anchors, c4, 1, 1), "normal"),
            ("rpn.head.cls_logits.bias", (anchors,), "zero"),
            ("rpn.head.bbox_pred.weight", (anchors * 4, c4, 1, 1), "normal"),
            ("rpn.head.bbox_pred.bias", (anchors * 4,), "zero")]



def box_regressor_specs(c5: int) -> list[HeadSpec]:
    """NAE BBoxRegressor with bn_neck: Linear(C5, 8) + BatchNorm1d(8)."""
    p = "roi_heads.box_predictor.bbox_pred"
    return [(f"{p}.0.weight", (8, c5), "normal"), (f"{p}.0.bias", (8,), "zero"), *_bn(f"{p}.1", 8, "normal")]


def embedding_specs(c4: int, c5: int, dim: int = 256) -> list[HeadSpec]:
    """NAE NormAwareEmbedding: per-feature Linear+BN1d projectors, BN1d(1) rescaler."""
    p = "roi_heads.embedding_head"
    out: list[HeadSpec] = []
    for name, width in (("feat_res4", c4), ("feat_res5", c5)):
        out += [(f"{p}.projectors.{name}.0.weight", (dim // 2, width), "normal"),
                (f"{p}.projectors.{name}.0.bias", (dim // 2,), "zero"),
                *_bn(f"{p}.projectors.{name}.1", dim // 2, "normal")]
    out += list(_bn(f"{p}.rescaler", 1, "one"))
    return out


def oim_specs(num_pids: int, cq_size: int, dim: int = 256) -> list[HeadSpec]:
    return [(REID_LOSS + "lut", (num_pids, dim), "zero"), (REID_LOSS + "cq", (cq_size, dim), "zero")]


def make_value(init: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """A fresh tensor for one head entry (see the *_specs functions for the names)."""
    if init == "normal":
        return normal(shape, 0.01, gen)
    if init == "zero":
        return torch.zeros(shape)
    if init == "one":
        return torch.ones(shape)
    if init.startswith("bn_"):
        return bn_entry(init[3:], shape[0] if shape else 0)
    if init.startswith("linear_default:"):
        return linear_default(shape, gen, int(init.split(":")[1]))
    raise ValueError(f"unknown init {init!r}")


def head_channels(arch: str) -> tuple[int, int]:
    if not archs.is_resnet(arch):
        raise ValueError(f"NAE-style heads are defined here for ResNet backbones only, not {arch}")
    return archs.resnet_channels(arch)
