"""The person-search evaluator against hand-computed cases and the loop reference.

Expected values are worked out by hand in each test (comments show the
arithmetic); the loop implementation in benchmarks/eval_speed.py (python loops,
sklearn AP, as in the reference codebases) checks the vectorised one on random
cases.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from hybridps.data_prep.protocol import GalleryImage, Protocol, Query
from hybridps.data_prep.record import ImageRef
from hybridps.finetune.evaluate import (
    Detections,
    EvaluationError,
    SearchInputs,
    SearchSettings,
    average_precision,
    eval_detection,
    eval_search,
    small_box_iou_thresh,
)
from hybridps.finetune.results_io import ResultsFileError, check_against_protocol, read_results, write_results

ROOT = Path(__file__).resolve().parents[1]


def _loop_reference():
    spec = importlib.util.spec_from_file_location("eval_speed", ROOT / "benchmarks" / "eval_speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def ref(key):
    return ImageRef("file", f"/nowhere/{key}.jpg")


def gimg(key, boxes, pids, camera=None):
    return GalleryImage(key, ref(key), [list(map(float, b)) for b in boxes], list(pids), camera)


def dets(rows, dim=2):
    """rows: (box, score, similarity to the query); features put the
    similarity on axis 0 so that feat . e0 == similarity."""
    if not rows:
        return Detections.empty(dim)
    boxes = np.asarray([r[0] for r in rows], np.float32)
    scores = np.asarray([r[1] for r in rows], np.float32)
    feats = np.zeros((len(rows), dim), np.float32)
    feats[:, 0] = [r[2] for r in rows]
    return Detections(boxes, scores, feats)


E0 = np.asarray([[1.0, 0.0]], np.float32)
BIG = [0, 0, 100, 300]          # a 100x300 person
OTHER = [200, 0, 300, 300]


def prw_case():
    """Query pid 7 in frame q (camera 1).  Frames: a (cam 1) and b (cam 2) hold
    pid 7 and are detected; c (cam 3) holds pid 7 but has no detection; d
    (cam 2) has no pid 7."""
    gallery = [
        gimg("q", [BIG], [7], 1),
        gimg("a", [BIG, OTHER], [7, -1], 1),
        gimg("b", [OTHER], [7], 2),
        gimg("c", [[0, 0, 50, 100]], [7], 3),
        gimg("d", [BIG], [3], 2),
    ]
    protocol = Protocol("prw", [Query(0, "q", ref("q"), BIG, 7, 1)], gallery)
    det = {
        "q": dets([(BIG, 0.9, 0.99)]),                                  # the query frame itself: excluded
        "a": dets([(BIG, 0.9, 0.9)]),
        # two overlapping detections of the target: IoU 0.6 at sim 0.7, IoU 1.0 at sim 0.5
        "b": dets([([200, 0, 300, 180], 0.9, 0.7), (OTHER, 0.9, 0.5)]),
        "c": dets([]),
        "d": dets([(BIG, 0.9, 0.8)]),
    }
    return protocol, SearchInputs(det, E0)


def test_prw_hand_case_ap_recall_first_match_and_query_frame():
    protocol, inputs = prw_case()
    m = eval_search(protocol, inputs)
    q = m.per_query[0]
    # count_gt counts a, b and the undetected c; q (the query frame) is not in the gallery
    assert (q.count_gt, q.count_tp) == (3, 2)
    # ranking a(0.9,T) d(0.8,F) b1(0.7,T) b2(0.5,F): b1 is the first match in similarity
    # order although b2 overlaps better; sklearn AP = (1/1 + 2/3)/2 = 5/6, x recall 2/3
    assert q.recall == pytest.approx(2 / 3)
    assert q.ap == pytest.approx(5 / 6 * 2 / 3)
    assert m.mAP == pytest.approx(5 / 9)
    assert q.hits == {1: True, 5: True, 10: True}
    assert [h.image_key for h in q.top] == ["a", "d", "b", "b"]
    assert [h.correct for h in q.top] == [True, False, True, False]


def test_prw_cross_camera_variant_drops_same_camera_frames():
    protocol, inputs = prw_case()
    m = eval_search(protocol, inputs, SearchSettings(cross_camera=True))
    q = m.per_query[0]
    # frame a (camera 1, like the query) leaves the gallery: gt = b, c; ranking d(F) b1(T) b2(F)
    assert (q.count_gt, q.count_tp) == (2, 1)
    assert q.ap == pytest.approx(1 / 2 * 1 / 2)
    assert q.hits == {1: False, 5: True, 10: True}


def test_prw_camera_none_refuses_cross_camera():
    protocol, inputs = prw_case()
    protocol.gallery[2].camera = None
    with pytest.raises(EvaluationError, match="camera"):
        eval_search(protocol, inputs, SearchSettings(cross_camera=True))


def test_det_thresh_filters_gallery_detections():
    protocol, inputs = prw_case()
    inputs.gallery["a"] = dets([(BIG, 0.4, 0.9)])  # the best match falls under det_thresh 0.5
    q = eval_search(protocol, inputs).per_query[0]
    # a still counts as ground truth; ranking d(F) b1(T) b2(F): AP 1/2, recall 1/3
    assert (q.count_gt, q.count_tp) == (3, 1)
    assert q.ap == pytest.approx(0.5 / 3)
    q = eval_search(protocol, inputs, SearchSettings(det_thresh=0.3)).per_query[0]
    assert q.count_tp == 2


@pytest.mark.parametrize(
    "gt, det, counts",
    [
        ([0, 0, 10, 20], [0, 0, 10, 8], True),       # 10x20: thresh 200/(20*30) = 0.333 <= IoU 0.4
        ([0, 0, 20, 40], [0, 0, 20, 16], False),     # 20x40: 800/1500 = 0.53 -> capped at 0.5 > 0.4
        ([0, 0, 100, 300], [0, 0, 100, 120], False),  # 100x300: thresh 0.5 > 0.4
    ],
)
def test_small_box_iou_rule(gt, det, counts):
    assert small_box_iou_thresh(np.asarray([gt], float))[0] == pytest.approx(
        min(0.5, gt[2] * gt[3] / ((gt[2] + 10) * (gt[3] + 10)))
    )
    gallery = [gimg("q", [[500, 0, 520, 40]], [1]), gimg("g", [gt], [1])]
    protocol = Protocol("prw", [Query(0, "q", ref("q"), [500, 0, 520, 40], 1)], gallery)
    inputs = SearchInputs({"q": dets([]), "g": dets([(det, 0.9, 0.5)])}, E0)
    q = eval_search(protocol, inputs).per_query[0]
    assert q.count_tp == int(counts)
    assert q.ap == pytest.approx(1.0 if counts else 0.0)


@pytest.mark.parametrize("kind", ["prw", "cuhk"])
def test_iou_rule_fixed_refuses_what_standard_accepts_for_small_boxes(kind):
    """A 10x20 person: standard threshold 200/(20*30) = 0.333, fixed 0.5.  A det
    covering 8 of its 20 rows has IoU 80/200 = 0.4: a hit under standard only.
    A 100x300 person needs 0.5 under both rules: the det at IoU 0.6 (180 of 300
    rows) counts under both, so the rules agree on big boxes."""
    small, small_det = [0, 0, 10, 20], [0, 0, 10, 8]
    big, big_det = [50, 0, 150, 300], [50, 0, 150, 180]
    gallery = [gimg("q", [[500, 0, 520, 40]], [1]), gimg("s", [small], [1]), gimg("b", [big], [1])]
    per_query = [[("s", small), ("b", big)]] if kind == "cuhk" else None
    protocol = Protocol("cuhk_sysu" if kind == "cuhk" else "prw", [Query(0, "q", ref("q"), [500, 0, 520, 40], 1)],
                        gallery, per_query_gallery=per_query, gallery_size=50 if kind == "cuhk" else None)
    # the small person's det ranks first (similarity 0.9), the big one's second (0.5)
    inputs = SearchInputs({"q": dets([]), "s": dets([(small_det, 0.9, 0.9)]), "b": dets([(big_det, 0.9, 0.5)])}, E0)
    std = eval_search(protocol, inputs, SearchSettings(iou_rule="standard"))
    fixed = eval_search(protocol, inputs, SearchSettings(iou_rule="fixed"))
    assert (std.per_query[0].count_tp, fixed.per_query[0].count_tp) == (2, 1)
    assert std.mAP == pytest.approx(1.0)                 # both hits, ranks 1 and 2
    assert fixed.mAP == pytest.approx(0.5 * 0.5)         # one hit at rank 2: AP 1/2, times recall 1/2
    assert (std.topk[1], fixed.topk[1]) == (1.0, 0.0)
    assert std.summary()["iou_rule"] == "standard" and fixed.summary()["iou_rule"] == "fixed"


def test_iou_rule_unknown_is_a_clear_error():
    protocol, inputs = prw_case()
    with pytest.raises(EvaluationError, match="iou_rule must be one of"):
        eval_search(protocol, inputs, SearchSettings(iou_rule="coco"))


def test_subset_summary_averages_the_subset_rows():
    from hybridps.finetune.evaluate import subset_summary

    protocol, inputs = cuhk_case(gallery_size=50)
    # two queries: the first is the hand case (AP 5/9), the second finds nothing (AP 0)
    protocol.queries.append(Query(1, "q", ref("q"), BIG, 1))
    protocol.per_query_gallery.append([("n1", OTHER)])     # n1 is only detected at BIG
    inputs.query_feats = np.concatenate([E0, -E0])
    m = eval_search(protocol, inputs)
    assert subset_summary(m, [0]) == {"mAP": pytest.approx(5 / 9), "top1": 1.0, "top5": 1.0, "top10": 1.0,
                                      "n_queries": 1}
    assert subset_summary(m, [1])["mAP"] == 0.0
    assert subset_summary(m, [0, 1])["mAP"] == pytest.approx(m.mAP)
    with pytest.raises(EvaluationError, match="does not hold"):
        subset_summary(m, [2])


def test_no_true_positive_gives_zero_ap_without_warning():
    protocol, inputs = prw_case()
    for key in ("a", "b"):
        inputs.gallery[key] = dets([([400, 400, 450, 500], 0.9, 0.3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = eval_search(protocol, inputs)
    q = m.per_query[0]
    assert (q.ap, q.count_tp, q.count_gt) == (0.0, 0, 3)
    assert q.hits == {1: False, 5: False, 10: False}


def test_topk_sorts_all_detections_together():
    gallery = [gimg("q", [BIG], [1]), gimg("crowd", [BIG], [2]), gimg("t", [BIG], [1])]
    protocol = Protocol("prw", [Query(0, "q", ref("q"), BIG, 1)], gallery)
    # five negatives in ONE image outrank the target: rank 6 -> miss at 5, hit at 10
    crowd = [([i * 10, 0, i * 10 + 50, 150], 0.9, 0.9 - 0.01 * i) for i in range(5)]
    inputs = SearchInputs({"q": dets([]), "crowd": dets(crowd), "t": dets([(BIG, 0.9, 0.5)])}, E0)
    q = eval_search(protocol, inputs).per_query[0]
    assert q.hits == {1: False, 5: False, 10: True}
    assert q.ap == pytest.approx(1 / 6)


def cuhk_case(gallery_size):
    gallery = [gimg(k, [BIG], [-1]) for k in ("q", "p1", "p2", "n1", "far")]
    per_query = [[("p1", BIG), ("p2", BIG), ("p2", BIG), ("n1", None)]]  # p2 listed twice
    protocol = Protocol("cuhk_sysu", [Query(0, "q", ref("q"), BIG, 0)], gallery,
                        per_query_gallery=per_query, gallery_size=gallery_size)
    det = {
        "q": dets([(BIG, 0.9, 0.99)]),
        "p1": dets([(BIG, 0.9, 0.8)]),
        "p2": dets([(BIG, 0.9, 0.6)]),
        "n1": dets([(BIG, 0.9, 0.7)]),
        "far": dets([(BIG, 0.9, 0.95)]),  # not in the 4-entry protocol gallery
    }
    return protocol, SearchInputs(det, E0)


def test_cuhk_protocol_gallery_and_duplicates():
    protocol, inputs = cuhk_case(gallery_size=50)
    q = eval_search(protocol, inputs).per_query[0]
    # count_gt = 3 (p2 counted twice), p2 scored once: p1(T) n1(F) p2(T)
    # AP = (1 + 2/3)/2 = 5/6, recall 2/3; "far" and the query image are not searched
    assert (q.count_gt, q.count_tp) == (3, 2)
    assert q.ap == pytest.approx(5 / 6 * 2 / 3)
    assert q.hits[1]


def test_cuhk_full_gallery_adds_other_test_images_but_not_the_query_image():
    protocol, inputs = cuhk_case(gallery_size=-1)
    q = eval_search(protocol, inputs).per_query[0]
    # "far" joins as a negative (0.95 > p1), q itself stays out: far(F) p1(T) n1(F) p2(T)
    assert q.ap == pytest.approx((1 / 2 + 2 / 4) / 2 * 2 / 3)
    assert q.hits == {1: False, 5: True, 10: True}
    with pytest.raises(EvaluationError, match="CBGM"):
        eval_search(protocol, inputs, SearchSettings(cbgm=True))


def test_cuhk_query_image_listed_in_its_own_gallery_is_kept():
    protocol, inputs = cuhk_case(gallery_size=100)
    protocol.per_query_gallery[0].insert(0, ("q", BIG))  # the s14430/s888 quirk of the real files
    q = eval_search(protocol, inputs).per_query[0]
    assert (q.count_gt, q.count_tp) == (4, 3)
    assert q.top[0].image_key == "q" and q.top[0].correct


def test_cuhk_unknown_gallery_image_is_a_clear_error():
    protocol, inputs = cuhk_case(gallery_size=50)
    protocol.per_query_gallery[0].append(("ghost", None))
    with pytest.raises(EvaluationError, match="ghost"):
        eval_search(protocol, inputs)


def test_missing_detections_entry_is_a_clear_error():
    protocol, inputs = prw_case()
    del inputs.gallery["d"]
    with pytest.raises(EvaluationError, match="no detections entry"):
        eval_search(protocol, inputs)


def test_cbgm_changes_the_ranking():
    e = np.eye(4, dtype=np.float32)
    target = 0.6 * e[0] + 0.8 * e[2]
    decoy = 0.7 * e[0] + np.sqrt(1 - 0.49) * e[3]
    gallery = [gimg("q", [BIG, OTHER], [1, 2]), gimg("A", [BIG, OTHER], [1, 2]), gimg("B", [BIG], [-1])]
    protocol = Protocol("prw", [Query(0, "q", ref("q"), BIG, 1)], gallery)
    box = np.asarray([BIG, OTHER], np.float32)
    det = {
        "q": Detections(box, np.asarray([0.9, 0.9], np.float32), np.stack([e[0], e[1]])),
        "A": Detections(box, np.asarray([0.9, 0.9], np.float32), np.stack([target, e[1]])),
        "B": Detections(box[:1], np.asarray([0.9], np.float32), decoy[None]),
    }
    # the query image: the query (e0) and its companion (e1), who also appears in A
    context = [Detections(box, np.asarray([1.0, 0.9], np.float32), np.stack([e[0], e[1]]))]
    inputs = SearchInputs(det, e[0][None], context)
    plain = eval_search(protocol, inputs).per_query[0]
    assert plain.hits[1] is False and plain.top[0].image_key == "B"   # 0.7 > 0.6
    boosted = eval_search(protocol, inputs, SearchSettings(cbgm=True)).per_query[0]
    # in A, Kuhn-Munkres matches q->target and companion->e1; the target takes the
    # largest matched weight (1.0) and moves to rank 1
    assert boosted.hits[1] is True
    assert boosted.top[0].image_key == "A" and boosted.top[0].score == pytest.approx(1.0)


def test_cbgm_requires_the_query_box_first():
    protocol, inputs = prw_case()
    inputs.query_context = [dets([(OTHER, 1.0, 1.0)])]
    with pytest.raises(EvaluationError, match="row 0"):
        eval_search(protocol, inputs, SearchSettings(cbgm=True))


def test_detection_ab_matching_rule():
    g1, g2 = [0, 0, 10, 10], [2, 0, 12, 10]
    d1, d2 = [1.5, 0, 11.5, 10], [-3, 0, 7, 10]
    # IoU(d1,g1)=0.739, IoU(d1,g2)=0.905 -> d1 keeps g2 only; g1's best det is d1,
    # so g1 stays unmatched although d2 overlaps it at 0.538 (greedy VOC would match it)
    protocol = Protocol("x", [], [gimg("i", [g1, g2], [-1, -1])])
    m = eval_detection(protocol, {"i": Detections(np.asarray([d1, d2], np.float32),
                                                  np.asarray([0.6, 0.9], np.float32), np.zeros((2, 1)))})
    assert (m.count_tp, m.count_gt) == (1, 2)
    # ranking d2(F) d1(T): sklearn AP 1/2, x recall 1/2
    assert m.ap == pytest.approx(0.25)
    assert m.recall == pytest.approx(0.5)


def test_detection_counts_images_without_detections_and_labeled_only():
    protocol = Protocol("x", [], [gimg("i", [BIG, OTHER], [3, -1]), gimg("j", [BIG], [-1])])
    gal = {"i": dets([(BIG, 0.9, 0.0)]), "j": dets([])}
    m = eval_detection(protocol, gal)
    assert (m.count_tp, m.count_gt) == (1, 3)
    assert m.ap == pytest.approx(1 / 3)
    lab = eval_detection(protocol, gal, labeled_only=True)
    assert (lab.count_tp, lab.count_gt) == (1, 1)


@pytest.mark.parametrize("seed, n, frac", [(0, 50, 0.1), (1, 400, 0.05), (2, 300, 0.5), (3, 1000, 0.9), (4, 7, 0.5)])
def test_average_precision_equals_sklearn(seed, n, frac):
    """Both code paths (few positives: counts; many: sorted search), with ties."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < frac
    y[0] = True
    s = np.round(rng.random(n), 1 + seed % 3)  # coarse rounding -> many ties
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


