"""Person-search formats (CUHK-SYSU, PRW, PoseTrack21): synthetic tiny
releases written as real .mat/.json/.jpg files, parsed back and compared with
the writer's ground truth, plus the release quirks each parser must handle."""
from __future__ import annotations

import collections
import math
import shutil

import numpy as np
import pytest
import scipy.io

from hybridps.data_prep.formats import get_format
from hybridps.data_prep.protocol import Protocol
from hybridps.data_prep.record import Fix, Record, Skip
from hybridps.data_prep.synth import cuhk_sysu as synth_cuhk
from hybridps.data_prep.synth import posetrack21 as synth_pt21
from hybridps.data_prep.synth import prw as synth_prw

WRITERS = {"cuhk_sysu": synth_cuhk, "prw": synth_prw, "posetrack21": synth_pt21}
FORMATS = tuple(WRITERS)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """name -> (root, truth), each written once for the module."""
    out = {}
    base = tmp_path_factory.mktemp("ps")
    for name, writer in WRITERS.items():
        root = base / name
        out[name] = (root, writer.write(root, seed=0, size="tiny"))
    return out


def _parse(name, root, split):
    items = list(get_format(name).parse(root, split))
    records = [r for r in items if isinstance(r, Record)]
    skipped = collections.Counter(r.reason for r in items if isinstance(r, Skip))
    fixed = collections.Counter(r.reason for r in items if isinstance(r, Fix))
    return records, dict(skipped), dict(fixed)


# --------------------------------------------------------------------------- all formats
@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("split", ["train", "test"])
def test_parse_matches_truth(release, name, split):
    root, truth = release[name]
    expected = truth["splits"][split]
    records, skipped, fixed = _parse(name, root, split)
    assert [r.key for r in records] == list(expected["records"])  # canonical order, nothing extra
    for r in records:
        e = expected["records"][r.key]
        assert (r.boxes, r.ids, r.ignore) == (e["boxes"], e["ids"], e["ignore"]), r.key
        assert (r.width, r.height) == (e["width"], e["height"])
        assert (r.task, r.labeled, r.dataset, r.split) == ("ps", True, name, split)
        assert r.image.kind == "file" and (root / r.source).is_file()
    assert skipped == expected["skipped"]
    assert fixed == expected["fixed"]
    n_boxes = sum(len(e["boxes"]) for e in expected["records"].values())
    n_unlabeled = sum(i == -1 for e in expected["records"].values() for i in e["ids"])
    assert sum(len(r.boxes) for r in records) == n_boxes
    assert sum(i == -1 for r in records for i in r.ids) == n_unlabeled


@pytest.mark.parametrize("name", FORMATS)
def test_protocol_gallery_is_the_test_split(release, name):
    root, truth = release[name]
    protocol = get_format(name).load_protocol(root)
    assert isinstance(protocol, Protocol) and protocol.dataset == name
    records, _, _ = _parse(name, root, "test")
    assert [g.key for g in protocol.gallery] == [r.key for r in records]
    for g, r in zip(protocol.gallery, records):
        assert (g.boxes, g.pids, g.camera, g.image) == (r.boxes, r.ids, r.camera, r.image)
    keys = {g.key for g in protocol.gallery}
    assert all(q.image_key in keys for q in protocol.queries)
    assert [q.index for q in protocol.queries] == list(range(len(protocol.queries)))


@pytest.mark.parametrize("name", FORMATS)
def test_protocol_queries_match_truth(release, name):
    root, truth = release[name]
    protocol = get_format(name).load_protocol(root)
    want = truth["protocol"]["queries"]
    assert len(protocol.queries) == len(want) >= 8
    for q, e in zip(protocol.queries, want):
        assert (q.image_key, q.box, q.pid) == (e["image_key"], e["box"], e["pid"])
        assert q.camera == e.get("camera")


