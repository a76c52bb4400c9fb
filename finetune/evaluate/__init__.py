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

One module per stage, each pure numpy:

* ``types`` -- inputs, settings, results, constants, :class:`EvaluationError`;
* ``boxes`` -- IoU, the match thresholds of each IoU rule, average precision;
* ``gallery`` -- the checked, concatenated gallery detections, CBGM rescoring;
* ``plans`` -- which (query, gallery image) pairs CUHK-SYSU and PRW search;
* ``scoring`` -- rows of a chunk of queries to per-query AP, top-k, kept hits;
* ``search`` -- :func:`eval_search` and its two protocol families, aggregation;
* ``detection`` -- :func:`eval_detection`.

The public names are re-exported here: import them from
``hybridps.finetune.evaluate``.
"""
from .boxes import average_precision, box_iou_matrix, box_iou_pairs, match_iou_thresh, small_box_iou_thresh
from .detection import eval_detection
from .gallery import GalleryIndex
from .search import eval_search, eval_search_cuhk, eval_search_prw, subset_summary
from .types import (
    CBGM_DEFAULTS,
    IOU_RULES,
    TOPK,
    DetectionMetrics,
    Detections,
    EvaluationError,
    QueryResult,
    RankedHit,
    SearchInputs,
    SearchMetrics,
    SearchSettings,
)

__all__ = [
    "CBGM_DEFAULTS", "IOU_RULES", "TOPK",
    "EvaluationError", "Detections", "SearchInputs", "SearchSettings",
    "RankedHit", "QueryResult", "SearchMetrics", "DetectionMetrics",
    "box_iou_pairs", "box_iou_matrix", "small_box_iou_thresh", "match_iou_thresh", "average_precision",
    "GalleryIndex",
    "eval_search", "eval_search_cuhk", "eval_search_prw", "subset_summary",
    "eval_detection",
]
