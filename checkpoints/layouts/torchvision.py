"""torchvision / timm ResNet: unprefixed keys, optional ``fc`` classifier.

The same names are used by timm's default-stem ResNets, mmdet and psvis, so
this module also provides the backbone half of every other export.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .. import arch as archs
from .base import Conversion, backbone_to_canonical, backbone_view, fill_value, generator, linear_default, \
    mark_unused

NAME = "torchvision"
ORDER = 70          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = "torchvision/timm ResNet state_dict (conv1, bn1, layer1-4, optional fc)"


def detect(keys: set[str]) -> bool:
    return "conv1.weight" in keys and "layer1.0.conv1.weight" in keys


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """torchvision/timm ResNet keys -> canonical (``fc`` kept aside in ``extras``)."""
    return backbone_to_canonical(NAME, sd)


def export_backbone(canon: Mapping[str, torch.Tensor], arch: str, layout: str, *, with_fc: bool = False,
                    extras: Mapping[str, torch.Tensor] | None = None, seed: int = 0) -> Conversion:
    """Canonical -> the exact unprefixed key set of ``arch`` (fc only when asked).

    A missing ``num_batches_tracked`` is filled with 0 (FrozenBN sources have
    none and strict loaders want it); a missing fc is freshly initialised and
    said so; any other missing weight stays missing and the caller decides.
    """
    view = backbone_view(canon)
    conv = Conversion(layout)
    gen = generator(seed)
    extras = extras or {}
    fresh_nbt = 0
    for key, (shape, dtype) in archs.template(arch, with_fc=with_fc).items():
        if key in view:
            conv.put(key, canon[view[key]], view[key])
        elif key in extras:
            conv.put(key, extras[key], key)
        elif key.startswith("fc."):
            fan_in = archs.template(arch, with_fc=True)["fc.weight"][0][1]
            conv.put(key, linear_default(shape, gen, fan_in), None)
        elif (value := fill_value(key, shape, dtype)) is not None:
            conv.put(key, value, None)
            fresh_nbt += 1
        else:
            conv.missing.append(key)
    if with_fc and "fc.weight" not in extras:
        conv.notes.append("fc was not in the source: a fresh nn.Linear-initialised 1000-way classifier "
                          "was written so strict loaders accept the file (meaningless for ImageNet eval)")
    if fresh_nbt:
        conv.notes.append(f"{fresh_nbt} num_batches_tracked entries were absent in the source and set to 0")
    return mark_unused(conv, canon.keys())


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, *, with_fc: bool = False,
                   extras: Mapping[str, torch.Tensor] | None = None, seed: int = 0, **_: object) -> Conversion:
    """Canonical -> torchvision/timm ResNet state_dict."""
    if not archs.is_resnet(arch):
        raise ValueError(f"torchvision/timm targets need a ResNet backbone, not {arch}")
    return export_backbone(canon, arch, NAME, with_fc=with_fc, extras=extras, seed=seed)