@pytest.mark.parametrize("name", ["prw", "posetrack21"])
def test_whole_gallery_positives(release, name):
    """PRW/PT21: per query, the gallery frames (not the query's own) holding
    the query pid, found through the protocol's gallery pids."""
    root, truth = release[name]
    protocol = get_format(name).load_protocol(root)
    assert protocol.per_query_gallery is None
    assert [g.key for g in protocol.gallery] == truth["protocol"]["gallery"]
    for q, want in zip(protocol.queries, truth["protocol"]["positives"]):
        got = [[g.key, g.boxes[g.pids.index(q.pid)]] for g in protocol.gallery
               if g.key != q.image_key and q.pid in g.pids]
        assert got == want and got, q
    with pytest.raises(ValueError, match="gallery"):
        get_format(name).load_protocol(root, gallery_size=100)


# --------------------------------------------------------------------------- CUHK-SYSU
@pytest.mark.parametrize("size", [50, 100, 500, 4000, -1])
def test_cuhk_per_query_gallery(release, size):
    root, truth = release["cuhk_sysu"]
    protocol = get_format("cuhk_sysu").load_protocol(root, gallery_size=size)
    want = truth["protocol"]["per_query_gallery"][size]
    got = [[[k, b] for k, b in g] for g in protocol.per_query_gallery]
    assert got == want
    assert protocol.gallery_size == size
    assert protocol.notes["full_gallery"] == (size == -1)
    pool_size = len(truth["pool"])
    assert all(len(g) == min(size if size > 0 else 50, pool_size - 1) for g in got)
    for g in got:  # positives first
        flags = [b is not None for _, b in g]
        assert flags == sorted(flags, reverse=True) and flags[0]


def test_cuhk_gallery_size_selection_and_quirks(release):
    root, truth = release["cuhk_sysu"]
    fmt = get_format("cuhk_sysu")
    default = fmt.load_protocol(root)
    assert default.gallery_size == 100 and default.notes["protocol_file"] == "TestG100.mat"
    g50 = fmt.load_protocol(root, gallery_size=50).per_query_gallery
    assert default.per_query_gallery != g50  # a different file was read
    q0, q1 = default.queries[0], default.queries[1]
    # query 0 lists its own image (with its own box) as a positive
    assert [q0.image_key, q0.box] == list(default.per_query_gallery[0][0])
    # query 1 lists one gallery image twice, both positive, boxes differing
    pos1 = [(k, b) for k, b in default.per_query_gallery[1] if b is not None]
    assert pos1[0][0] == pos1[1][0] and pos1[0][1] != pos1[1][1]
    with pytest.raises(ValueError, match="gallery_size"):
        fmt.load_protocol(root, gallery_size=77)


def test_cuhk_mat_files_read_the_reference_way(release):
    root, truth = release["cuhk_sysu"]
    ann = root / "annotation"
    protoc = scipy.io.loadmat(ann / "test/train_test/TestG100.mat")["TestG100"].squeeze()
    n_queries = len(truth["protocol"]["queries"])
    assert protoc.shape == (n_queries,)
    for i, want in enumerate(truth["protocol"]["queries"]):
        assert protoc["Query"][i]["imname"][0, 0][0] == want["image_key"] + ".jpg"
        loc = protoc["Query"][i]["idlocate"][0, 0]
        assert loc.dtype == np.uint16
        x, y, w, h = loc[0].astype(np.int32)
        assert [x, y, x + w, y + h] == want["box"]
        sizes = [item[1][0].size for item in protoc["Gallery"][i].squeeze()]
        assert set(sizes) == {0, 4} and sizes == sorted(sizes, reverse=True)
    images = scipy.io.loadmat(ann / "Images.mat")["Img"].squeeze()
    names = [im[0][0] for im in images]
    assert len(names) == len(set(names))
    boxes = [np.stack([b[0][0] for b in im[2][0]]) for im in images]
    assert all(b.shape[1] == 4 for b in boxes)
    pool = [a[0] for a in scipy.io.loadmat(ann / "pool.mat")["pool"].squeeze()]
    assert [p[:-4] for p in pool] == truth["pool"] and set(pool) <= set(names)
    train = scipy.io.loadmat(ann / "test/train_test/Train.mat")["Train"].squeeze()
    assert len(train) == truth["num_train_ids"]
    scene = train[0][0, 0][2].squeeze()
    assert all(s[0][0] in names and s[1][0].shape == (4,) for s in scene)
    person = scipy.io.loadmat(ann / "Person.mat")["Person"].squeeze()
    assert len(person) == truth["num_train_ids"] + n_queries
    for sub, var in (("Occlusion.mat", "Occlusion1"), ("Resolution.mat", "Test_Size")):
        assert scipy.io.loadmat(ann / "test/subset" / sub)[var].size >= 1


