"""UGAS modules: Shallow Fusion Module (SFM) and the Uncertainty Guidance head.

The poster (``ugas_uncertainty_shallow_features.txt``) describes, without equations:
multi-scale shallow features fused into one concise re-ID vector that is concatenated with the
deep (NAE) one -- its best variant ("Deep & Shallow (concat)") -- a deep -> shallow
self-distillation loss, and an uncertainty head whose variance lowers the weight of coarse
samples at no inference cost.  Our choices where it is silent:

* shallow scales: the stride-8 map (ResNet ``layer2``; in general the trunk stage before the
  last) RoI-aligned at the RoI size, and the stride-16 C4 RoI map the NAE head already pools;
  each reduced by 1x1 conv + BN + ReLU to ``channels``, summed, fused by a 3x3 conv + BN + ReLU,
  global max pooled (NAE's pooling) and projected by Linear + BN to ``dim`` (default 128).
* the re-ID vector at inference = [deep unit ; shallow unit] / sqrt(2) (unit norm; its cosine is
  the mean of the two branches' cosines), so the embedding grows from emb_dim to emb_dim + dim.
  The detection score stays the deep NAE norm.
* the shallow branch has its own OIM tables (``roi_heads.reid_loss_shallow``), fed the same
  samples in the same order as the deep one, so the two tables' columns are aligned.
* uncertainty head: Linear(C5 pooled -> 1) giving s = log sigma^2 per RoI, zero-initialised
  (training starts as plain OIM); it is used by the losses only (``roi_heads.uncertainty``).
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.ops import MultiScaleRoIAlign

SHALLOW = "feat_res3"


def _conv_bn_relu(cin: int, cout: int, k: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict(conv=nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
                                     bn=nn.BatchNorm2d(cout), relu=nn.ReLU(inplace=True)))


class ShallowFusion(nn.Module):
    """SFM: RoI maps of the shallow (stride 8) and C4 (stride 16) features -> raw vector [R, dim]."""

    def __init__(self, c3: int, c4: int, channels: int = 256, dim: int = 128, output_size: int = 14,
                 sampling_ratio: int = 2) -> None:
        super().__init__()
        self.dim = dim
        self.pool = MultiScaleRoIAlign([SHALLOW], output_size, sampling_ratio)
        self.reduce3 = _conv_bn_relu(c3, channels, 1)
        self.reduce4 = _conv_bn_relu(c4, channels, 1)
        self.fuse = _conv_bn_relu(channels, channels, 3)
        linear, bn = nn.Linear(channels, dim), nn.BatchNorm1d(dim)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.proj = nn.Sequential(linear, bn)

    def forward(self, features: dict[str, torch.Tensor], c4_maps: torch.Tensor, boxes: list[torch.Tensor],
                image_shapes: list[tuple[int, int]]) -> torch.Tensor:
        m3 = self.pool(features, boxes, image_shapes)
        x = self.fuse(self.reduce3(m3) + self.reduce4(c4_maps))
        return self.proj(torch.amax(x, dim=(2, 3)))


def fuse_embeddings(deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
    """Unit deep [R,D] and unit shallow [R,d] -> unit [R,D+d] (the poster's concat variant)."""
    return torch.cat([deep, shallow], dim=1) / math.sqrt(2.0)


class UncertaintyHead(nn.Module):
    """Per-RoI log-variance s = log sigma^2 from the pooled C5 vector; training only."""

    def __init__(self, c5: int) -> None:
        super().__init__()
        self.fc = nn.Linear(c5, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, feat_res5: torch.Tensor) -> torch.Tensor:
        return self.fc(feat_res5.flatten(1)).squeeze(1)


class StageTap:
    """Keeps the output of one trunk stage (a forward hook) for the SFM."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output) -> None:
        self.value = output

    def take(self) -> torch.Tensor:
        value, self.value = self.value, None
        if value is None:
            raise RuntimeError("SFM: the shallow trunk stage did not run")
        return value


def shallow_stage(body: nn.Module) -> tuple[str, nn.Module]:
    """The trunk stage before the last one (stride 8 for ResNet/ShuffleNet trunks)."""
    order = getattr(body, "order", None)
    if order is None:
        order = [name for name, _ in body.named_children()]
    stages = [p for p in order if any(True for _ in body.get_submodule(p).parameters())]
    if len(stages) < 2:
        raise ValueError("model.ugas_sfm needs a trunk with at least two stages")
    return stages[-2], body.get_submodule(stages[-2])


@torch.no_grad()
def probe_channels(body: nn.Module, module: nn.Module, size: int = 64) -> int:
    """Output channels of ``module`` inside ``body`` (one tiny forward in eval mode)."""
    tap = StageTap(module)
    was = body.training
    try:
        body.eval()
        body(torch.zeros(1, 3, size, size))
        return int(tap.take().shape[1])
    finally:
        tap.handle.remove()
        body.train(was)
