"""Backbone architectures: their exact key templates and detection from keys.

Templates are ``{name: (shape, dtype)}`` in the *unprefixed* backbone naming
shared by torchvision, timm, mmdet and psvis (ResNet) or psvis (ShuffleNetV1).
ResNet templates are read off torchvision models built on the meta device, so
no memory is allocated and they always match the installed torchvision.
"""
from __future__ import annotations

import functools
import re
from typing import Iterable, Mapping

import torch

Template = dict[str, tuple[tuple[int, ...], torch.dtype]]

# blocks per stage and block kind of the torchvision ResNets
RESNETS: dict[str, tuple[tuple[int, int, int, int], bool]] = {
    "resnet18": ((2, 2, 2, 2), False),
    "resnet34": ((3, 4, 6, 3), False),
    "resnet50": ((3, 4, 6, 3), True),
    "resnet101": ((3, 4, 23, 3), True),
    "resnet152": ((3, 8, 36, 3), True),
}
SHUFFLENETS = ("shufflenetv1",)
ARCHS = tuple(RESNETS) + SHUFFLENETS
BN_ENTRIES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class UnknownArchError(ValueError):
    """The keys do not describe a supported backbone."""


def is_resnet(arch: str) -> bool:
    return arch in RESNETS


@functools.lru_cache(maxsize=None)
def _resnet_template(arch: str) -> tuple[tuple[str, tuple[int, ...], torch.dtype], ...]:
    import torchvision

    with torch.device("meta"):
        model = getattr(torchvision.models, arch)(weights=None)
    return tuple((k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items())


def _shufflenetv1_template(groups: int = 3, channels: tuple[int, ...] = (240, 480, 960),
                           blocks: tuple[int, ...] = (4, 8, 4), stem: int = 24) -> Template:
    """psvis ShuffleNetV1 (mmcv ConvModule names: <name>.conv / <name>.bn, no conv bias)."""
    out: Template = {}

    def conv_module(name: str, shape: tuple[int, ...]) -> None:
        out[f"{name}.conv.weight"] = (shape, torch.float32)
        for entry in BN_ENTRIES:
            dtype = torch.int64 if entry == "num_batches_tracked" else torch.float32
            out[f"{name}.bn.{entry}"] = ((), dtype) if entry == "num_batches_tracked" else ((shape[0],), dtype)

    conv_module("conv1", (stem, 3, 3, 3))
    in_ch = stem
    for s, (out_ch, n) in enumerate(zip(channels, blocks)):
        for b in range(n):
            first = b == 0
            mid = out_ch // 4
            compress_groups = 1 if (s == 0 and first) else groups
            expand_out = out_ch - in_ch if first else out_ch  # unit 0 concatenates its shortcut
            prefix = f"layers.{s}.{b}"
            conv_module(f"{prefix}.g_conv_1x1_compress", (mid, in_ch // compress_groups, 1, 1))
            conv_module(f"{prefix}.depthwise_conv3x3_bn", (mid, 1, 3, 3))
            conv_module(f"{prefix}.g_conv_1x1_expand", (expand_out, mid // groups, 1, 1))
            in_ch = out_ch
    return out


def template(arch: str, with_fc: bool = False) -> Template:
    """Exact unprefixed backbone keys of ``arch`` (ResNet: fc only when asked)."""
    if arch in RESNETS:
        return {k: (s, d) for k, s, d in _resnet_template(arch) if with_fc or not k.startswith("fc.")}
    if arch == "shufflenetv1":
        return _shufflenetv1_template()
    raise UnknownArchError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")


_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.")


def detect_arch(backbone: Mapping[str, torch.Tensor] | Iterable[str]) -> str:
    """Name the architecture of an unprefixed backbone state_dict (or key list)."""
    keys = list(backbone.keys() if isinstance(backbone, Mapping) else backbone)
    if any(k.startswith("layers.") and "g_conv_1x1_compress" in k for k in keys):
        return "shufflenetv1"
    blocks = [0, 0, 0, 0]
    bottleneck = False
    for k in keys:
        m = _BLOCK.match(k)
        if m:
            stage, block = int(m.group(1)) - 1, int(m.group(2))
            blocks[stage] = max(blocks[stage], block + 1)
            bottleneck = bottleneck or ".conv3." in k
    for arch, (layout, is_bottleneck) in RESNETS.items():
        if is_bottleneck == bottleneck and tuple(blocks[:3]) == layout[:3] and blocks[3] in (0, layout[3]):
            return arch
    raise UnknownArchError(
        f"cannot tell the backbone from its keys (blocks per stage {blocks}, "
        f"{'bottleneck' if bottleneck else 'basic'} blocks); supported: {', '.join(ARCHS)}")


def resnet_channels(arch: str) -> tuple[int, int]:
    """(C4, C5) channel counts: what the RPN / RoI heads attach to."""
    _, bottleneck = RESNETS[arch]
    return (1024, 2048) if bottleneck else (256, 512)


def last_stage_prefix(arch: str) -> str:
    """The stage that runs as the RoI head in a C4 detector (``roi_heads.box_head``)."""
    return "layers.2." if arch == "shufflenetv1" else "layer4."
