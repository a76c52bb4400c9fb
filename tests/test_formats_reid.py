"""Labelled re-ID release formats (MSMT17, CUHK03, Market-1501): each synthetic
copy is written in its real layout, parsed back, and compared with the
writer's ground truth record by record."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from hybridps.data_prep.formats import cuhk03, market1501, msmt17
from hybridps.data_prep.imageio import decode_rgb, load_encoded
from hybridps.data_prep.record import Fix, Record, Skip
from hybridps.data_prep.synth import cuhk03 as synth_cuhk03
from hybridps.data_prep.synth import market1501 as synth_market
from hybridps.data_prep.synth import msmt17 as synth_msmt17


def collect(items):
    """(records by key, skip counts, fix counts); checks the sorted-order contract."""
    items = list(items)
    records = [i for i in items if isinstance(i, Record)]
    keys = [r.key for r in records]
    assert keys == sorted(keys), "records must come in key order"
    assert len(set(keys)) == len(keys), "record keys must be unique within a split"
    skipped = Counter(i.reason for i in items if isinstance(i, Skip))
    fixed = Counter(i.reason for i in items if isinstance(i, Fix))
    return {r.key: r for r in records}, dict(skipped), dict(fixed)


def assert_split_matches(items, split_truth: dict, cameras: dict, dataset: str, split: str):
    records, skipped, fixed = collect(items)
    assert sorted(records) == sorted(split_truth["records"])
    assert skipped == split_truth["skipped"]
    assert fixed == split_truth["fixed"]
    for key, rec in records.items():
        want = split_truth["records"][key]
        assert (rec.dataset, rec.split, rec.task, rec.labeled) == (dataset, split, "reid", True)
        assert rec.ids == want["ids"], key
        assert (rec.width, rec.height) == (want["width"], want["height"]), key
        # a re-ID crop is one person filling the whole image
        assert rec.boxes == want["boxes"] == [[0.0, 0.0, float(rec.width), float(rec.height)]]
        assert rec.ignore == want["ignore"] == []
        assert rec.camera == cameras[key], key
    return records


# --------------------------------------------------------------------------- Market-1501
@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market") / "market1501"
    return root, synth_market.write(root, seed=3)


@pytest.mark.parametrize("split", market1501.SPLITS)
def test_market_matches_truth(market, split):
    root, truth = market
    assert_split_matches(market1501.parse(root, split), truth["splits"][split],
                         truth["cameras"][split], "market1501", split)


def test_market_release_details(market):
    root, truth = market
    release = root / "Market-1501-v15.09.15"
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        assert (release / folder / "Thumbs.db").is_file()
    names = [p.name for p in (release / "bounding_box_test").glob("*.jpg")]
    junk = [n for n in names if n.startswith("-1_")]
    distractors = [n for n in names if n.startswith("0000_")]
    assert junk and distractors
    assert truth["splits"]["gallery"]["skipped"] == {"junk_id": len(junk) + len(distractors)}
    records, _, _ = collect(market1501.parse(root, "gallery"))
    assert all(r.ids[0] > 0 for r in records.values())
    # query: at most one image per camera per identity; test ids disjoint from train
    query, _, _ = collect(market1501.parse(root, "query"))
    per_cam = Counter((r.ids[0], r.camera) for r in query.values())
    assert max(per_cam.values()) == 1
    train, _, _ = collect(market1501.parse(root, "train"))
    assert {r.ids[0] for r in train.values()}.isdisjoint({r.ids[0] for r in query.values()})
    payload, fmt = load_encoded(next(iter(train.values())).image)
    assert fmt == "jpeg" and decode_rgb(payload, fmt).shape == (128, 64, 3)


def test_market_split_folders_directly_under_root(market):
    root, truth = market
    flat = Path(truth["release"])          # the folder holding the split folders
    assert_split_matches(market1501.parse(flat, "train"), truth["splits"]["train"],
                         truth["cameras"]["train"], "market1501", "train")


def test_market_counts_malformed_names(tmp_path):
    root = tmp_path / "market1501"
    truth = synth_market.write(root, seed=1)
    shutil.copy(next((root / "Market-1501-v15.09.15" / "query").glob("*.jpg")),
                root / "Market-1501-v15.09.15" / "query" / "IMG_0001.jpg")
    _, skipped, _ = collect(market1501.parse(root, "query"))
    assert skipped == {"malformed_annotation": 1}
    assert truth["splits"]["query"]["skipped"] == {}


# --------------------------------------------------------------------------- MSMT17
@pytest.fixture(scope="module")
def msmt(tmp_path_factory):
    root = tmp_path_factory.mktemp("msmt") / "msmt17"
    return root, synth_msmt17.write(root, seed=5)


@pytest.mark.parametrize("variant", ["V1", "V2"])
@pytest.mark.parametrize("split", msmt17.SPLITS)
def test_msmt17_matches_truth(msmt, variant, split):
    root, truth = msmt
    # V1 is found under the dataset root; V2 is given as its version folder
    parse_root = root if variant == "V1" else Path(truth["variants"]["V2"])
    records = assert_split_matches(msmt17.parse(parse_root, split), truth["splits"][split],
                                   truth["cameras"][split], "msmt17", split)
    image_dir = {("V1", False): "MSMT17_V1/train", ("V1", True): "MSMT17_V1/test",
                 ("V2", False): "MSMT17_V2/mask_train_v2", ("V2", True): "MSMT17_V2/mask_test_v2"}
    want_dir = image_dir[variant, split in ("query", "gallery")]
    for rec in records.values():
        assert rec.extra["version"] == variant
        assert f"/{want_dir}/" in rec.image.path and Path(rec.image.path).is_file()


def test_msmt17_edge_cases_are_in_the_copy(msmt):
    root, truth = msmt
    lists = root / "MSMT17_V1"
    assert b"\r\n" in (lists / "list_val.txt").read_bytes()
    assert (lists / "list_query.txt").read_bytes().endswith(b"\n\n")
    assert truth["splits"]["train"]["skipped"] == {"malformed_annotation": 1}
    assert truth["splits"]["gallery"]["skipped"] == {"missing_file": 1}
    # CRLF must not leak into keys or labels
    val, _, _ = collect(msmt17.parse(root, "val"))
    assert val and all("\r" not in r.source for r in val.values())


def test_msmt17_label_spaces(msmt):
    root, _ = msmt
    labels = {s: {r.ids[0] for r in collect(msmt17.parse(root, s))[0].values()} for s in msmt17.SPLITS}
    assert min(labels["train"]) == 0 and min(labels["query"] | labels["gallery"]) == 0
    assert labels["val"] <= labels["train"]            # val shares the train label space
    assert labels["train"] & labels["gallery"]          # test labels overlap numerically
    # every train crop lives in the folder named after its label
    for rec in collect(msmt17.parse(root, "train"))[0].values():
        assert Path(rec.image.path).parent.name == f"{rec.ids[0]:04d}"


def test_msmt17_missing_list_is_a_clear_error(tmp_path):
    root = tmp_path / "msmt17"
    synth_msmt17.write(root, seed=0)
    shutil.rmtree(root / "MSMT17_V1")
    (root / "MSMT17_V2" / "list_val.txt").unlink()
    # with V1 gone the V2 folder is found under the same root
    assert collect(msmt17.parse(root, "train"))[0]
    with pytest.raises(FileNotFoundError, match="list_val.txt"):
        list(msmt17.parse(root, "val"))


def test_msmt17_list_parser_rejects_bad_lines():
    assert msmt17.parse_list_line("0001/0001_000_01_0303morning_0015_0.jpg 1") == (
        "0001/0001_000_01_0303morning_0015_0.jpg", 1)
    for bad in ("0001/x.jpg", "0001/x.jpg one", "x.jpg 1", "../x/y.jpg 1", "0001/x.jpg -1", "a b c"):
        assert msmt17.parse_list_line(bad) is None, bad


# --------------------------------------------------------------------------- CUHK03
@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuhk") / "cuhk03"
    return root, synth_cuhk03.write(root, seed=7)


def _truth_of(truth: dict, image_type: str) -> dict:
    return truth if image_type == "detected" else truth["image_types"][image_type]


@pytest.mark.parametrize("image_type", cuhk03.IMAGE_TYPES)
@pytest.mark.parametrize("split", cuhk03.SPLITS)
def test_cuhk03_matches_truth(cuhk, image_type, split):
    root, truth = cuhk
    want = _truth_of(truth, image_type)
    records = assert_split_matches(cuhk03.parse(root, split, image_type=image_type), want["splits"][split],
                                   want["cameras"][split], "cuhk03", split)
    for rec in records.values():
        assert rec.image.kind == "hdf5" and rec.image.key.startswith("/#refs#/")
        assert 1 <= rec.camera <= 10


def test_cuhk03_detected_and_labeled_differ(cuhk):
    root, truth = cuhk
    det, det_skips, _ = collect(cuhk03.parse(root, "all", image_type="detected"))
    lab, lab_skips, _ = collect(cuhk03.parse(root, "all", image_type="labeled"))
    assert len(det) == len(lab) + 1
    assert det_skips == {"empty_cell": truth["empty_cells"]["detected"]}
    assert lab_skips == {"empty_cell": truth["empty_cells"]["labeled"]}
    shared = set(det) & set(lab)
    assert any((det[k].width, det[k].height) != (lab[k].width, lab[k].height) for k in shared)
    assert all(det[k].image.key != lab[k].image.key for k in shared)


def test_cuhk03_protocol_label_spaces(cuhk):
    root, _ = cuhk
    ids = {s: {r.ids[0] for r in collect(cuhk03.parse(root, s))[0].values()} for s in ("train", "query", "gallery")}
    assert ids["train"].isdisjoint(ids["query"] | ids["gallery"])
    assert ids["query"] == ids["gallery"]
    query, _, _ = collect(cuhk03.parse(root, "query"))
    assert max(Counter((r.ids[0], r.camera) for r in query.values()).values()) == 1


@pytest.mark.parametrize("image_type", cuhk03.IMAGE_TYPES)
def test_cuhk03_cells_decode_in_image_orientation(cuhk, image_type):
    root, _ = cuhk
    records, _, _ = collect(cuhk03.parse(root, "all", image_type=image_type))
    for rec in list(records.values())[:6]:
        payload, fmt = load_encoded(rec.image)
        assert fmt == "raw" and payload.dtype == np.uint8
        assert payload.shape == (rec.height, rec.width, 3)      # crops are taller than wide
        pair, person, _, cell = (int(x) for x in rec.key.split("_"))
        np.testing.assert_array_equal(payload, synth_cuhk03.crop_image(7, image_type, pair, person, cell))


def test_cuhk03_file_follows_the_matlab_layout(cuhk):
    root, truth = cuhk
    mat = Path(truth["mat_file"])
    assert mat.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    with h5py.File(mat, "r") as f:
        assert set(f) == {"#refs#", "detected", "labeled", "testsets"}
        for image_type in cuhk03.IMAGE_TYPES:
            top = f[image_type]
            assert top.shape == (1, 5) and top.attrs["MATLAB_class"] == b"cell"
            grid = f[top[0, 0]][()].T
            assert grid.shape[1] == 10
            empty = [f[r] for row in grid for r in row if f[r].ndim == 1]
            assert empty and all(d.dtype == np.uint64 and d.attrs["MATLAB_empty"] == 1 for d in empty)
        sets = f["testsets"]
        assert sets.shape[0] == 1 and f[sets[0, 0]][()].T.shape[1] == 2
    config = scipy.io.loadmat(truth["config_files"]["detected"])
    assert config["filelist"].shape[1] == 1 and config["train_idx"].min() == 1


def test_cuhk03_unusable_cells_are_counted(tmp_path):
    """Cells a MATLAB writer would not produce: an anonymous dataset (no object
    path for an ImageRef), an (H, W, 3)-stored image, a 1-D non-empty cell."""
    mat = tmp_path / "cuhk03_release" / "cuhk-03.mat"
    mat.parent.mkdir()
    with h5py.File(mat, "w") as f:
        refs = f.create_group("#refs#")
        named = refs.create_dataset("a", data=np.zeros((3, 4, 9), np.uint8)).ref
        anonymous = f.create_dataset(None, data=np.zeros((3, 4, 9), np.uint8)).ref
        wrong_order = refs.create_dataset("b", data=np.zeros((9, 4, 3), np.uint8)).ref
        vector = refs.create_dataset("c", data=np.ones(5, np.uint8)).ref
        empty = refs.create_dataset("d", data=np.zeros(2, np.uint64))
        empty.attrs["MATLAB_empty"] = np.uint8(1)
        row = [named, anonymous, wrong_order, vector] + [empty.ref] * 6
        grid = refs.create_dataset("e", data=np.array([row], dtype=h5py.ref_dtype).T)
        f.create_dataset("detected", data=np.array([[grid.ref]], dtype=h5py.ref_dtype))
    records, skipped, _ = collect(cuhk03.parse(tmp_path, "all"))
    assert list(records) == ["1_001_1_01"] and records["1_001_1_01"].image.key == "/#refs#/a"
    assert (records["1_001_1_01"].width, records["1_001_1_01"].height) == (4, 9)
    assert skipped == {"malformed_annotation": 3, "empty_cell": 6}
    with pytest.raises(ValueError, match="no 'labeled' variable"):
        list(cuhk03.parse(tmp_path, "all", image_type="labeled"))


def test_cuhk03_without_config(tmp_path):
    root = tmp_path / "cuhk03"
    truth = synth_cuhk03.write(root, seed=2)
    for path in truth["config_files"].values():
        Path(path).unlink()
    with pytest.raises(FileNotFoundError, match="cuhk03_new_protocol_config_detected.mat.*'all'"):
        list(cuhk03.parse(root, "train"))
    # the release folder itself is a root too
    assert_split_matches(cuhk03.parse(root / "cuhk03_release", "all"), truth["splits"]["all"],
                         truth["cameras"]["all"], "cuhk03", "all")


def test_cuhk03_config_found_next_to_release_folder(cuhk):
    root, truth = cuhk
    records, _, _ = collect(cuhk03.parse(root / "cuhk03_release", "train"))
    assert sorted(records) == sorted(truth["splits"]["train"]["records"])


def test_cuhk03_bad_options(cuhk):
    root, _ = cuhk
    with pytest.raises(ValueError, match="image_type"):
        list(cuhk03.parse(root, "train", image_type="raw"))
    with pytest.raises(ValueError, match="unknown split"):
        list(cuhk03.parse(root, "val"))


# --------------------------------------------------------------------------- all three
@pytest.mark.parametrize("module,split", [(market1501, "train"), (msmt17, "train"), (cuhk03, "all")])
def test_unrecognised_root_is_a_clear_error(tmp_path, module, split):
    (tmp_path / "README.txt").write_text("not a dataset")
    (tmp_path / "images").mkdir()
    with pytest.raises(FileNotFoundError, match=f"^{module.NAME}: no "):
        list(module.parse(tmp_path, split))


@pytest.mark.parametrize("module", [market1501, msmt17, cuhk03])
def test_module_constants(module):
    assert module.TASK == "reid" and module.LABELED is True
    assert module.DEFAULT_SPLITS == ("train",) and set(module.DEFAULT_SPLITS) <= set(module.SPLITS)
    assert module.LICENSE_NOTICE.startswith({"market1501": "Market-1501", "msmt17": "MSMT17",
                                             "cuhk03": "CUHK03"}[module.NAME])


@pytest.mark.parametrize("writer,module,split", [
    (synth_market, market1501, "train"), (synth_msmt17, msmt17, "train"), (synth_cuhk03, cuhk03, "train"),
])
def test_small_size_parses_and_is_larger(tmp_path, writer, module, split):
    tiny = writer.write(tmp_path / "tiny", seed=0, size="tiny")
    small = writer.write(tmp_path / "small", seed=0, size="small")
    records, skipped, _ = collect(module.parse(tmp_path / "small", split))
    assert sorted(records) == sorted(small["splits"][split]["records"])
    assert skipped == small["splits"][split]["skipped"]
    n_tiny, n_small = (len(t["splits"][split]["records"]) for t in (tiny, small))
    assert n_tiny <= 25 and 4 * n_tiny <= n_small


def test_writers_are_deterministic(tmp_path):
    for writer in (synth_market, synth_msmt17, synth_cuhk03):
        a = writer.write(tmp_path / writer.NAME / "a", seed=4)
        b = writer.write(tmp_path / writer.NAME / "b", seed=4)
        assert a["splits"] == b["splits"], writer.NAME
