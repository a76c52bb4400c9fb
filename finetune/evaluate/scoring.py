"""Stage 3, scoring: a plan's pairs turned into per-query results.

A chunk of queries at a time, the (query, image) pairs of a plan become
(query, detection) rows; rows get similarities (one matrix product, or
per-query products for sparse galleries; optionally CBGM-rescored), are
labelled true positive by IoU and similarity order, and reduce with array
operations to AP x recall, the best positive's rank (top-k) and the kept best
detections of every query.  Python only assembles the :class:`QueryResult`
records.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import types as _types
from .boxes import box_iou_pairs, match_iou_thresh
from .gallery import GalleryIndex, _cbgm_rescore
from .plans import _ranges
from .types import EvaluationError, QueryResult

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
    chunk = max(1, min(256, _types._BLOCK_CELLS // max(1, index.n_dets)))
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
