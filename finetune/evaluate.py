"""The standard person-search evaluation protocol, vectorised.

This is the protocol of the OIM / NAE / SeqNet ``eval_func`` family
(OIM's psdb.py, NAE4PS's evaluator, SeqNet's eval_func.py), written
with numpy so that one query costs a handful of array operations instead of a
python loop over every gallery image:

* similarities of all queries against the concatenated gallery detections come
  from one matrix product per chunk of queries;
* the IoU between a query's ground-truth boxes and the detections of their
  images, the small-box IoU threshold and the "first match in similarity
  order" rule are evaluated for all gallery images of a query at once;
* AP is computed in closed form and equals scikit-learn's
  ``average_precision_score`` (non-interpolated, tied scores form one
  threshold), multiplied by the recall rate ``count_tp / count_gt``.

Pure: a :class:`data_prep.protocol.Protocol` and numpy arrays in, metrics
out.  Nothing here knows about models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import chain, repeat
from operator import is_not, itemgetter
from typing import Sequence

import numpy as np

TOPK = (1, 5, 10)
# How a detection is matched to a ground-truth box: "standard" = the CUHK-SYSU / PRW rule
# (IoU >= min(0.5, w*h / ((w+10)*(h+10))), relaxed for small persons), "fixed" = IoU >= 0.5
# for every box (what several recent evaluators use).  The numbers differ on small persons.
IOU_RULES = ("standard", "fixed")
# CBGM neighbourhood sizes used by SeqNet: (k1 gallery detections, k2 query context persons).
CBGM_DEFAULTS = {"cuhk": (10, 3), "prw": (30, 4)}
# SeqNet's Kuhn-Munkres keeps the best matched weight starting from this floor.
_KM_FLOOR = -100.0
# Cells (query x detection, or query x list entry) handled per block of
# queries.  Bounds the temporaries (tens of bytes per row); small enough that
# the allocator reuses their memory from chunk to chunk instead of faulting in
# fresh pages (measured, PRW-size first call: 0.58 s with 1 << 22, 0.34 s).
_BLOCK_CELLS = 1 << 20


class EvaluationError(ValueError):
    """Inputs that do not fit the protocol (missing images, wrong shapes)."""


# --------------------------------------------------------------------------- inputs
@dataclass
class Detections:
    """Detections of one image: ``boxes`` (n, 4) xyxy pixels, ``scores`` (n,),
    ``feats`` (n, D) -- the gallery features as the model wants them compared
    (NAE: unit embedding x score, i.e. CWS)."""

    boxes: np.ndarray
    scores: np.ndarray
    feats: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), np.zeros((0, dim), np.float32))

    def __len__(self) -> int:
        return int(self.scores.shape[0])


@dataclass
class SearchInputs:
    """Everything a model contributes to a person-search evaluation.

    ``gallery``: detections per gallery image key (every protocol gallery image
    must be present, possibly with zero detections).  ``query_feats``: (Q, D),
    row i = the feature of query i's ground-truth box.  ``query_context``
    (CBGM only): per query, the detections of the query image with row 0 = the
    query's ground-truth box and the other persons after it by descending
    score, features without CWS.
    """

    gallery: dict[str, Detections]
    query_feats: np.ndarray
    query_context: list[Detections] | None = None


@dataclass
class SearchSettings:
    det_thresh: float = 0.5
    cbgm: bool = False
    k1: int | None = None          # None: the protocol family's default
    k2: int | None = None
    cross_camera: bool = False     # PRW multi-view variant (same-camera frames excluded)
    iou_rule: str = "standard"     # one of IOU_RULES
    topk: tuple[int, ...] = TOPK
    keep_top: int = 10             # ranked detections kept per query (visualisation, JSON)


# --------------------------------------------------------------------------- outputs
@dataclass
class RankedHit:
    image_key: str
    box: list[float]
    score: float
    correct: bool


@dataclass
class QueryResult:
    index: int
    ap: float
    recall: float
    count_gt: int
    count_tp: int
    hits: dict[int, bool]
    # the best-ranked detections, best first (kept as arrays: cheap for thousands of queries)
    top_keys: list[str] = field(default_factory=list)
    top_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4)))
    top_scores: np.ndarray = field(default_factory=lambda: np.zeros((0,)))
    top_correct: np.ndarray = field(default_factory=lambda: np.zeros((0,), bool))

    @property
    def top(self) -> list[RankedHit]:
        return [
            RankedHit(k, [float(v) for v in b], float(s), bool(c))
            for k, b, s, c in zip(self.top_keys, self.top_boxes, self.top_scores, self.top_correct)
        ]


@dataclass
class SearchMetrics:
    mAP: float
    topk: dict[int, float]
    per_query: list[QueryResult]
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {"mAP": self.mAP, **{f"top{k}": v for k, v in self.topk.items()}}
        out["n_queries"] = len(self.per_query)
        out["mean_recall"] = float(np.mean([q.recall for q in self.per_query])) if self.per_query else 0.0
        out.update(self.notes)
        return out


@dataclass
class DetectionMetrics:
    ap: float
    recall: float
    count_gt: int
    count_tp: int

    def summary(self) -> dict:
        return {"ap": self.ap, "recall": self.recall, "count_gt": self.count_gt, "count_tp": self.count_tp}


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


# --------------------------------------------------------------------------- search protocols
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


def _check_query_feats(protocol, inputs: SearchInputs) -> np.ndarray:
    q = np.asarray(inputs.query_feats, np.float32)
    if q.ndim != 2 or q.shape[0] != len(protocol.queries):
        raise EvaluationError(
            f"query features have shape {q.shape}; expected ({len(protocol.queries)}, D), one row per query"
        )
    _require_finite("query features", q)
    if inputs.query_context is not None:
        for i, ctx in enumerate(inputs.query_context):
            for name in ("boxes", "scores", "feats"):
                _require_finite(f"query {i} context {name}", np.asarray(getattr(ctx, name), np.float64))
    return q


def _cbgm_params(settings: SearchSettings, family: str, inputs: SearchInputs, n_queries: int):
    if not settings.cbgm:
        return None
    if inputs.query_context is None or len(inputs.query_context) != n_queries:
        raise EvaluationError("CBGM needs query-image detections (query_context) for every query")
    k1, k2 = CBGM_DEFAULTS[family]
    return (settings.k1 or k1, settings.k2 or k2)


class _CuhkPlan:
    """CUHK-SYSU per-query galleries, flattened once.

    Every protocol entry with a ground truth counts towards count_gt --
    duplicated image names included -- but only an image's first entry is
    scored (SeqNet).  A query's own image is searched only if its list names
    it (a quirk of the real files); with the full gallery (-1) every other
    test image joins as a negative.
    """

    def __init__(self, protocol, index: GalleryIndex, full_set: bool):
        lists = protocol.per_query_gallery
        n_img = len(index.keys)
        # One C-level pass per column over the flattened entries: these lists
        # hold gallery_size x n_queries tuples, and a per-entry python
        # expression here used to cost more than all the array work after it.
        flat = list(chain.from_iterable(lists))
        try:
            e_img = np.fromiter(map(index.pos.__getitem__, map(itemgetter(0), flat)), np.int64, len(flat))
        except KeyError as e:
            raise EvaluationError(f"protocol gallery image {e.args[0]!r} is not in the test gallery") from None
        e_has = np.fromiter(map(is_not, map(itemgetter(1), flat), repeat(None)), bool, len(flat))
        with_gt = np.flatnonzero(e_has)
        self.gt_table = _gt_boxes([flat[i][1] for i in with_gt])
        gt_row = np.full(len(flat), -1, np.int64)
        gt_row[with_gt] = np.arange(with_gt.size)
        lens = np.fromiter(map(len, lists), np.int64, len(lists))
        e_q = np.repeat(np.arange(len(lists)), lens)
        self.count_gt = np.bincount(e_q[with_gt], minlength=len(lists))
        self.uq_q, self.uq_img, first = _first_entries(e_img, lens, n_img)
        self.uq_gt = gt_row[first]
        self.own = np.asarray([index.pos.get(q.image_key, -1) for q in protocol.queries], np.int64)
        self.full_set, self.n_img = full_set, n_img

    def chunk(self, lo: int, hi: int):
        """The (query, image) pairs of queries lo..hi-1, sorted by (query, image):
        (query offsets, image indices, gt-table index or -1, count_gt per query)."""
        a, b = np.searchsorted(self.uq_q, [lo, hi])
        if not self.full_set:
            return self.uq_q[a:b] - lo, self.uq_img[a:b], self.uq_gt[a:b], self.count_gt[lo:hi]
        c = hi - lo
        mask = np.ones((c, self.n_img), bool)
        own = self.own[lo:hi]
        mask[np.flatnonzero(own >= 0), own[own >= 0]] = False
        mask[self.uq_q[a:b] - lo, self.uq_img[a:b]] = True   # listed images, own image included if listed
        gt = np.full((c, self.n_img), -1, np.int64)
        gt[self.uq_q[a:b] - lo, self.uq_img[a:b]] = self.uq_gt[a:b]
        pq, pimg = np.nonzero(mask)
        return pq, pimg, gt[pq, pimg], self.count_gt[lo:hi]


def _first_entries(e_img: np.ndarray, lens: np.ndarray, n_img: int):
    """Per query, each listed image once, by ascending image: (query, image,
    index of its first entry), query-major.

    Lists are sorted as the rows of a padded 2-D block, a block of queries at
    a time: one row sort per query is much cheaper than one sort of every
    entry.  Entries are encoded as image * width + position, so the sort
    also puts an image's first entry first.
    """
    width = int(lens.max()) if lens.size else 0
    if width == 0:
        return (np.zeros((0,), np.int64),) * 3
    starts = np.cumsum(lens) - lens
    out_q, out_img, out_first = [], [], []
    step = max(1, _BLOCK_CELLS // width)
    for lo in range(0, lens.size, step):
        hi = min(lens.size, lo + step)
        a, b = starts[lo], starts[hi - 1] + lens[hi - 1]
        rows = np.repeat(np.arange(hi - lo), lens[lo:hi])
        col = np.arange(b - a) - (starts[lo:hi] - a)[rows]
        sentinel = n_img * width
        block = np.full((hi - lo, width), sentinel, np.int64)
        block[rows, col] = e_img[a:b] * width + col
        block.sort(axis=1)
        img, first_col = np.divmod(block, width)
        keep = block < sentinel
        keep[:, 1:] &= img[:, 1:] != img[:, :-1]
        q, c = np.nonzero(keep)
        out_q.append(q + lo)
        out_img.append(img[q, c])
        out_first.append(starts[q + lo] + first_col[q, c])
    return np.concatenate(out_q), np.concatenate(out_img), np.concatenate(out_first)


def _gt_boxes(boxes: list) -> np.ndarray:
    """The listed ground-truth boxes as an (n, 4) float64 table."""
    try:
        table = np.asarray(boxes, np.float64).reshape(-1, 4)
    except ValueError:
        table = None
    if table is None or table.shape[0] != len(boxes):
        raise EvaluationError("per_query_gallery ground-truth boxes must be 4 numbers (x1, y1, x2, y2) each")
    return table


class _PrwPlan:
    """PRW / PoseTrack21: every test frame but the query's own (and, for the
    cross-camera variant, but the query camera's); the ground truth is the
    first box of the query's pid in each frame that holds it."""

    def __init__(self, protocol, index: GalleryIndex, cross_camera: bool):
        if cross_camera and any(g.camera is None for g in protocol.gallery):
            raise EvaluationError(f"{protocol.dataset}: cross-camera evaluation needs camera ids, the gallery has none")
        occ_img, occ_box, occ_pid = [], [], []
        for i, g in enumerate(protocol.gallery):
            seen_here = set()
            for box, pid in zip(g.boxes, g.pids):
                # an annotation error may list a pid twice in one frame; the first box wins
                if pid < 0 or pid in seen_here:
                    continue
                seen_here.add(pid)
                occ_img.append(i)
                occ_box.append(box)
                occ_pid.append(int(pid))
        order = np.argsort(np.asarray(occ_pid, np.int64), kind="stable")
        self.occ_pid = np.asarray(occ_pid, np.int64)[order]
        self.occ_img = np.asarray(occ_img, np.int64)[order]
        self.gt_table = np.asarray(occ_box, np.float64).reshape(-1, 4)[order]
        self.q_pid = np.asarray([int(q.pid) for q in protocol.queries], np.int64)
        self.own = np.asarray([index.pos.get(q.image_key, -1) for q in protocol.queries], np.int64)
        cams = [-1 if g.camera is None else int(g.camera) for g in protocol.gallery]
        self.cams = np.asarray(cams, np.int64)
        self.q_cam = np.asarray([-1 if q.camera is None else int(q.camera) for q in protocol.queries], np.int64)
        self.cross_camera, self.n_img = cross_camera, len(index.keys)

    def chunk(self, lo: int, hi: int):
        c = hi - lo
        mask = np.ones((c, self.n_img), bool)
        own = self.own[lo:hi]
        mask[np.flatnonzero(own >= 0), own[own >= 0]] = False
        if self.cross_camera:
            mask &= self.cams[None, :] != self.q_cam[lo:hi, None]
        gt = np.full((c, self.n_img), -1, np.int64)
        a = np.searchsorted(self.occ_pid, self.q_pid[lo:hi], "left")
        b = np.searchsorted(self.occ_pid, self.q_pid[lo:hi], "right")
        rows = np.repeat(np.arange(c), b - a)
        occ = _ranges(a, b - a)
        keep = mask[rows, self.occ_img[occ]]  # frames outside the query's gallery hold no counted gt
        gt[rows[keep], self.occ_img[occ[keep]]] = occ[keep]
        pq, pimg = np.nonzero(mask)
        return pq, pimg, gt[pq, pimg], np.bincount(rows[keep], minlength=c)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + n)`` for each (s, n)."""
    counts = np.asarray(counts, np.int64)
    if counts.sum() == 0:
        return np.zeros((0,), np.int64)
    return np.repeat(np.asarray(starts, np.int64) - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())


def _row_sims(index: GalleryIndex, qfeats: np.ndarray, rq: np.ndarray, rd: np.ndarray, bounds: np.ndarray):
    """Similarity of each (query, detection) row.  Dense galleries (PRW, full
    CUHK-SYSU): one matrix product for the whole chunk of queries; sparse ones
    (CUHK-SYSU's 100-image lists): per query, its gathered rows times its
    feature.  Measured: a gathered row costs about ten product entries."""
    if 10 * rq.size >= qfeats.shape[0] * index.n_dets:
        return np.take(qfeats @ index.feats.T, rq * index.n_dets + rd)   # flat take: cheaper than [rq, rd]
    out = np.empty(rq.size, np.float32)
    for c in range(qfeats.shape[0]):
        a, b = bounds[c], bounds[c + 1]
        out[a:b] = index.feats[rd[a:b]] @ qfeats[c]
    return out


def _label_rows(index: GalleryIndex, gt_table, rq, rd, rgt, sims, iou_rule: str = "standard") -> np.ndarray:
    """True positives: in each (query, gt image) pair only the first detection
    in descending similarity order whose IoU reaches the box's threshold."""
    y_true = np.zeros(rq.size, bool)
    r = np.flatnonzero(rgt >= 0)
    if r.size == 0:
        return y_true
    gt = gt_table[rgt[r]]
    cand = r[box_iou_pairs(index.boxes[rd[r]], gt) >= match_iou_thresh(gt, iou_rule)]
    if cand.size == 0:
        return y_true
    pair = rq[cand] * len(index.keys) + index.img[rd[cand]]
    order = np.lexsort((-sims[cand], pair))
    p = pair[order]
    first = np.concatenate([[True], p[1:] != p[:-1]])
    y_true[cand[order[first]]] = True
    return y_true


@dataclass
class _ChunkScores:
    """Ranking metrics of a chunk of queries, one entry per query."""

    ap: np.ndarray
    recall: np.ndarray
    count_tp: np.ndarray
    best: np.ndarray            # rows ranked above the best positive (int64 max: no positive)
    top: list                   # per query: its kept row offsets, best first


def _padded(values: np.ndarray, seg: np.ndarray, n_seg: int, fill: float) -> np.ndarray:
    """Scatter ``values`` (grouped by ascending ``seg``) into an (n_seg, width)
    grid, one row per segment, left-aligned and padded with ``fill``."""
    lens = np.bincount(seg, minlength=n_seg)
    col = np.arange(seg.size) - (np.cumsum(lens) - lens)[seg]
    grid = np.full((n_seg, int(lens.max()) if seg.size else 0), fill, np.float64)
    grid[seg, col] = values
    return grid


def _segment_ap(seg: np.ndarray, score: np.ndarray, y_true: np.ndarray, n_seg: int) -> np.ndarray:
    """sklearn's AP of every segment at once (0 where a segment has no positive).

    As in :func:`average_precision`, AP = (1/P) * sum over positives p of
    tp(>= s_p) / n(>= s_p).  One sort by (segment, descending score) turns
    both counts into positions: for a positive, the end of its run of tied
    scores minus its segment's start.
    """
    ap = np.zeros(n_seg)
    if not y_true.any():
        return ap
    order = np.lexsort((-score, seg))
    seg, score, y_true = seg[order], score[order], y_true[order]
    n = seg.size
    run_end = np.ones(n, bool)
    run_end[:-1] = (seg[1:] != seg[:-1]) | (score[1:] != score[:-1])
    ends = np.flatnonzero(run_end)
    pos = np.flatnonzero(y_true)
    end = ends[np.searchsorted(ends, pos)]
    seg_start = np.searchsorted(seg, seg[pos], "left")
    cum_tp = np.concatenate([[0], np.cumsum(y_true)])
    n_ge = end + 1 - seg_start
    tp_ge = cum_tp[end + 1] - cum_tp[seg_start]
    back = np.argsort(order[pos])
    ratio, pos_seg = (tp_ge / n_ge)[back], seg[pos][back]
    firsts = np.flatnonzero(np.concatenate([[True], pos_seg[1:] != pos_seg[:-1]]))
    n_pos = np.diff(np.append(firsts, pos_seg.size))
    ap[pos_seg[firsts]] = _sum_runs(ratio, firsts, n_pos) / n_pos
    return ap


def _sum_runs(values: np.ndarray, firsts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sum of each run ``values[f:f + n]``, bit-equal to ``np.sum`` of that run.

    Runs of one length are summed as the rows of one 2-D block, which numpy
    reduces row by row with the same pairwise summation as a 1-D ``np.sum``
    (``np.add.reduceat`` does not: it adds in another order).
    """
    out = np.empty(firsts.size)
    for n in np.unique(lengths):
        runs = np.flatnonzero(lengths == n)
        out[runs] = values[firsts[runs, None] + np.arange(n)].sum(axis=1)
    return out


def _chunk_scores(sims: np.ndarray, y_true: np.ndarray, rq: np.ndarray, n_q: int, count_gt: np.ndarray,
                  keep_top: int, pair_q: np.ndarray, pair_lo: np.ndarray, first_query: int = 0) -> _ChunkScores:
    """AP x recall, the best positive's rank (top-k) and the ``keep_top`` best
    rows of every query of a chunk; rows are grouped by query (``rq``
    ascending), then by image (``pair_q``/``pair_lo``: see :func:`_top_rows`)."""
    pr = np.flatnonzero(y_true)
    count_tp = np.bincount(rq[pr], minlength=n_q)
    bad = np.flatnonzero(count_tp > count_gt)
    if bad.size:
        c = int(bad[0])
        raise EvaluationError(f"query {first_query + c}: {count_tp[c]} true positives "
                              f"but only {count_gt[c]} ground truths")
    recall = np.divide(count_tp, count_gt, out=np.zeros(n_q), where=count_gt > 0)

    # Only rows scoring at least their query's weakest positive enter its
    # n(>= s_p) counts: rank those few, not whole galleries.
    weakest = np.full(n_q, np.inf)
    np.minimum.at(weakest, rq[pr], sims[pr])
    cand = np.flatnonzero(sims >= weakest[rq])
    ap = _segment_ap(rq[cand], sims[cand], y_true[cand], n_q) * recall

    # all detections sorted together: the best positive's rank decides every k
    strongest = np.full(n_q, -np.inf)
    np.maximum.at(strongest, rq[pr], sims[pr])
    above = np.bincount(rq[sims > strongest[rq]], minlength=n_q)
    best = np.where(count_tp > 0, above, np.iinfo(np.int64).max)
    return _ChunkScores(ap, recall, count_tp, best, _top_rows(sims, rq, n_q, pair_q, pair_lo, keep_top))


def _top_rows(sims: np.ndarray, rq: np.ndarray, n_q: int, pair_q: np.ndarray, pair_lo: np.ndarray,
              keep_top: int) -> list:
    """Per query, the offsets (within its rows) of its ``keep_top`` most
    similar rows, best first, ties to the lower offset.

    ``pair_lo`` starts each non-empty (query, image) run of rows.  The
    ``keep_top``-th largest per-image maximum of a query bounds its
    ``keep_top``-th largest row from below (those maxima are distinct rows),
    so only the rows above that bound -- a few images' worth -- get sorted.
    """
    if keep_top <= 0 or sims.size == 0:
        return [np.zeros((0,), np.int64)] * n_q
    image_max = _padded(np.maximum.reduceat(sims, pair_lo), pair_q, n_q, -np.inf)
    width = image_max.shape[1]
    if width >= keep_top:   # -inf (every row) for a query with fewer images
        bound = np.partition(image_max, width - keep_top, axis=1)[:, width - keep_top]
    else:
        bound = np.full(n_q, -np.inf)
    cand = np.flatnonzero(sims >= bound[rq])
    cand = cand[np.lexsort((cand, -sims[cand], rq[cand]))]
    starts = np.searchsorted(rq[cand], np.arange(n_q + 1))
    first_row = np.searchsorted(rq, np.arange(n_q))
    return [cand[starts[c]:min(starts[c + 1], starts[c] + keep_top)] - first_row[c] for c in range(n_q)]


def _evaluate_plan(plan, index: GalleryIndex, q: np.ndarray, protocol, inputs, settings, cbgm) -> list[QueryResult]:
    """Score every query.  Rows (query, detection) are built, compared,
    labelled and ranked a chunk of queries at a time with array operations;
    python only assembles the per-query result records."""
    n_q = q.shape[0]
    chunk = max(1, min(256, _BLOCK_CELLS // max(1, index.n_dets)))
    results = []
    for lo in range(0, n_q, chunk):
        hi = min(n_q, lo + chunk)
        pq, pimg, pgt, count_gt = plan.chunk(lo, hi)
        counts = index.counts[pimg]
        rd = _ranges(index.starts[pimg], counts)           # query-major, detections ascending
        rq, rgt = np.repeat(pq, counts), np.repeat(pgt, counts)
        bounds = np.searchsorted(rq, np.arange(hi - lo + 1))
        sims = _row_sims(index, q[lo:hi], rq, rd, bounds).astype(np.float64)
        if cbgm is not None:
            for c in range(hi - lo):
                a, b = bounds[c], bounds[c + 1]
                _cbgm_rescore(index, rd[a:b], sims[a:b], inputs.query_context[lo + c],
                              np.asarray(protocol.queries[lo + c].box, np.float64), *cbgm)
        y_true = _label_rows(index, plan.gt_table, rq, rd, rgt, sims, settings.iou_rule)
        filled = counts > 0
        sc = _chunk_scores(sims, y_true, rq, hi - lo, np.asarray(count_gt, np.int64), settings.keep_top,
                           pq[filled], (np.cumsum(counts) - counts)[filled], lo)
        results.extend(_query_results(sc, lo, count_gt, bounds, index, rd, sims, y_true, settings.topk))
    return results


def _query_results(sc: _ChunkScores, lo: int, count_gt, bounds, index, rd, sims, y_true, topk) -> list:
    """One :class:`QueryResult` per query of the chunk starting at query ``lo``.
    The kept rows of all queries are looked up together: per query, a python
    lookup of each key costs more than the ranking did."""
    sizes = np.fromiter(map(len, sc.top), np.int64, len(sc.top))
    rows = np.concatenate([np.zeros((0,), np.int64), *sc.top]) + np.repeat(bounds[:-1], sizes)
    keys, boxes = index.hit_info(rd[rows])
    scores, correct = sims[rows], y_true[rows]
    ends = np.cumsum(sizes).tolist()
    out = []
    for c, (ap, recall, n_gt, n_tp, best, a, b) in enumerate(zip(
            sc.ap.tolist(), sc.recall.tolist(), np.asarray(count_gt).tolist(), sc.count_tp.tolist(),
            sc.best.tolist(), [0] + ends[:-1], ends)):
        res = QueryResult(lo + c, ap, recall, n_gt, n_tp, {k: best < k for k in topk})
        if b > a:
            res.top_keys, res.top_boxes = keys[a:b], boxes[a:b]
            res.top_scores, res.top_correct = scores[a:b], correct[a:b]
        out.append(res)
    return out


def eval_search_cuhk(protocol, inputs: SearchInputs, settings: SearchSettings | None = None) -> SearchMetrics:
    """CUHK-SYSU: each query has its own protocol gallery (TestG50..4000);
    ``protocol.gallery_size == -1`` adds every other test image as negatives."""
    settings = settings or SearchSettings()
    q = _check_query_feats(protocol, inputs)
    index = GalleryIndex([g.key for g in protocol.gallery], inputs.gallery, settings.det_thresh, q.shape[1])
    full_set = protocol.gallery_size == -1
    if settings.cbgm and full_set:
        raise EvaluationError("CBGM is not defined for the full CUHK-SYSU gallery (gallery size -1)")
    cbgm = _cbgm_params(settings, "cuhk", inputs, len(protocol.queries))
    plan = _CuhkPlan(protocol, index, full_set)
    results = _evaluate_plan(plan, index, q, protocol, inputs, settings, cbgm)
    return _aggregate(results, settings, {"gallery_size": protocol.gallery_size})


def eval_search_prw(protocol, inputs: SearchInputs, settings: SearchSettings | None = None) -> SearchMetrics:
    """PRW / PoseTrack21: the gallery is every test frame but the query's own
    (same-camera frames included); ``settings.cross_camera`` keeps only frames
    from other cameras (the multi-view variant)."""
    settings = settings or SearchSettings()
    q = _check_query_feats(protocol, inputs)
    index = GalleryIndex([g.key for g in protocol.gallery], inputs.gallery, settings.det_thresh, q.shape[1])
    plan = _PrwPlan(protocol, index, settings.cross_camera)
    cbgm = _cbgm_params(settings, "prw", inputs, len(protocol.queries))
    results = _evaluate_plan(plan, index, q, protocol, inputs, settings, cbgm)
    no_gt = sum(r.count_gt == 0 for r in results)
    return _aggregate(results, settings, {"cross_camera": bool(settings.cross_camera),
                                          "queries_without_gallery_gt": int(no_gt)})


def _aggregate(results: list[QueryResult], settings: SearchSettings, notes: dict) -> SearchMetrics:
    if not results:
        raise EvaluationError("the protocol has no queries")
    m_ap = float(np.mean([r.ap for r in results]))
    topk = {k: float(np.mean([r.hits[k] for r in results])) for k in settings.topk}
    notes = {"det_thresh": settings.det_thresh, "cbgm": bool(settings.cbgm), "iou_rule": settings.iou_rule, **notes}
    return SearchMetrics(m_ap, topk, results, notes)


def subset_summary(metrics: SearchMetrics, indices: Sequence[int]) -> dict:
    """mAP / top-k over the queries ``indices`` (protocol query positions) of an
    evaluation already run on the whole query set: each query's result does not
    depend on the others, so a subset is an average over its rows."""
    by_index = {r.index: r for r in metrics.per_query}
    missing = [int(i) for i in indices if int(i) not in by_index]
    if missing:
        raise EvaluationError(f"query subset names queries {missing[:5]} that the evaluation does not hold")
    rows = [by_index[int(i)] for i in indices]
    if not rows:
        raise EvaluationError("a query subset is empty")
    out = {"mAP": float(np.mean([r.ap for r in rows]))}
    for k in sorted(rows[0].hits):
        out[f"top{k}"] = float(np.mean([r.hits[k] for r in rows]))
    out["n_queries"] = len(rows)
    return out


def eval_search(protocol, inputs: SearchInputs, settings: SearchSettings | None = None) -> SearchMetrics:
    """Dispatch on the protocol kind: per-query galleries (CUHK-SYSU) or
    "all frames but the query's" (PRW, PoseTrack21)."""
    if settings is not None and settings.iou_rule not in IOU_RULES:
        raise EvaluationError(f"iou_rule must be one of {IOU_RULES}, got {settings.iou_rule!r}")
    if protocol.per_query_gallery is not None:
        if len(protocol.per_query_gallery) != len(protocol.queries):
            raise EvaluationError("per_query_gallery must hold one gallery list per query")
        return eval_search_cuhk(protocol, inputs, settings)
    return eval_search_prw(protocol, inputs, settings)


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