def test_cuhk_query_subsets_both_layouts(release):
    """Occlusion.mat (TestG layout) and Resolution.mat (plain query list) map
    onto the protocol's query positions, whatever the gallery size."""
    root, truth = release["cuhk_sysu"]
    want = truth["query_subsets"]
    assert want["occlusion"] and want["resolution"] and want["occlusion"] != want["resolution"]
    occ = scipy.io.loadmat(root / "annotation/test/subset/Occlusion.mat")["Occlusion1"]
    res = scipy.io.loadmat(root / "annotation/test/subset/Resolution.mat")["Test_Size"]
    assert "Query" in occ.dtype.names and "Query" not in res.dtype.names    # the two layouts
    for size in (50, 100, -1):
        protocol = get_format("cuhk_sysu").load_protocol(root, gallery_size=size)
        assert protocol.query_subsets == want
        assert protocol.notes["query_subsets"]["occlusion"].startswith(f"Occlusion.mat: {len(want['occlusion'])} queries")
    # the low-resolution subset really holds the smallest query boxes
    areas = [(q["box"][2] - q["box"][0]) * (q["box"][3] - q["box"][1]) for q in truth["protocol"]["queries"]]
    assert max(areas[i] for i in want["resolution"]) <= min(a for i, a in enumerate(areas) if i not in want["resolution"])


def test_cuhk_query_subsets_absent_or_damaged(release, tmp_path):
    src, truth = release["cuhk_sysu"]
    root = tmp_path / "cuhk"
    shutil.copytree(src, root)
    sub = root / "annotation/test/subset"
    (sub / "Resolution.mat").unlink()
    (sub / "Occlusion.mat").write_bytes(b"MATLAB 5.0 MAT-file, but cut short")
    protocol = get_format("cuhk_sysu").load_protocol(root)
    assert protocol.query_subsets == {}
    notes = protocol.notes["query_subsets"]
    assert notes["resolution"].startswith("absent") and notes["occlusion"].startswith("unreadable")
    # a subset naming one query the protocol does not have keeps the others, says so
    shutil.rmtree(sub)
    sub.mkdir()
    occ = scipy.io.loadmat(src / "annotation/test/subset/Occlusion.mat")["Occlusion1"]
    occ[0, 0]["Query"][0, 0]["imname"] = np.array(["s999999.jpg"])
    occ[0, 0]["Query"][0, 0]["idname"] = np.array(["nobody"])
    scipy.io.savemat(sub / "Occlusion.mat", {"Occlusion1": occ})
    protocol = get_format("cuhk_sysu").load_protocol(root)
    assert protocol.query_subsets["occlusion"] == truth["query_subsets"]["occlusion"][1:]
    assert "1 entries match no TestG50 query" in protocol.notes["query_subsets"]["occlusion"]
    assert protocol.notes["query_subsets"]["resolution"].startswith("absent")


def test_cuhk_uint16_boxes_cast_before_arithmetic(release, tmp_path):
    """x + w must not wrap around in uint16 (65000 + 1000)."""
    src, _ = release["cuhk_sysu"]
    root = tmp_path / "cuhk"
    shutil.copytree(src, root)
    path = root / "annotation/test/train_test/TestG50.mat"
    mat = scipy.io.loadmat(path)
    mat["TestG50"][0, 0]["Query"][0, 0]["idlocate"] = np.array([[65000, 5, 1000, 20]], dtype=np.uint16)
    scipy.io.savemat(path, {"TestG50": mat["TestG50"]})
    protocol = get_format("cuhk_sysu").load_protocol(root, gallery_size=50)
    assert protocol.queries[0].box == [65000.0, 5.0, 66000.0, 25.0]
    with pytest.raises(ValueError, match="same queries"):  # TestG100 no longer agrees
        get_format("cuhk_sysu").load_protocol(root, gallery_size=100)


