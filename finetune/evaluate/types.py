"""The evaluator's data contract, shared by every stage.

What a model hands in (:class:`Detections`, :class:`SearchInputs`), how a run
is configured (:class:`SearchSettings` and the constants ``TOPK``,
``IOU_RULES``, ``CBGM_DEFAULTS``), what comes out (:class:`QueryResult`,
:class:`SearchMetrics`, :class:`DetectionMetrics`) and the one error every
stage raises (:class:`EvaluationError`).  ``_BLOCK_CELLS``, the work-size
bound of the plan and scoring stages, lives here too: both read it from this
module when they run, so one setting governs both.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TOPK = (1, 5, 10)
# How a detection is matched to a ground-truth box: "standard" = the CUHK-SYSU / PRW rule
# (IoU >= min(0.5, w*h / ((w+10)*(h+10))), relaxed for small persons), "fixed" = IoU >= 0.5
# for every box (what several recent evaluators use).  The numbers differ on small persons.
IOU_RULES = ("standard", "fixed")
# CBGM neighbourhood sizes used by SeqNet: (k1 gallery detections, k2 query context persons).
CBGM_DEFAULTS = {"cuhk": (10, 3), "prw": (30, 4)}
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