@pytest.mark.parametrize(
    "kind, settings, gallery_size",
    [
        ("prw", SearchSettings(), None),
        ("prw", SearchSettings(cross_camera=True), None),
        ("prw", SearchSettings(cbgm=True), None),
        ("prw", SearchSettings(det_thresh=0.7), None),
        ("cuhk", SearchSettings(), 50),
        ("cuhk", SearchSettings(cbgm=True), 50),
        ("cuhk", SearchSettings(), -1),
    ],
)
def test_vectorised_equals_loop_reference(kind, settings, gallery_size):
    bench = _loop_reference()
    protocol, inputs = bench.make_case(n_images=120, n_ids=60, persons_per_image=(2, 7), n_queries=25,
                                       dim=16, seed=len(kind) + int(settings.cbgm), kind=kind,
                                       gallery_size=gallery_size or 100, n_cameras=3)
    if gallery_size == -1:
        protocol.gallery_size = -1
    m = eval_search(protocol, inputs, settings)
    aps, accs = bench.loop_eval_search(protocol, inputs, settings.det_thresh, settings.cbgm, settings.cross_camera)
    bench.assert_same(m, aps, accs)
    assert 0 < m.mAP < 1


def test_detection_equals_loop_reference():
    bench = _loop_reference()
    protocol, inputs = bench.make_case(n_images=80, n_ids=40, n_queries=5, dim=8, seed=3)
    ours = eval_detection(protocol, inputs.gallery)
    ap, recall = bench.loop_eval_detection(protocol, inputs.gallery)
    assert ours.ap == pytest.approx(ap, abs=1e-12) and ours.recall == pytest.approx(recall, abs=1e-12)


