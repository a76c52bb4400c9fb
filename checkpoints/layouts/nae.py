"""NAE4PS (official NAE): full-model ``{"model": state_dict, "epoch": 0}`` loaded strictly.

Key set = ``nae4ps_state_dict_keys.tsv``: backbone (conv1..layer3), RPN,
``roi_heads.box_head.layer4``, box regressor, the unused-but-present
``roi_heads.box_predictor.cls_score`` and the OIM ``lut``/``cq`` sized for the
target dataset.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .base import Conversion
from .canonical import box_regressor_specs, embedding_specs, head_channels, oim_specs, rpn_specs
from .nae_common import assemble, body_rows, canonical_from_nae, head_rows, layer4_rows, rename_rpn

NAME = "nae"
ORDER = 30          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "NAE4PS full model {'model': state_dict, 'epoch': 0} (strict load)"
CLS_SCORE = "roi_heads.box_predictor.cls_score."


def detect(keys: set[str]) -> bool:
    return any(k.startswith(CLS_SCORE) for k in keys) and any(k.startswith("backbone.layer1.") for k in keys)


def plan(arch: str, num_pids: int, cq_size: int, legacy_rpn: bool = False) -> list:
    c4, c5 = head_channels(arch)
    rows = body_rows(arch) + head_rows(rpn_specs(c4)) + layer4_rows(arch, "roi_heads.box_head.") \
        + head_rows(box_regressor_specs(c5)) \
        + head_rows([(CLS_SCORE + "weight", (2, c5), "normal"), (CLS_SCORE + "bias", (2,), "zero")], False) \
        + head_rows(embedding_specs(c4, c5)) + head_rows(oim_specs(num_pids, cq_size), False)
    return rename_rpn(rows, legacy_rpn)


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, *, num_pids: int = 5532, cq_size: int = 5000,
                   legacy_rpn: bool = False, seed: int = 0, **_: object) -> Conversion:
    """Canonical -> every NAE4PS key; absent heads get NAE's own init, lut/cq are zeros."""
    conv = assemble(NAME, canon, plan(arch, num_pids, cq_size, legacy_rpn), seed)
    conv.notes.append(f"roi_heads.reid_loss.lut/cq zero-filled at {num_pids}/{cq_size} "
                      "(the target dataset's sizes); the pre-training OIM memory is never exported")
    return conv


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """NAE4PS keys -> canonical (cls_score and lut/cq are not carried)."""
    return canonical_from_nae(NAME, sd, (CLS_SCORE, "roi_heads.reid_loss."))
