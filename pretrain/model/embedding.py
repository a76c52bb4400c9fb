"""NAE heads on the pooled RoI features: norm-aware embedding and the BN box regressor."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NormAwareEmbedding(nn.Module):
    """NAE: project each pooled map to dim/len(maps), concat, split into direction and norm.

    The unit vector is the re-ID embedding; the norm, rescaled by BatchNorm1d(1), is the
    person/background logit.  Keys: ``projectors.<map>.{0,1}``, ``rescaler``.
    """

    def __init__(self, in_channels: dict[str, int], dim: int = 256) -> None:
        super().__init__()
        parts = len(in_channels)
        if dim % parts:
            raise ValueError(f"embedding dim {dim} does not split evenly over {parts} maps")
        self.dim = dim
        self.projectors = nn.ModuleDict()
        for name, channels in in_channels.items():
            linear, bn = nn.Linear(channels, dim // parts), nn.BatchNorm1d(dim // parts)
            nn.init.normal_(linear.weight, std=0.01)
            nn.init.normal_(bn.weight, std=0.01)
            nn.init.zeros_(linear.bias)
            nn.init.zeros_(bn.bias)
            self.projectors[name] = nn.Sequential(linear, bn)
        self.rescaler = nn.BatchNorm1d(1, affine=True)

    def project(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """Un-normalised embedding [R, dim] (the SimSiam representation h)."""
        return torch.cat([proj(feats[name].flatten(1)) for name, proj in self.projectors.items()], dim=1)

    def split(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """raw [R,dim] -> (unit embeddings [R,dim], detection logits [R])."""
        norms = raw.norm(dim=1, keepdim=True)
        emb = raw / norms.clamp(min=1e-12)
        return emb, self.rescaler(norms).squeeze(1)

    def forward(self, feats: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.project(feats))


class BNBoxRegressor(nn.Module):
    """NAE box regressor: Linear(C5 -> 4*classes) + BatchNorm1d; key ``bbox_pred.{0,1}``."""

    def __init__(self, in_channels: int, num_classes: int = 2) -> None:
        super().__init__()
        linear, bn = nn.Linear(in_channels, 4 * num_classes), nn.BatchNorm1d(4 * num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.normal_(bn.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        nn.init.zeros_(bn.bias)
        self.bbox_pred = nn.Sequential(linear, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [R,C5,...] -> person box deltas [R,4] (class 1 of NAE's 2-class layout)."""
        return self.bbox_pred(x.flatten(1)).view(x.shape[0], -1, 4)[:, -1]


def max_pool_flat(x: torch.Tensor) -> torch.Tensor:
    """Global max pooling (NAE's res4/res5 pooling is max, despite its comment) -> [R,C,1,1]."""
    return F.adaptive_max_pool2d(x, 1)
