"""IIDFC Feature Compactness (FC) loss (Hou et al., IIDFC, eq. 13) on the OIM tables.

Logits are cosines between the unit embedding x_i and the unit table rows W_j ([LUT; CQ], the
OIM look-up table and circular queue).  For the sample's own identity the angle
theta_y = arccos(cos theta_y) gets a penalty factor and an additive angular margin, and every
logit is divided by the temperature tau:

    L_FC = -1/T sum_i log( e^{cos(m1 theta_y + m2)/tau}
                           / (e^{cos(m1 theta_y + m2)/tau} + sum_{j != y} e^{cos theta_j / tau}) )

Paper values: m1 = 0.9, m2 = 0.1, tau = 1/30 (= the OIM scalar 30 of NAE).  The tables are
updated exactly as OIM (momentum LUT, FIFO queue): only the target logit changes.
"""
from __future__ import annotations

import torch

from hybridps.pretrain.losses.oim import OIMLoss

# arccos has an infinite derivative at +-1; a cosine is kept this far inside.
ACOS_EPS = 1e-6


def fc_target_logits(cos: torch.Tensor, labels: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """cos [B,C] (cosines), labels [B] (column of each row's identity) -> cos with the target
    column replaced by cos(m1 * arccos(cos) + m2); the other columns are unchanged."""
    if cos.shape[0] == 0:
        return cos
    rows = torch.arange(cos.shape[0], device=cos.device)
    target = cos[rows, labels].clamp(-1.0 + ACOS_EPS, 1.0 - ACOS_EPS)
    return cos.index_put((rows, labels), torch.cos(m1 * torch.acos(target) + m2))


class FCLoss(OIMLoss):
    """OIM tables + the FC target logit (eq. 13); ``scalar`` = 1/tau."""

    def __init__(self, dim: int, num_pids: int, cq_size: int, momentum: float = 0.5,
                 scalar: float = 30.0, lut_dtype: str = "float32", m1: float = 0.9, m2: float = 0.1) -> None:
        super().__init__(dim, num_pids, cq_size, momentum, scalar, lut_dtype)
        self.m1, self.m2 = float(m1), float(m2)

    def adjust_logits(self, cos: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return fc_target_logits(cos, labels, self.m1, self.m2)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", m1={self.m1}, m2={self.m2}"
