"""PSDiff's set-prediction loss (seed Eq. 13-14): Hungarian matching, focal classification,
L1 + GIoU on the boxes, L2 between predicted and teacher re-ID embeddings.

The matching cost uses the same terms and weights as the loss (Sparse R-CNN / DETR; the seed
says the cost is Eq. 13), solved by scipy's ``linear_sum_assignment`` per image: one
prediction per person (the seed's bipartite matching) or, with ``match_dynamic_k`` (our
choice), DiffusionDet's number of positives per person -- with the ground truths duplicated
N_train/M times, one-to-one matching leaves the near-copies of a person as negatives the
classifier cannot tell apart from the positive (a one-box overfit stalls at score 1/N).  Losses are
returned unweighted and summed over stages (deep supervision, as DiffusionDet); the weights
live in ``train.loss_weights`` (paper: cls 2, L1 5, GIoU 2, re-ID 5).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torchvision.ops import box_iou, generalized_box_iou, sigmoid_focal_loss

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0


def match_cost(logits: torch.Tensor, boxes: torch.Tensor, emb: torch.Tensor, gt_boxes: torch.Tensor,
               gt_emb: torch.Tensor, wh: torch.Tensor, weights: dict[str, float]) -> torch.Tensor:
    """[N, M] cost of assigning prediction i to ground truth j (lower is better).

    ``logits`` [N] person logits, ``boxes`` [N,4] / ``gt_boxes`` [M,4] absolute xyxy, ``emb`` /
    ``gt_emb`` unit embeddings; L1 is measured on boxes divided by the image size.
    """
    p = logits.sigmoid()[:, None]
    pos = FOCAL_ALPHA * (1 - p) ** FOCAL_GAMMA * (-(p + 1e-8).log())
    neg = (1 - FOCAL_ALPHA) * p ** FOCAL_GAMMA * (-(1 - p + 1e-8).log())
    scale = torch.cat([wh, wh])
    cost = weights.get("loss_cls", 1.0) * (pos - neg)
    cost = cost + weights.get("loss_l1", 1.0) * torch.cdist(boxes / scale, gt_boxes / scale, p=1)
    cost = cost - weights.get("loss_giou", 1.0) * generalized_box_iou(boxes, gt_boxes)
    cost = cost + weights.get("loss_reid", 1.0) * torch.cdist(emb, gt_emb, p=2)
    return cost


@torch.no_grad()
def hungarian_match(cost: torch.Tensor, k: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction indices, ground-truth indices) minimising the total cost.

    ``k`` None: one prediction per ground truth (bipartite, DETR).  ``k`` [M]: ground truth j
    may take k[j] predictions -- its column is repeated k[j] times and the same
    ``linear_sum_assignment`` solves it (each prediction still goes to at most one person).
    """
    if cost.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=cost.device)
        return empty, empty
    c = cost.detach().float().cpu()
    cols = torch.arange(c.shape[1]) if k is None else torch.repeat_interleave(torch.arange(c.shape[1]), k.cpu())
    c = np.nan_to_num(c[:, cols].numpy(), nan=1e6, posinf=1e6, neginf=-1e6)
    rows, picked = linear_sum_assignment(c)
    return (torch.as_tensor(rows, dtype=torch.long, device=cost.device),
            cols[torch.as_tensor(picked, dtype=torch.long)].to(cost.device))


def dynamic_k(boxes: torch.Tensor, gt_boxes: torch.Tensor, top: int = 5) -> torch.Tensor:
    """DiffusionDet/OTA-style number of positives per ground truth: the sum of its ``top``
    best IoUs with the predictions, at least 1."""
    iou = box_iou(boxes, gt_boxes)
    return iou.topk(min(top, iou.shape[0]), dim=0).values.sum(0).int().clamp(min=1)


def set_losses(logits: torch.Tensor, boxes: torch.Tensor, emb: torch.Tensor, targets: list[dict],
               weights: dict[str, float], match_dynamic_k: bool = False) -> dict[str, torch.Tensor]:
    """One stage's losses over a batch.

    ``logits`` [B,N], ``boxes`` [B,N,4] (absolute xyxy), ``emb`` [B,N,D] raw predicted
    embeddings; each target holds ``boxes`` [M,4], ``emb`` [M,D] (unit teacher embeddings)
    and ``wh`` [2].  Normalised by the number of matched pairs in the batch (at least 1; = the
    number of ground truths with bipartite matching).  ``match_dynamic_k``: several predictions
    per person (:func:`dynamic_k`), see :func:`hungarian_match`.
    """
    matches = []
    for b, t in enumerate(targets):
        if t["boxes"].shape[0] == 0:
            matches.append(None)
            continue
        with torch.no_grad():
            cost = match_cost(logits[b], boxes[b], F.normalize(emb[b], dim=-1), t["boxes"], t["emb"], t["wh"], weights)
            k = dynamic_k(boxes[b], t["boxes"]) if match_dynamic_k else None
        matches.append(hungarian_match(cost, k))
    n_gt = max(1, sum(int(m[0].numel()) for m in matches if m is not None))
    cls_target = torch.zeros_like(logits)
    l1 = giou = reid = logits.sum() * 0.0
    unit = F.normalize(emb, dim=-1)
    for b, t in enumerate(targets):
        if matches[b] is None:
            continue
        pi, gi = matches[b]
        cls_target[b, pi] = 1.0
        scale = torch.cat([t["wh"], t["wh"]])
        l1 = l1 + F.l1_loss(boxes[b, pi] / scale, t["boxes"][gi] / scale, reduction="sum")
        giou = giou + (1 - torch.diag(generalized_box_iou(boxes[b, pi], t["boxes"][gi]))).sum()
        reid = reid + (unit[b, pi] - t["emb"][gi]).norm(dim=-1).sum()
    cls = sigmoid_focal_loss(logits, cls_target, FOCAL_ALPHA, FOCAL_GAMMA, reduction="sum")
    return {"loss_cls": cls / n_gt, "loss_l1": l1 / n_gt, "loss_giou": giou / n_gt, "loss_reid": reid / n_gt}
