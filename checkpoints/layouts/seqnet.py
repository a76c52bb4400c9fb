"""SeqNet: full-model ``{"model": state_dict, "epoch": 0}`` (loaded with strict=False).

Key set = ``seqnet_state_dict_keys.tsv``: as NAE4PS without ``cls_score``,
plus ``roi_heads.faster_rcnn_predictor`` (torchvision FastRCNNPredictor,
default Linear init) and ``roi_heads.reid_head.layer4`` -- SeqNet builds it as
``deepcopy(box_head)``, so it is a copy of layer4.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .base import Conversion
from .canonical import box_regressor_specs, embedding_specs, head_channels, oim_specs, rpn_specs
from .nae_common import assemble, body_rows, canonical_from_nae, head_rows, layer4_rows, rename_rpn

NAME = "seqnet"
ORDER = 20          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "SeqNet full model {'model': state_dict, 'epoch': 0} (reid_head = copy of layer4)"
REID_HEAD = "roi_heads.reid_head."
FRCNN = "roi_heads.faster_rcnn_predictor."


def detect(keys: set[str]) -> bool:
    return any(k.startswith(REID_HEAD) or k.startswith(FRCNN) for k in keys)


def plan(arch: str, num_pids: int, cq_size: int, legacy_rpn: bool = False) -> list:
    c4, c5 = head_channels(arch)
    frcnn = [(FRCNN + "cls_score.weight", (2, c5), f"linear_default:{c5}"),
             (FRCNN + "cls_score.bias", (2,), f"linear_default:{c5}"),
             (FRCNN + "bbox_pred.weight", (8, c5), f"linear_default:{c5}"),
             (FRCNN + "bbox_pred.bias", (8,), f"linear_default:{c5}")]
    rows = body_rows(arch) + head_rows(rpn_specs(c4)) + layer4_rows(arch, "roi_heads.box_head.") \
        + head_rows(box_regressor_specs(c5)) + head_rows(embedding_specs(c4, c5)) \
        + head_rows(oim_specs(num_pids, cq_size), False) + head_rows(frcnn, False) \
        + layer4_rows(arch, REID_HEAD)
    return rename_rpn(rows, legacy_rpn)


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, *, num_pids: int = 5532, cq_size: int = 5000,
                   legacy_rpn: bool = False, seed: int = 0, **_: object) -> Conversion:
    """Canonical -> every SeqNet key; reid_head.layer4 copies box_head.layer4."""
    conv = assemble(NAME, canon, plan(arch, num_pids, cq_size, legacy_rpn), seed)
    conv.notes.append("roi_heads.reid_head.layer4 is a copy of box_head.layer4 (SeqNet deep-copies it)")
    conv.notes.append(f"roi_heads.reid_loss.lut/cq zero-filled at {num_pids}/{cq_size}; "
                      "the pre-training OIM memory is never exported")
    return conv


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """SeqNet keys -> canonical: box_head.layer4 is kept; the reid_head copy and predictor are not."""
    conv = canonical_from_nae(NAME, sd, (REID_HEAD, FRCNN, "roi_heads.reid_loss."))
    conv.notes.append("roi_heads.reid_head.layer4 and faster_rcnn_predictor have no place in our model")
    return conv
