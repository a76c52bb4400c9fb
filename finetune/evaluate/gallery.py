"""Stage 1, the gallery: a model's detections checked and indexed, and CBGM.

:class:`GalleryIndex` checks the detections of every protocol gallery image
(present, consistent shapes, finite values), keeps those above the detection
threshold and concatenates them in protocol order, each image one contiguous
slice.  :func:`_cbgm_rescore` is SeqNet's context bipartite graph matching,
which rescores one query's similarities against that index.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .types import Detections, EvaluationError

# SeqNet's Kuhn-Munkres keeps the best matched weight starting from this floor.
_KM_FLOOR = -100.0


# --------------------------------------------------------------------------- gallery index
class GalleryIndex:
    """All gallery detections above ``det_thresh``, concatenated in protocol
    gallery order so that each image's detections are one contiguous slice."""

    def __init__(self, keys: Sequence[str], gallery: dict[str, Detections], det_thresh: float, dim: int | None):
        """``dim=None``: boxes and scores only (detection evaluation)."""
        missing = [k for k in keys if k not in gallery]
        if missing:
            raise EvaluationError(
                f"{len(missing)} gallery image(s) have no detections entry, e.g. {missing[:3]}; "
                "every protocol gallery image needs one (possibly empty)"
            )
        self.keys = list(keys)
        self.pos = {k: i for i, k in enumerate(self.keys)}
        self._key_array = None
        dets = [gallery[k] for k in self.keys]
        shapes = [(_shape(d.scores), _shape(d.boxes), _shape(d.feats)) for d in dets]
        raw_counts = np.fromiter((s[0] if s else 1 for s, _, _ in shapes), np.int64, len(dets))
        bad = [i for i, ((_, b, f), n) in enumerate(zip(shapes, raw_counts.tolist()))
               if b != (n, 4) or (dim is not None and f != (n, dim))]
        if bad:
            k, (s, b, f), n = self.keys[bad[0]], shapes[bad[0]], raw_counts[bad[0]]
            raise EvaluationError(
                f"gallery image {k!r}: boxes {b}, scores {s}, features {f}; "
                f"expected ({n}, 4), ({n},), ({n}, {dim if dim is not None else 'D'})"
            )
        # concatenate once, then filter: per-image filtering costs a python round trip per image
        boxes = _cat([d.boxes for d in dets], (0, 4), np.float64)
        scores = _cat([d.scores if s else np.ravel(d.scores) for d, (s, _, _) in zip(dets, shapes)], (0,), np.float64)
        _require_finite("gallery detection boxes", boxes)
        _require_finite("gallery detection scores", scores)
        _check_thresh(det_thresh)
        keep = scores >= det_thresh
        every = bool(keep.all())
        raw_img = np.repeat(np.arange(len(dets)), raw_counts)
        self.counts = np.bincount(raw_img[keep], minlength=len(dets)).astype(np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.boxes, self.scores = (boxes, scores) if every else (boxes[keep], scores[keep])
        self.feats = None
        if dim is not None:
            feats = _cat([d.feats for d in dets], (0, dim), np.float32)
            _require_finite("gallery features", feats)
            self.feats = feats if every else feats[keep]
        self.img = np.repeat(np.arange(len(self.keys)), self.counts)

    @property
    def n_dets(self) -> int:
        return int(self.scores.size)

    def hit_info(self, det_idx: np.ndarray):
        """(image keys, boxes) of detections ``det_idx``."""
        if self._key_array is None:
            self._key_array = np.asarray(self.keys, object)
        return self._key_array[self.img[det_idx]].tolist(), self.boxes[det_idx]


def _shape(x) -> tuple:
    """``np.shape`` without its dispatch overhead for arrays (called per image)."""
    return x.shape if isinstance(x, np.ndarray) else np.shape(x)


def _cat(arrays: list, empty_shape: tuple, dtype) -> np.ndarray:
    """Concatenate shape-checked per-image arrays (empty ones included)."""
    return np.concatenate(arrays).astype(dtype, copy=False) if arrays else np.zeros(empty_shape, dtype)


# --------------------------------------------------------------------------- CBGM
def _cbgm_rescore(index, det_idx, sims, context: Detections, query_box, k1, k2) -> None:
    """Context bipartite graph matching (SeqNet), in place on ``sims``.

    For the images holding the k1 most similar detections, match the query
    image's top-k2 persons (row 0 = the query) to the image's detections by
    maximum-weight assignment; the detection matched to the query gets the
    largest matched edge weight as its new similarity.
    """
    from scipy.optimize import linear_sum_assignment

    if len(context) == 0 or np.abs(np.asarray(context.boxes[0], np.float64) - query_box).max() > 1e-3:
        raise EvaluationError(
            "CBGM needs the query image's detections with the ground-truth query box as row 0 "
            f"(query box {query_box.tolist()}, context row 0 "
            f"{np.asarray(context.boxes[:1]).tolist()})"
        )
    if sims.size == 0:
        return
    qfeats = np.asarray(context.feats[:k2], np.float32)
    top = np.argsort(sims)[-k1:]
    for img in np.unique(index.img[det_idx[top]]):
        lo = int(np.searchsorted(det_idx, index.starts[img]))
        n = int(index.counts[img])
        weights = qfeats @ index.feats[det_idx[lo:lo + n]].T
        rows, cols = linear_sum_assignment(weights, maximize=True)
        max_val = max(_KM_FLOOR, float(weights[rows, cols].max()))
        matched = cols[rows == 0]
        if matched.size:
            sims[lo + int(matched[0])] = max_val


def _require_finite(what: str, arr: np.ndarray) -> None:
    """NaN compares false with everything: all-NaN features tie every gallery
    box and still produce a plausible top-1, so they are refused outright."""
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise EvaluationError(f"{what}: {bad} NaN/inf value(s) of {arr.size}; the model produced non-finite "
                              "outputs (a diverged run?), nothing to score")


def _check_thresh(det_thresh) -> None:
    if not (isinstance(det_thresh, (int, float)) and 0.0 <= det_thresh <= 1.0):   # False for NaN
        raise EvaluationError(f"det_thresh must be a number in [0, 1], got {det_thresh!r}")
