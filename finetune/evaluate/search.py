"""Stage 4, person search end to end: inputs checked, stages run, metrics aggregated.

:func:`eval_search` dispatches on the protocol kind to
:func:`eval_search_cuhk` (per-query galleries) or :func:`eval_search_prw`
(every frame but the query's); each checks the query features, builds the
gallery index, the query plan and the CBGM parameters, runs the scoring stage
and averages the per-query results into mAP and top-k.
:func:`subset_summary` re-averages a finished evaluation over some queries.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .gallery import GalleryIndex, _require_finite
from .plans import _CuhkPlan, _PrwPlan
from .scoring import _evaluate_plan
from .types import (
    CBGM_DEFAULTS,
    IOU_RULES,
    EvaluationError,
    QueryResult,
    SearchInputs,
    SearchMetrics,
    SearchSettings,
)

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
