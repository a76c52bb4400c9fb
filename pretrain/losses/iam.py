"""Intra-task alignment module (IAM, paper Fig. 4 / Eq. 7) and the optional inter-task alignment.

Follows Domain Adaptive Faster R-CNN (Chen et al. 2018; the reference implementation's
``DomainAdaptationModule``), which the paper cites for the module and its consistency term:

* the domain classifiers sit behind a gradient reversal layer (GRL): they learn to tell the
  datasets (domains) apart at full rate while the person-search features receive the
  reversed gradient scaled by ``grl_coef`` (reference: 0.1), pushing them towards
  domain-invariance.  The loss weight (``lambda``) and the reversal coefficient are separate
  knobs: the reference uses loss weight 1.0 and coefficient 0.1;
* the image-level loss is a cross entropy at *every position* of the image-level map,
  averaged over the positions that hold image content (never batch padding);
* the consistency regulariser compares the image-level domain probability (mean over the
  valid positions) with each instance's domain probability.  It runs through a second,
  **non-reversing** path (gradient scaled by ``+grl_coef``), so the backbone is pushed to make
  the two levels *agree*; behind the GRL it would be pushed to make them disagree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, coef: float) -> torch.Tensor:
        ctx.coef = coef
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.coef * grad, None


def grad_reverse(x: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by -coef."""
    return _GradReverse.apply(x, coef)


def grad_scale(x: torch.Tensor, coef: float = 1.0) -> torch.Tensor:
    """Identity forward; backward multiplies the gradient by +coef (the consistency path)."""
    return _GradReverse.apply(x, -coef)


class GradientReversal(nn.Module):
    """Module form of :func:`grad_reverse` (``coef`` may be changed during training)."""

    def __init__(self, coef: float = 1.0) -> None:
        super().__init__()
        self.coef = coef

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return grad_reverse(x, self.coef)

    def extra_repr(self) -> str:
        return f"coef={self.coef}"


class ImageDomainClassifier(nn.Module):
    """Cascaded 1x1 convs, then ``img_head``: a per-position FC giving domain logits [N,K,h,w].

    Averaging these logits over positions equals global pooling followed by the FC.
    """

    def __init__(self, in_channels: int, num_domains: int, hidden: int = 256) -> None:
        super().__init__()
        self.convs = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.ReLU(inplace=True),
                                   nn.Conv2d(hidden, hidden // 2, 1), nn.ReLU(inplace=True))
        self.img_head = nn.Conv2d(hidden // 2, num_domains, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.img_head(self.convs(x))


class InstanceDomainClassifier(nn.Module):
    """Two FC layers, then ``ins_head`` giving domain logits [R,K]."""

    def __init__(self, in_dim: int, num_domains: int, hidden: int = 256) -> None:
        super().__init__()
        self.fcs = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, hidden), nn.ReLU(inplace=True))
        self.ins_head = nn.Linear(hidden, num_domains)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ins_head(self.fcs(x))


def _full_mask(logits: torch.Tensor) -> torch.Tensor:
    n, _, h, w = logits.shape
    return torch.ones((n, h, w), dtype=torch.bool, device=logits.device)