def test_cuhk_identity_labels(release):
    root, truth = release["cuhk_sysu"]
    train, _, _ = _parse("cuhk_sysu", root, "train")
    test, _, _ = _parse("cuhk_sysu", root, "test")
    assert sorted({i for r in train for i in r.ids if i >= 0}) == list(range(truth["num_train_ids"]))
    n_queries = len(truth["protocol"]["queries"])
    assert sorted({i for r in test for i in r.ids if i >= 0}) == list(range(n_queries))
    assert all(r.camera is None for r in train + test)
    assert any(all(i == -1 for i in r.ids) for r in train)  # images without a labeled box


def test_cuhk_missing_annotation_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="Images.mat"):
        list(get_format("cuhk_sysu").parse(tmp_path, "train"))


# --------------------------------------------------------------------------- PRW
def test_prw_annotation_variable_names(release):
    root, truth = release["prw"]
    fmt = get_format("prw")
    for split in ("train", "test"):
        seen = set()
        for frame in fmt.frame_names(root, split):
            mat = scipy.io.loadmat(str(root / "annotations" / f"{frame}.jpg"))  # loadmat appends .mat
            seen |= {k for k in mat if not k.startswith("__")}
        assert seen == {"box_new", "anno_file", "anno_previous"} == set(truth["box_variables"][split])
    # the loaders' access patterns: img[0][0] + ".jpg", ['ID_train'][0]
    index = scipy.io.loadmat(root / "frame_train.mat")["img_index_train"]
    assert [img[0][0] + ".jpg" for img in index] == [k + ".jpg" for k in truth["splits"]["train"]["records"]]
    assert scipy.io.loadmat(root / "ID_train.mat")["ID_train"][0].tolist() == truth["train_ids"]


def test_prw_crlf_queries_and_query_box_rule(release):
    root, truth = release["prw"]
    raw = (root / "query_info.txt").read_bytes()
    assert raw.count(b"\r\n") == raw.count(b"\n") == len(truth["protocol"]["queries"])
    queries = get_format("prw").read_queries(root)
    assert all("\r" not in q["frame"] for q in queries)
    negative = [line.split() for line in raw.decode().splitlines() if float(line.split()[1]) < 0]
    assert negative, "the tiny release must hold a negative-x query"
    pid, x, y, w, h, frame = negative[0]
    x, y, w, h = map(float, (x, y, w, h))
    q = next(q for q in queries if q["frame"] == frame and q["pid"] == int(pid))
    # float xyxy -> int32 truncation (toward zero) -> clip at 0
    assert q["box"] == [0.0, float(int(y)), float(int(x + w)), float(int(y + h))]
    # the annotation rule differs: clip xywh first, so the box is shifted, not cropped
    record = next(r for r in _parse("prw", root, "test")[0] if r.key == frame)
    box = record.boxes[record.ids.index(int(pid))]
    assert box[0] == 0.0 and box[2] == float(math.trunc(w)) != q["box"][2]


def test_prw_identities_cameras_and_unlabeled(release):
    root, truth = release["prw"]
    fmt = get_format("prw")
    lists = fmt.identity_lists(root)  # ID_test.mat's variable is 'ID_test2'
    assert "ID_test2" in scipy.io.loadmat(root / "ID_test.mat")
    assert lists == {"train": truth["train_ids"], "test": truth["test_ids"]}
    train, _, _ = _parse("prw", root, "train")
    test, _, _ = _parse("prw", root, "test")
    # the contiguous relabelling gets every training pid (the "483" convention)
    assert sorted({i for r in train for i in r.ids if i >= 0}) == truth["train_ids"]
    assert {q.pid for q in fmt.load_protocol(root).queries} == set(truth["test_ids"])
    for records in (train, test):
        assert any(r.ids and all(i == -1 for i in r.ids) for r in records)  # a frame with only -2
        assert {r.camera for r in records} == {1, 2, 3, 4, 5, 6}
        assert all(r.camera == int(r.key[1]) for r in records)
    sizes = {r.camera: (r.width, r.height) for r in train + test}
    assert sizes[6] != sizes[1] and sizes[6][0] < sizes[1][0]


