"""ShuffleNetV1 (groups=3, widen 1.0) with the module names of the released psvis weights.

The names (``conv1.conv``, ``layers.S.B.g_conv_1x1_compress.conv``, ``.bn``, ...) and shapes equal
``psvis_keys.json["shufflenetv1"]`` so the PretrainPS ShuffleNet file loads with strict=True.
The unit follows the mmcls ShuffleNetV1 order of operations (compress -> depthwise -> channel
shuffle -> expand), since released weights are only meaningful with the same forward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

NormFactory = Callable[[int], nn.Module]

STAGE_BLOCKS = (4, 8, 4)
CHANNELS_BY_GROUPS = {1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960),
                      4: (272, 544, 1088), 8: (384, 768, 1536)}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups so the next grouped conv mixes them."""
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class ConvBN(nn.Module):
    """Conv (no bias) + norm (+ optional ReLU); attribute names match mmcv's ConvModule."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 relu: bool = True, norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = norm(cout)
        self.act = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class ShuffleUnit(nn.Module):
    """One ShuffleNetV1 unit: residual add (stride 1) or avg-pooled concat (stride 2)."""

    def __init__(self, cin: int, cout: int, groups: int, downsample: bool, first_block: bool,
                 norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        self.groups = groups
        self.downsample = downsample
        bottleneck = cout // 4
        # A concat unit keeps the pooled input, so the branch only supplies the missing channels.
        branch_out = cout - cin if downsample else cout
        if not downsample and cin != cout:
            raise ValueError(f"a stride-1 ShuffleUnit needs cin == cout, got {cin} -> {cout}")
        # The first unit sees the 24-channel stem output, too narrow to split into groups.
        self.g_conv_1x1_compress = ConvBN(cin, bottleneck, 1, groups=1 if first_block else groups, norm=norm)
        self.depthwise_conv3x3_bn = ConvBN(bottleneck, bottleneck, 3, stride=2 if downsample else 1,
                                           groups=bottleneck, relu=False, norm=norm)
        self.g_conv_1x1_expand = ConvBN(bottleneck, branch_out, 1, groups=groups, relu=False, norm=norm)
        self.avgpool = nn.AvgPool2d(3, 2, 1) if downsample else None
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depthwise_conv3x3_bn(self.g_conv_1x1_compress(x))
        if self.groups > 1:
            out = channel_shuffle(out, self.groups)
        out = self.g_conv_1x1_expand(out)
        if self.downsample:
            return torch.cat((self.avgpool(x), self.act(out)), 1)
        return self.act(x + out)


def make_stage(cin: int, cout: int, blocks: int, groups: int, first_stage: bool,
               norm: NormFactory = nn.BatchNorm2d) -> nn.Sequential:
    """A stage: one stride-2 concat unit followed by ``blocks - 1`` residual units."""
    units = [ShuffleUnit(cin, cout, groups, True, first_stage, norm)]
    units += [ShuffleUnit(cout, cout, groups, False, False, norm) for _ in range(blocks - 1)]
    return nn.Sequential(*units)


class ShuffleNetV1(nn.Module):
    """Stem (3x3 s2 conv + 3x3 s2 max-pool) and three stages; returns every stage output.

    Strides 8/16/32 with 240/480/960 channels for groups=3.
    """

    def __init__(self, groups: int = 3, stage_blocks: Sequence[int] = STAGE_BLOCKS,
                 norm: NormFactory = nn.BatchNorm2d) -> None:
        super().__init__()
        if groups not in CHANNELS_BY_GROUPS:
            raise ValueError(f"ShuffleNetV1 groups must be one of {sorted(CHANNELS_BY_GROUPS)}, got {groups}")
        self.channels = CHANNELS_BY_GROUPS[groups]
        self.conv1 = ConvBN(3, 24, 3, stride=2, norm=norm)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cins = (24,) + self.channels[:-1]
        self.layers = nn.ModuleList(
            make_stage(cin, cout, n, groups, i == 0, norm)
            for i, (cin, cout, n) in enumerate(zip(cins, self.channels, stage_blocks)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.conv1(x))
        outs = []
        for stage in self.layers:
            x = stage(x)
            outs.append(x)
        return outs
