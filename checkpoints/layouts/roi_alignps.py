"""ROI-AlignPS (mmdet 2.x) whole-detector file for ``load_from=``.

The backbone-only ``pretrained=`` file is the :mod:`mmdet` layout: mmdet loads
it twice, into ``backbone`` and into the RoI ``shared_head`` (whose own keys
are ``layer4.*``).  Carrying the *pre-trained heads* needs full detector
names instead, loaded non-strictly by ``load_from``:

* ``backbone.*`` (incl. ``layer4``, which AlignPS' FPN-like neck still uses)
* ``roi_head.shared_head.layer4.*``     <- our RoI head (layer4)
* ``rpn_head.rpn_{conv,cls,reg}.*``     <- ``rpn.head.{conv.0.0,cls_logits,bbox_pred}``
* ``roi_head.bbox_head.fc_reg.{0,1}.*`` <- rows 4:8 (the person class) of NAE's 8-row regressor
* ``roi_head.bbox_head.embedding_head.projectors.{0,1}.{0,1}.*`` / ``rescaler.*``
  <- ``feat_res4`` / ``feat_res5`` / ``rescaler``

Neck, FCOS head, ``fc_cls``, DCN offsets and OIM buffers stay at mmdet's init.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import arch as archs
from .base import BACKBONE, BOX_HEAD, Conversion, backbone_view, mark_unused, normalise_rpn

NAME = "roi_alignps"
ORDER = 40          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "ROI-AlignPS whole detector for `load_from=` ({'state_dict', 'meta'}, mmdet names)"
SHARED = "roi_head.shared_head."
BBOX_HEAD = "roi_head.bbox_head."
RPN = {"rpn.head.conv.0.0.": "rpn_head.rpn_conv.", "rpn.head.cls_logits.": "rpn_head.rpn_cls.",
       "rpn.head.bbox_pred.": "rpn_head.rpn_reg."}
EMB = {"roi_heads.embedding_head.projectors.feat_res4.": BBOX_HEAD + "embedding_head.projectors.0.",
       "roi_heads.embedding_head.projectors.feat_res5.": BBOX_HEAD + "embedding_head.projectors.1.",
       "roi_heads.embedding_head.rescaler.": BBOX_HEAD + "embedding_head.rescaler."}
REG_SRC = "roi_heads.box_predictor.bbox_pred."
REG_DST = BBOX_HEAD + "fc_reg."
PERSON_ROWS = slice(4, 8)  # torchvision (N, 2, 4) layout: class index 1 = person


def detect(keys: set[str]) -> bool:
    return any(k.startswith(("roi_head.", "rpn_head.", "neck.")) for k in keys)


def _rename(key: str, table: Mapping[str, str]) -> str | None:
    for old, new in table.items():
        if key.startswith(old):
            return new + key[len(old):]
    return None


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, **_: object) -> Conversion:
    """Canonical -> mmdet detector names; only what the source holds is written."""
    if not archs.is_resnet(arch):
        raise ValueError(f"ROI-AlignPS needs a ResNet backbone, not {arch}")
    canon = {normalise_rpn(k): v for k, v in canon.items()}
    view = backbone_view(canon)
    conv = Conversion(NAME)
    for key, (shape, dtype) in archs.template(arch).items():
        if key not in view:
            conv.missing.append(BACKBONE + key)
            continue
        conv.put(BACKBONE + key, canon[view[key]], view[key])
        if key.startswith("layer4."):
            conv.put(SHARED + key, canon[view[key]], view[key])
    heads = 0
    for key, value in canon.items():
        new = _rename(key, RPN) or _rename(key, EMB)
        if new is None and key.startswith(REG_SRC):
            new = REG_DST + key[len(REG_SRC):]
            if value.ndim >= 1 and value.shape[0] == 8:
                value = value[PERSON_ROWS]
        if new is not None:
            conv.put(new, value, key)
            heads += 1
    if heads == 0:
        conv.notes.append("the source has no detection heads: only backbone and shared_head.layer4 are "
                          "written (the mmdet `pretrained=` file would do the same)")
    conv.notes.append("neck.*, the FCOS bbox_head.*, roi_head.bbox_head.fc_cls, DCN offsets and OIM "
                      "buffers are not in the source and stay at mmdet's initialisation")
    return mark_unused(conv, canon.keys())


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """mmdet detector names -> canonical; the RoI shared head wins over backbone.layer4."""
    conv = Conversion(NAME)
    has_shared = any(k.startswith(SHARED) for k in sd)
    for key, value in sd.items():
        if key.startswith(BACKBONE):
            inner = key[len(BACKBONE):]
            if inner.startswith("layer4.") and has_shared:
                continue
            if inner.split(".")[0] in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"):
                prefix = BOX_HEAD if inner.startswith("layer4.") else BACKBONE
                conv.put(prefix + inner, value, key)
        elif key.startswith(SHARED):
            conv.put(BOX_HEAD + key[len(SHARED):], value, key)
        elif (new := _rename(key, {v: k for k, v in RPN.items()}) or _rename(key, {v: k for k, v in EMB.items()})):
            conv.put(new, value, key)
        elif key.startswith(REG_DST):
            rows = value
            if value.ndim >= 1 and value.shape[0] == 4:
                # NAE's regressor has a background half that is never used; repeating the
                # person rows keeps its BatchNorm statistics sane.
                rows = torch.cat([value, value]) if value.ndim >= 1 else value
            conv.put(REG_SRC + key[len(REG_DST):], rows, key)
    if any(k.startswith(REG_DST) for k in sd):
        conv.notes.append("fc_reg is class-agnostic (4 rows): NAE's unused background rows were filled "
                          "with a copy of the person rows")
    return mark_unused(conv, sd.keys())
