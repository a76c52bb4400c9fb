"""Stage 2, the query plans: which (query, gallery image) pairs are searched.

:class:`_CuhkPlan` flattens CUHK-SYSU's per-query gallery lists once
(SeqNet's rules for duplicated entries, the query's own image and the full
gallery); :class:`_PrwPlan` builds PRW / PoseTrack21's "every frame but the
query's" galleries (other cameras only for the cross-camera variant).  Both
answer ``chunk(lo, hi)`` with the pairs of a block of queries and the
ground-truth box (row of ``gt_table``) each pair holds.
"""
from __future__ import annotations

from itertools import chain, repeat
from operator import is_not, itemgetter

import numpy as np

from . import types as _types
from .gallery import GalleryIndex
from .types import EvaluationError

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
    step = max(1, _types._BLOCK_CELLS // width)
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
