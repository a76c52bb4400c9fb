"""UGAS losses (Uncertainty Guided with Auxiliary Shallow features, a poster; see README).

* :func:`uncertainty_weighted` -- Uncertainty Guidance.  Each RoI embedding is read as an
  isotropic Gaussian whose mean is the embedding and whose variance sigma_i^2 = exp(s_i) is
  predicted by a small head.  The poster gives no equation; we use the Gaussian negative
  log-likelihood form of a per-sample loss (Kendall & Gal 2017):
      L = mean_i( exp(-s_i) * l_i + s_i )
  so a coarse sample (large predicted variance) contributes less to the re-ID gradient, and the
  + s_i term stops every variance from growing.  At s = 0 it equals the plain mean loss.
* :func:`self_distillation` -- deep -> shallow self-distillation: the temperature-softened
  KL divergence KL(p_deep || p_shallow) between the two branches' identity distributions over
  their (index-aligned) OIM tables, teacher detached, times T^2 (Hinton et al. 2015).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def uncertainty_weighted(per_sample: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """per_sample [B] losses, log_var [B] predicted log-variances -> scalar; 0 (graph-connected)
    for B = 0."""
    if per_sample.shape != log_var.shape:
        raise ValueError(f"per_sample {tuple(per_sample.shape)} and log_var {tuple(log_var.shape)} differ")
    if per_sample.numel() == 0:
        return per_sample.sum() * 0.0 + log_var.sum() * 0.0
    log_var = log_var.float()
    return (torch.exp(-log_var) * per_sample.float() + log_var).mean()


def self_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """T^2 * mean over rows of KL(softmax(teacher/T) || softmax(student/T)); teacher detached."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} differ")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=1)
    log_p = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.mean() * t * t


def table_logits(x: torch.Tensor, tables: list[torch.Tensor], scalar: float) -> torch.Tensor:
    """scalar * x [LUT; CQ]^T on a *copy* of the tables (the OIM update rewrites them in place
    during backward, so the copy keeps this product's saved operand intact)."""
    bank = torch.cat([t.float() for t in tables])
    return scalar * (x.float() @ bank.t())
