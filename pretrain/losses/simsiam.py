"""SimSiam-style consistency between two views (paper Eq. 5-6)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PredictionMLP(nn.Module):
    """SimSiam's 2-layer bottleneck predictor h: Linear -> BN -> ReLU -> Linear."""

    def __init__(self, dim: int = 256, hidden: int = 64) -> None:
        super().__init__()
        self.layer1 = nn.Sequential(nn.Linear(dim, hidden, bias=False), nn.BatchNorm1d(hidden),
                                    nn.ReLU(inplace=True))
        self.layer2 = nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Always runs, whatever the number of rows, so with SyncBatchNorm every rank joins the
        same collectives every step.  A plain BatchNorm cannot form batch statistics from fewer
        than two rows; such a call normalises with the running statistics instead."""
        linear, bn, relu = self.layer1
        h = linear(z)
        if bn.training and h.shape[0] < 2 and not isinstance(bn, nn.SyncBatchNorm):
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            h = bn(h)
        return self.layer2(relu(h))


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """C(sg(z), p): minus the mean cosine similarity of matching rows; z gets no gradient."""
    if p.shape[0] == 0:
        return p.sum() * 0.0
    return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """0.5 * C(sg(z2), p1) + 0.5 * C(sg(z1), p2); -1 when predictions match perfectly."""
    return 0.5 * negative_cosine(p1, z2) + 0.5 * negative_cosine(p2, z1)


@torch.no_grad()
def output_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: per-dimension std of the L2-normalised outputs, averaged over dims.

    About 1/sqrt(d) for healthy (spread) outputs, 0 for a collapsed constant output; NaN when
    fewer than two rows are given (a std needs two samples).
    """
    if z.shape[0] < 2:
        return torch.tensor(float("nan"), device=z.device)
    return F.normalize(z.float(), dim=1).std(dim=0).mean()