# --------------------------------------------------------------------------- results file
def test_results_file_round_trip(tmp_path):
    protocol, inputs = prw_case()
    inputs.query_context = [dets([(BIG, 1.0, 1.0), (OTHER, 0.8, 0.1)])]
    path = write_results(tmp_path / "res.npz", inputs, "prw", {"model": "test"})
    back, meta = read_results(path)
    assert meta["dataset"] == "prw" and meta["model"] == "test"
    assert set(back.gallery) == set(inputs.gallery)
    for k, d in inputs.gallery.items():
        np.testing.assert_array_equal(back.gallery[k].boxes, d.boxes)
        np.testing.assert_array_equal(back.gallery[k].feats, d.feats)
    assert len(back.gallery["c"]) == 0
    np.testing.assert_array_equal(back.query_context[0].boxes, inputs.query_context[0].boxes)
    assert check_against_protocol(back, protocol) == []
    assert eval_search(protocol, back).mAP == pytest.approx(eval_search(protocol, inputs).mAP)


def test_results_file_errors(tmp_path):
    protocol, inputs = prw_case()
    del inputs.gallery["d"]
    back, _ = read_results(write_results(tmp_path / "r.npz", inputs, "prw"))
    with pytest.raises(ResultsFileError, match=r"missing from the results.*'d'"):
        check_against_protocol(back, protocol)

    arrays = dict(np.load(tmp_path / "r.npz"))
    arrays["gallery_feats"] = np.zeros((arrays["gallery_feats"].shape[0], 3), np.float32)
    np.savez(tmp_path / "dim.npz", **arrays)
    with pytest.raises(ResultsFileError, match="dimension 3 but query_feats has 2"):
        read_results(tmp_path / "dim.npz")

    arrays = dict(np.load(tmp_path / "r.npz"))
    arrays["gallery_counts"] = arrays["gallery_counts"] + 1
    np.savez(tmp_path / "count.npz", **arrays)
    with pytest.raises(ResultsFileError, match="gallery_boxes"):
        read_results(tmp_path / "count.npz")

    arrays = dict(np.load(tmp_path / "r.npz"))
    del arrays["query_feats"]
    np.savez(tmp_path / "noq.npz", **arrays)
    with pytest.raises(ResultsFileError, match="query_feats"):
        read_results(tmp_path / "noq.npz")

    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ResultsFileError, match="not a readable"):
        read_results(tmp_path / "junk.npz")
    with pytest.raises(ResultsFileError, match="does not exist"):
        read_results(tmp_path / "absent.npz")

    _, full = prw_case()
    full.query_feats = np.zeros((3, 2), np.float32)
    back, _ = read_results(write_results(tmp_path / "q.npz", full, "prw"))
    with pytest.raises(ResultsFileError, match="3 query features"):
        check_against_protocol(back, protocol)


