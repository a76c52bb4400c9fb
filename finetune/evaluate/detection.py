"""Detection evaluation (SeqNet's ``eval_detection``), vectorised.

Detection AP and recall of the gallery detections against every ground-truth
person (or the labeled ones only): all (ground truth, detection) pairs of each
image at once, matched by SeqNet's mutual best-IoU rule, then ranked by score.
"""
from __future__ import annotations

import numpy as np

from .boxes import average_precision, box_iou_pairs
from .gallery import GalleryIndex
from .types import DetectionMetrics, Detections

# --------------------------------------------------------------------------- detection
def _pair_indices(n_a: np.ndarray, n_b: np.ndarray, start_a: np.ndarray, start_b: np.ndarray):
    """All (a, b) index pairs within each group: group g pairs its n_a[g] rows
    of A with its n_b[g] rows of B.  Returns (a_idx, b_idx), grouped, a-major."""
    pc = n_a * n_b
    total = int(pc.sum())
    if total == 0:
        return np.zeros((0,), np.int64), np.zeros((0,), np.int64)
    k = np.arange(total) - np.repeat(np.cumsum(pc) - pc, pc)
    b_rep = np.repeat(n_b, pc)
    return np.repeat(start_a, pc) + k // b_rep, np.repeat(start_b, pc) + k % b_rep


def _first_per_group(group: np.ndarray, key: np.ndarray, tie: np.ndarray) -> np.ndarray:
    """Boolean mask: the row with the largest ``key`` in each ``group`` (ties to
    the smallest ``tie``, like ``np.argmax``)."""
    order = np.lexsort((tie, -key, group))
    g = group[order]
    first = np.concatenate([[True], g[1:] != g[:-1]]) if g.size else np.zeros((0,), bool)
    mask = np.zeros(group.size, bool)
    mask[order[first]] = True
    return mask


def _stack_gallery_gt(protocol, labeled_only: bool):
    """Per gallery image its GT boxes (all persons, or labeled only), concatenated."""
    boxes, counts, used = [], [], []
    for g in protocol.gallery:
        b = np.asarray(g.boxes, np.float64).reshape(-1, 4)
        if labeled_only:
            b = b[np.asarray(g.pids, np.int64).reshape(-1) >= 0]
        # SeqNet skips (dets included) images without labeled persons in labeled-only mode
        used.append(not labeled_only or b.shape[0] > 0)
        boxes.append(b)
        counts.append(b.shape[0])
    return np.concatenate(boxes) if boxes else np.zeros((0, 4)), np.asarray(counts, np.int64), np.asarray(used, bool)


def eval_detection(protocol, gallery: dict[str, Detections], det_thresh: float = 0.01,
                   iou_thresh: float = 0.5, labeled_only: bool = False) -> DetectionMetrics:
    """Detection AP and recall over the test gallery (SeqNet ``eval_detection``).

    A match needs IoU >= ``iou_thresh``, and the det's highest-IoU gt to be
    that gt, and the gt's highest-IoU det to be that det (both argmaxes on the
    raw IoU, so a det that prefers another gt can leave its gt unmatched).
    All GT persons count, unlabeled ones included, unless ``labeled_only``.
    """
    keys = [g.key for g in protocol.gallery]
    index = GalleryIndex(keys, gallery, det_thresh, None)
    gt_boxes, gt_counts, used = _stack_gallery_gt(protocol, labeled_only)
    det_counts = np.where(used, index.counts, 0)
    gt_starts = np.concatenate([[0], np.cumsum(gt_counts)[:-1]]).astype(np.int64)
    gi, di = _pair_indices(gt_counts, det_counts, gt_starts, index.starts)
    ious = box_iou_pairs(gt_boxes[gi], index.boxes[di])
    match = (ious >= iou_thresh) & _first_per_group(di, ious, gi) & _first_per_group(gi, ious, di)
    y_true = np.zeros(index.n_dets, bool)
    y_true[di[match]] = True
    scored = np.repeat(used, index.counts)  # detections of skipped images do not enter the ranking
    count_gt, count_tp = int(gt_counts[used].sum()), int(match.sum())
    recall = count_tp / count_gt if count_gt else 0.0
    ap = average_precision(y_true[scored], index.scores[scored]) * recall if count_tp else 0.0
    return DetectionMetrics(float(ap), float(recall), count_gt, count_tp)