def test_prw_missing_pieces_give_clear_errors(release, tmp_path):
    src, _ = release["prw"]
    root = tmp_path / "prw"
    shutil.copytree(src, root)
    (root / "query_info.txt").unlink()
    with pytest.raises(FileNotFoundError, match="query_info.txt"):
        get_format("prw").load_protocol(root)
    shutil.rmtree(root / "annotations")
    with pytest.raises(FileNotFoundError, match="annotation"):
        list(get_format("prw").parse(root, "train"))


def test_prw_malformed_annotation_is_a_counted_skip(release, tmp_path):
    src, truth = release["prw"]
    root = tmp_path / "prw"
    shutil.copytree(src, root)
    frame = get_format("prw").frame_names(root, "train")[0]
    scipy.io.savemat(root / "annotations" / f"{frame}.jpg.mat", {"something_else": np.zeros((1, 5))})
    records, skipped, _ = _parse("prw", root, "train")
    assert skipped.get("malformed_annotation") == 1
    assert len(records) == len(truth["splits"]["train"]["records"]) - 1


# --------------------------------------------------------------------------- PoseTrack21
def test_pt21_lut_size_and_layout_variants(release, tmp_path):
    src, truth = release["posetrack21"]
    fmt = get_format("posetrack21")
    train, _, _ = _parse("posetrack21", src, "train")
    distinct = {i for r in train for i in r.ids}
    assert fmt.num_train_ids(src) == len(distinct) == truth["num_train_ids"]
    assert any(r.ignore for r in train) and all(r.camera is None for r in train)
    assert all(r.extra["video"] for r in train)
    # psd2 keeps the json files under annotations/posetrack_person_search/
    root = tmp_path / "pt21"
    shutil.copytree(src, root)
    (root / "annotations").mkdir()
    (root / "posetrack_person_search").rename(root / "annotations" / "posetrack_person_search")
    moved, _, _ = _parse("posetrack21", root, "train")
    assert [(r.key, r.boxes, r.ids) for r in moved] == [(r.key, r.boxes, r.ids) for r in train]
    shutil.rmtree(root / "annotations")
    with pytest.raises(FileNotFoundError, match="posetrack_person_search"):
        list(fmt.parse(root, "train"))


# --------------------------------------------------------------------------- writers
def test_writer_is_deterministic(tmp_path):
    a = synth_prw.write(tmp_path / "a", seed=3, size="tiny")
    b = synth_prw.write(tmp_path / "b", seed=3, size="tiny")
    c = synth_prw.write(tmp_path / "c", seed=4, size="tiny")
    assert a == b and a != c
    frame = next(iter(a["splits"]["test"]["records"]))
    assert (tmp_path / "a/frames" / f"{frame}.jpg").read_bytes() == (tmp_path / "b/frames" / f"{frame}.jpg").read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMATS)
def test_small_release_matches_truth(tmp_path, name):
    """The demo size carries the same edge cases and parses to its truth."""
    truth = WRITERS[name].write(tmp_path / name, seed=0, size="small")
    reasons = set()
    for split in ("train", "test"):
        records, skipped, fixed = _parse(name, tmp_path / name, split)
        expected = truth["splits"][split]
        assert {r.key: (r.boxes, r.ids, r.ignore) for r in records} == {
            k: (e["boxes"], e["ids"], e["ignore"]) for k, e in expected["records"].items()}
        assert (skipped, fixed) == (expected["skipped"], expected["fixed"])
        reasons |= set(skipped) | set(fixed)
    assert {"degenerate_box", "box_clipped"} <= reasons
    protocol = get_format(name).load_protocol(tmp_path / name)
    assert [(q.image_key, q.box, q.pid) for q in protocol.queries] == [
        (q["image_key"], q["box"], q["pid"]) for q in truth["protocol"]["queries"]]