# --------------------------------------------------------------------------- chunked ranking internals
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segment_ap_equals_per_query_average_precision_bit_for_bit(seed):
    """The all-queries-at-once AP (one sort, counts from positions) gives the
    very float that per-query ``average_precision`` gives -- with heavy ties,
    a segment without positives, segments with >8 and >64 positives (other
    summation paths) and segments of one row."""
    from hybridps.finetune.evaluate.scoring import _segment_ap

    rng = np.random.default_rng(seed)
    sizes = [1, 5, 40, 300, 2000, 17, 0, 9]
    fracs = [1.0, 0.4, 0.3, 0.2, 0.05, 0.0, 0.5, 1.0]
    seg = np.repeat(np.arange(len(sizes)), sizes)
    score = np.round(rng.random(seg.size), 2)          # 100 distinct values: many ties
    y = np.concatenate([rng.random(n) < f for n, f in zip(sizes, fracs)])
    y[seg == 1] = [True, False, True, False, False]
    ours = _segment_ap(seg, score, y, len(sizes))
    for s in range(len(sizes)):
        rows = seg == s
        want = average_precision(y[rows], score[rows]) if y[rows].any() else 0.0
        assert ours[s] == want, (s, ours[s], want)            # exact, not approx
        if y[rows].any() and not y[rows].all():
            assert ours[s] == pytest.approx(average_precision_score(y[rows], score[rows]), abs=1e-12)


