"""mmdet 2.x / AlignPS ``pretrained=`` file: unprefixed backbone keys under ``state_dict``.

mmcv's ``load_checkpoint(backbone, path, strict=False)`` matches nothing if
the keys carry a ``backbone.`` prefix, so this layout is the psvis one; it
includes ``layer4`` because AlignPS feeds C5 to its neck and ROI-AlignPS
initialises its RoI ``shared_head.layer4`` from the very same file.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import arch as archs
from .base import Conversion, backbone_to_canonical
from .torchvision import export_backbone

NAME = "mmdet"
ORDER = 80          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "mmdet/AlignPS `pretrained=` file: unprefixed ResNet keys incl. layer4 ({'state_dict', 'meta'})"


def detect(keys: set[str]) -> bool:
    # key-identical to psvis/torchvision: auto-detection reports those names
    return False


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """mmdet ResNet keys (DCN offsets and the like are reported unused) -> canonical."""
    return backbone_to_canonical(NAME, sd)


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, *, seed: int = 0, **_: object) -> Conversion:
    """Canonical -> unprefixed mmdet ResNet keys."""
    if not archs.is_resnet(arch):
        raise ValueError(f"mmdet/AlignPS targets need a ResNet backbone, not {arch}")
    return export_backbone(canon, arch, NAME, with_fc=False, seed=seed)
