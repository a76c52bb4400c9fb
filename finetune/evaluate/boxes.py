"""Geometry and ranking primitives shared by search and detection evaluation.

IoU of box pairs and of all box pairs (continuous coordinates, no +1), the
IoU a detection needs to count as a ground-truth person under each rule of
``IOU_RULES`` (CUHK-SYSU / PRW's small-box relaxation, or a fixed 0.5), and
non-interpolated average precision equal to scikit-learn's.
"""
from __future__ import annotations

import numpy as np

from .types import IOU_RULES, EvaluationError

# --------------------------------------------------------------------------- geometry
def box_iou_pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of row i of ``a`` with row i of ``b`` (continuous coordinates, no +1)."""
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    return inter / np.maximum(union, np.finfo(np.float64).tiny)


def box_iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) IoU matrix, same convention as :func:`box_iou_pairs`."""
    a = np.asarray(a, np.float64)[:, None, :]
    b = np.asarray(b, np.float64)[None, :, :]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return inter / np.maximum(area_a + area_b - inter, np.finfo(np.float64).tiny)


def small_box_iou_thresh(gt_boxes: np.ndarray) -> np.ndarray:
    """Per ground-truth box: ``min(0.5, w*h / ((w+10)*(h+10)))`` -- small persons
    get a relaxed threshold because a few pixels of error cost them more IoU."""
    w = gt_boxes[:, 2] - gt_boxes[:, 0]
    h = gt_boxes[:, 3] - gt_boxes[:, 1]
    return np.minimum(0.5, (w * h) / ((w + 10.0) * (h + 10.0)))


def match_iou_thresh(gt_boxes: np.ndarray, rule: str = "standard") -> np.ndarray:
    """Per ground-truth box, the IoU a detection needs to count as that person
    under ``rule`` (see :data:`IOU_RULES`)."""
    if rule == "standard":
        return small_box_iou_thresh(gt_boxes)
    if rule == "fixed":
        return np.full(np.asarray(gt_boxes).shape[0], 0.5)
    raise EvaluationError(f"iou_rule must be one of {IOU_RULES}, got {rule!r}")


# --------------------------------------------------------------------------- ranking metrics
def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Non-interpolated AP, equal to ``sklearn.metrics.average_precision_score``.

    sklearn sums ``(R_n - R_{n-1}) * P_n`` over distinct score thresholds.  A
    threshold group adds (its positives / P) * precision at that threshold, so
    the sum is (1/P) * sum over positives p of tp(>= s_p) / n(>= s_p): counts,
    no curve.  Returns 0.0 when there is no positive (callers guard that case).
    """
    y_true = np.asarray(y_true, bool).ravel()
    y_score = np.asarray(y_score).ravel()
    pos = y_score[y_true]
    n_pos = pos.size
    if n_pos == 0:
        return 0.0
    if n_pos <= 64:
        # few positives (the person-search case): direct counts beat a sort
        n_ge = (y_score[None, :] >= pos[:, None]).sum(axis=1)
        tp_ge = (pos[None, :] >= pos[:, None]).sum(axis=1)
    else:
        all_sorted = np.sort(y_score)
        pos_sorted = np.sort(pos)
        n_ge = y_score.size - np.searchsorted(all_sorted, pos, side="left")
        tp_ge = n_pos - np.searchsorted(pos_sorted, pos, side="left")
    return float(np.sum(tp_ge / n_ge) / n_pos)
