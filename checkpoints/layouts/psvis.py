"""psvis (released PretrainPS weights): unprefixed ResNet or ShuffleNetV1 keys under ``state_dict``.

psvis loads ``torch.load(f)['state_dict']`` strictly into an mmdet-style
``ResNet`` (same names as torchvision, no fc) or its ``ShuffleNetV1`` (mmcv
``ConvModule`` names), so an export must hold exactly the architecture's keys.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import arch as archs
from .base import Conversion, backbone_to_canonical
from .torchvision import export_backbone

NAME = "psvis"
ORDER = 60          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "psvis/PretrainPS backbone: unprefixed ResNet or ShuffleNetV1 keys, no fc ({'state_dict': ...})"


def detect(keys: set[str]) -> bool:
    shufflenet = "conv1.conv.weight" in keys and any("g_conv_1x1_compress" in k for k in keys)
    resnet_no_fc = "conv1.weight" in keys and "layer1.0.conv1.weight" in keys and "fc.weight" not in keys
    return shufflenet or resnet_no_fc


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """psvis keys -> canonical (last stage -> ``roi_heads.box_head``)."""
    return backbone_to_canonical(NAME, sd)


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, *, seed: int = 0, **_: object) -> Conversion:
    """Canonical -> exactly the keys psvis' strict loader wants for ``arch``."""
    if arch not in archs.ARCHS:
        raise ValueError(f"psvis has no architecture {arch}")
    return export_backbone(canon, arch, NAME, with_fc=False, seed=seed)