def test_top_rows_ties_go_to_the_earlier_gallery_image():
    """Equal similarities in different images rank in gallery-list order, and
    the ranked list is cut at keep_top even inside a tie."""
    gallery = [gimg("q", [BIG], [1])] + [gimg(k, [BIG], [2]) for k in "abcde"]
    lists = [[(k, None) for k in "ecabd"]]
    protocol = Protocol("cuhk", [Query(0, "q", ref("q"), BIG, 1)], gallery, per_query_gallery=lists,
                        gallery_size=5)
    det = {"q": dets([]), "a": dets([(BIG, 0.9, 0.5)]), "b": dets([(BIG, 0.9, 0.7), (OTHER, 0.9, 0.5)]),
           "c": dets([(BIG, 0.9, 0.5)]), "d": dets([(BIG, 0.9, 0.9)]), "e": dets([(BIG, 0.9, 0.5)])}
    m = eval_search(protocol, SearchInputs(det, E0), SearchSettings(keep_top=4))
    top = m.per_query[0].top
    # 0.9 (d), 0.7 (b), then the 0.5 tie: a before b's second box before c before e; cut at 4
    assert [(h.image_key, round(h.score, 3)) for h in top] == [("d", 0.9), ("b", 0.7), ("a", 0.5), ("b", 0.5)]