def domain_ce(logits: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-class domain cross entropy.

    [N,K] logits: one term per row.  [N,K,h,w] logits: one term per position, averaged over
    the positions where ``mask`` [N,h,w] is True (all positions when None), as the reference
    image-level loss does.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    if logits.dim() == 2:
        return F.cross_entropy(logits, domains)
    mask = _full_mask(logits) if mask is None else mask
    target = domains[:, None, None].expand(-1, logits.shape[2], logits.shape[3])
    per_pos = F.cross_entropy(logits, target, reduction="none")
    valid = mask.to(per_pos.dtype)
    return (per_pos * valid).sum() / valid.sum().clamp(min=1.0)


def masked_mean_prob(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[N,K,h,w] logits -> [N,K] mean of the per-position softmax over the valid positions."""
    mask = _full_mask(logits) if mask is None else mask
    valid = mask[:, None].to(logits.dtype)
    prob = F.softmax(logits, dim=1) * valid
    return prob.sum(dim=(2, 3)) / valid.sum(dim=(2, 3)).clamp(min=1.0)


def consistency_loss(img_logits: torch.Tensor, ins_logits: torch.Tensor, ins_img_idx: torch.Tensor,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean L2 distance between each instance's domain probabilities and its image's.

    The image probability is the mean over the valid spatial positions of the per-position
    softmax.  Zero when both levels agree.
    """
    if ins_logits.shape[0] == 0:
        return img_logits.sum() * 0.0 + ins_logits.sum() * 0.0
    p_img = masked_mean_prob(img_logits, mask)
    p_ins = F.softmax(ins_logits, dim=1)
    diff = p_img[ins_img_idx] - p_ins
    # sqrt(x + eps) keeps the gradient finite where the two levels already agree exactly;
    # subtracting sqrt(eps) makes exact agreement cost exactly zero.
    eps = 1e-12
    return (torch.sqrt(diff.pow(2).sum(dim=1) + eps) - eps ** 0.5).mean()


@torch.no_grad()
def accuracy(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Share of rows whose arg-max equals the target (NaN for no rows); [N,K,h,w] logits are
    judged by their mean probability over the valid positions."""
    if logits.dim() == 4:
        logits = masked_mean_prob(logits, mask)
    if logits.shape[0] == 0:
        return torch.tensor(float("nan"), device=logits.device)
    return (logits.argmax(dim=1) == target).float().mean()


class IntraTaskAlignment(nn.Module):
    """One IAM: image-level + instance-level domain classifiers behind a GRL, plus consistency.

    ``forward(img_feat [N,C,h,w], img_domains [N], ins_feat [R,D], ins_img_idx [R], img_mask)``
    where ``ins_img_idx`` says which image-level row each instance belongs to and ``img_mask``
    [N,h,w] (optional) marks the positions holding image content.  Returns
    {loss_img, loss_ins, loss_cst, acc_img, acc_ins} (accuracies are detached monitors).
    """

    def __init__(self, img_channels: int, ins_dim: int, num_domains: int, grl_coef: float = 0.1,
                 img_hidden: int = 256, ins_hidden: int = 256) -> None:
        super().__init__()
        if num_domains < 2:
            raise ValueError(f"domain alignment needs >= 2 domains, got {num_domains}")
        self.grl = GradientReversal(grl_coef)
        self.img_cls = ImageDomainClassifier(img_channels, num_domains, img_hidden)
        self.ins_cls = InstanceDomainClassifier(ins_dim, num_domains, ins_hidden)

    def forward(self, img_feat: torch.Tensor, img_domains: torch.Tensor, ins_feat: torch.Tensor,
                ins_img_idx: torch.Tensor, img_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        coef = self.grl.coef
        img_logits = self.img_cls(grad_reverse(img_feat, coef))
        ins_logits = self.ins_cls(grad_reverse(ins_feat, coef))
        # The consistency term gets its own forward through the same classifiers on a
        # non-reversing path: the features are pulled to make both levels agree.
        img_cst = self.img_cls(grad_scale(img_feat, coef))
        ins_cst = self.ins_cls(grad_scale(ins_feat, coef))
        ins_domains = img_domains[ins_img_idx]
        return {
            "loss_img": domain_ce(img_logits, img_domains, img_mask),
            "loss_ins": domain_ce(ins_logits, ins_domains),
            "loss_cst": consistency_loss(img_cst, ins_cst, ins_img_idx, img_mask),
            "acc_img": accuracy(img_logits, img_domains, img_mask),
            "acc_ins": accuracy(ins_logits, ins_domains),
        }


class InterTaskAlignment(nn.Module):
    """Inter-task alignment (paper Tab. 5, off by default since it lowers mAP there).

    One task discriminator, behind a GRL, classifies per position whether a C4 feature map
    comes from the detection branch (the backbone map of a whole image, class 0) or from the
    re-ID branch (a RoI-aligned map, class 1).  Both branches share the channel width, so no
    per-task adapter can make the task trivially separable; the reversed gradient pushes the
    two tasks' features towards one distribution.  The two classes are weighted equally.
    """

    def __init__(self, channels: int, grl_coef: float = 0.1, hidden: int = 256) -> None:
        super().__init__()
        self.grl = GradientReversal(grl_coef)
        self.task_cls = ImageDomainClassifier(channels, 2, hidden)

    def forward(self, det_maps: torch.Tensor, reid_maps: torch.Tensor) -> dict[str, torch.Tensor]:
        det_logits = self.task_cls(self.grl(det_maps))
        reid_logits = self.task_cls(self.grl(reid_maps))
        det_t = torch.zeros(det_logits.shape[0], dtype=torch.long, device=det_logits.device)
        reid_t = torch.ones(reid_logits.shape[0], dtype=torch.long, device=reid_logits.device)
        loss = 0.5 * domain_ce(det_logits, det_t) + 0.5 * domain_ce(reid_logits, reid_t)
        acc = 0.5 * (accuracy(det_logits, det_t) + accuracy(reid_logits, reid_t))
        return {"loss_task": loss, "acc_task": acc}
