"""IIDFC Pedestrian Attention Module (PAM; Hou et al., IIDFC, eqs. 5-7, Fig. 4).

    F' = M_p(F) (x) F
    M_p(F) = sigmoid( f_1x1( SE([C_1; C_2; C_3]) ) )
    C_i = ReLU( f^{3x3}_{d_i}( [avg_c(F); max_c(F)] ) ),  d = 1, 2, 3, one shared 3x3 kernel

avg_c / max_c pool over the channel axis (a 2-channel descriptor), the three dilated
convolutions share their weights (padding = dilation keeps the size), SE (squeeze-and-excitation)
re-weights the 3k concatenated channels, a 1x1 convolution gives the one-channel spatial map.
Placement (paper Fig. 3/9): on the layer4 (res5) maps of the re-ID network, i.e. on the RoI
head's output, before pooling.  Not given by the paper, our choices: k = ``channels`` = 8 output
channels of the shared 3x3 convolution, SE reduction 4 (min 1 hidden unit), PyTorch default
initialisation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SqueezeExcite(nn.Module):
    """SE (Hu et al.): global average pool -> FC -> ReLU -> FC -> sigmoid -> channel scale."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1, self.fc2 = nn.Conv2d(channels, hidden, 1), nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * w


class PedestrianAttention(nn.Module):
    """PAM; keys ``conv.{weight,bias}``, ``se.fc1.*``, ``se.fc2.*``, ``out.*``."""

    def __init__(self, channels: int = 8, dilations: tuple[int, ...] = (1, 2, 3), se_reduction: int = 4) -> None:
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.conv = nn.Conv2d(2, channels, 3)            # shared by every dilation
        self.se = SqueezeExcite(channels * len(self.dilations), se_reduction)
        self.out = nn.Conv2d(channels * len(self.dilations), 1, 1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """x [R,C,H,W] -> M_p [R,1,H,W] in (0, 1)."""
        desc = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        branches = [F.relu(F.conv2d(desc, self.conv.weight, self.conv.bias, padding=d, dilation=d))
                    for d in self.dilations]
        return torch.sigmoid(self.out(self.se(torch.cat(branches, dim=1))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)