def test_cuhk_blocks_of_queries_give_the_same_numbers(monkeypatch):
    """Queries are processed in blocks sized by a cell budget; blocks of one
    or two queries give exactly what one block gives, and both equal the loop
    reference (duplicated list entries present)."""
    from hybridps.finetune.evaluate import types as evaluate_types

    bench = _loop_reference()
    protocol, inputs = bench.make_case(n_images=150, n_ids=40, persons_per_image=(2, 6), n_queries=30,
                                       dim=8, seed=11, kind="cuhk", gallery_size=60, n_cameras=2)
    assert any(len(lst) != len({k for k, _ in lst}) for lst in protocol.per_query_gallery)
    whole = eval_search(protocol, inputs)
    n_dets = sum(len(d) for d in inputs.gallery.values())
    # the plan and scoring stages both read the bound from evaluate.types when they run
    monkeypatch.setattr(evaluate_types, "_BLOCK_CELLS", n_dets + 1)   # one query per chunk, a few per plan block
    split = eval_search(protocol, inputs)
    for a, b in zip(whole.per_query, split.per_query):
        assert (a.ap, a.recall, a.count_gt, a.count_tp, a.hits) == (b.ap, b.recall, b.count_gt, b.count_tp, b.hits)
        # similarities are float32 products: a matrix product and per-query
        # matrix-vector products may round the last bit differently
        assert a.top_keys == b.top_keys and np.allclose(a.top_scores, b.top_scores, rtol=1e-6, atol=0)
    aps, accs = bench.loop_eval_search(protocol, inputs)
    bench.assert_same(split, aps, accs)
