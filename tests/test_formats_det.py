"""CrowdHuman, EuroCity Persons and LUPerson parsers against their synthetic copies."""
from __future__ import annotations

import json
import pickle
import random
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from hybridps.data_prep.formats import crowdhuman, ecp, get_format, luperson
from hybridps.data_prep.imageio import ImageError, check_jpeg_complete, image_size, load_encoded
from hybridps.data_prep.record import Fix, Record, Skip
from hybridps.data_prep.synth import crowdhuman as synth_crowdhuman
from hybridps.data_prep.synth import ecp as synth_ecp
from hybridps.data_prep.synth import luperson as synth_luperson


# --------------------------------------------------------------------------- helpers
class Parsed:
    """Everything a parse yielded, sorted into records / skips / fixes."""

    def __init__(self, items):
        self.items = list(items)
        self.records = {i.key: i for i in self.items if isinstance(i, Record)}
        self.skips = [i for i in self.items if isinstance(i, Skip)]
        self.fixes = [i for i in self.items if isinstance(i, Fix)]
        self.keys = [i.key for i in self.items if isinstance(i, Record)]

    def skip_counts(self) -> dict:
        return dict(Counter(s.reason for s in self.skips))

    def fix_counts(self) -> dict:
        return dict(Counter(f.reason for f in self.fixes))


def assert_matches_truth(parsed: Parsed, truth: dict, name: str, split: str) -> None:
    assert len(parsed.keys) == len(set(parsed.keys)), "record keys must be unique"
    assert set(parsed.records) == set(truth["records"])
    for key, expected in truth["records"].items():
        rec = parsed.records[key]
        assert rec.dataset == name and rec.split == split
        assert rec.boxes == expected["boxes"], key
        assert rec.ids == expected["ids"], key
        assert rec.ignore == expected["ignore"], key
        assert (rec.width, rec.height) == (expected["width"], expected["height"]), key
        assert all(c.isalnum() or c in "_-" for c in rec.key), rec.key
    assert parsed.skip_counts() == truth["skipped"]
    assert parsed.fix_counts() == truth["fixed"]


@pytest.fixture(scope="module")
def ch(tmp_path_factory):
    root = tmp_path_factory.mktemp("crowdhuman") / "CrowdHuman"
    return root, synth_crowdhuman.write(root, seed=3)


@pytest.fixture(scope="module")
def ecp_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecp") / "ECP"
    return root, synth_ecp.write(root, seed=3)


@pytest.fixture(scope="module")
def lup(tmp_path_factory):
    root = tmp_path_factory.mktemp("luperson") / "LUP"
    return root, synth_luperson.write(root, seed=3)


def _odgt_entries(root: Path, split: str) -> list[dict]:
    entries = []
    for line in (root / f"annotation_{split}.odgt").read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return entries


def _xyxy(xywh, w, h):
    x, y, bw, bh = xywh
    return [float(min(max(x, 0), w)), float(min(max(y, 0), h)), float(min(max(x + bw, 0), w)), float(min(max(y + bh, 0), h))]


# --------------------------------------------------------------------------- module contract
@pytest.mark.parametrize("module", [crowdhuman, ecp, luperson])
def test_module_constants(module):
    assert get_format(module.NAME) is module
    assert module.TASK in ("det", "reid")
    assert set(module.DEFAULT_SPLITS) <= set(module.SPLITS)
    assert module.LICENSE_NOTICE and "\n" not in module.LICENSE_NOTICE
    assert module.LABELED is False


# --------------------------------------------------------------------------- CrowdHuman
@pytest.mark.parametrize("split", ["train", "val"])
def test_crowdhuman_matches_truth(ch, split):
    root, truth = ch
    parsed = Parsed(crowdhuman.parse(root, split))
    assert_matches_truth(parsed, truth["splits"][split], "crowdhuman", split)
    assert parsed.keys == sorted(parsed.keys)
    for rec in parsed.records.values():
        assert rec.task == "det" and rec.labeled is False and rec.image.kind == "file"
        with Image.open(rec.image.path) as im:
            assert im.size == (rec.width, rec.height)


def test_crowdhuman_comma_id_and_both_image_layouts(ch):
    root, truth = ch
    raw_id = truth["edge_cases"]["comma_id"]
    assert "," in raw_id
    parsed = Parsed(crowdhuman.parse(root, "train"))
    rec = parsed.records[raw_id.replace(",", "_")]
    assert rec.extra["ID"] == raw_id and Path(rec.image.path).name == f"{raw_id}.jpg"
    folders = {Path(r.image.path).parent.relative_to(root).as_posix() for r in parsed.records.values()}
    assert folders == {"CrowdHuman_train01/Images", "Images"}


def test_crowdhuman_ignore_rules_and_clipping(ch):
    root, truth = ch
    entry = next(e for e in _odgt_entries(root, "train") if e["ID"] == truth["edge_cases"]["comma_id"])
    rec = Parsed(crowdhuman.parse(root, "train")).records[truth["edge_cases"]["extra_ignore"]]
    W, H = rec.width, rec.height
    extra_ignored = [g for g in entry["gtboxes"] if g["tag"] == "person" and g["extra"].get("ignore") == 1]
    masks = [g for g in entry["gtboxes"] if g["tag"] == "mask"]
    head_ignored = [g for g in entry["gtboxes"] if g["head_attr"].get("ignore") == 1]
    negative_x = [g for g in entry["gtboxes"] if g["fbox"][0] < 0]
    assert len(extra_ignored) == 1 and len(masks) == 1 and len(head_ignored) == 1 and negative_x
    for g in extra_ignored + masks:
        assert _xyxy(g["fbox"], W, H) in rec.ignore
        assert _xyxy(g["fbox"], W, H) not in rec.boxes
    assert _xyxy(head_ignored[0]["fbox"], W, H) in rec.boxes      # head-only flag: body stays
    for g in negative_x:
        clipped = _xyxy(g["fbox"], W, H)
        assert clipped[0] == 0.0 and clipped in rec.boxes + rec.ignore
    assert len(rec.boxes) + len(rec.ignore) == len(entry["gtboxes"])


def test_crowdhuman_skips(ch):
    root, truth = ch
    parsed = Parsed(crowdhuman.parse(root, "train"))
    by_reason = {}
    for s in parsed.skips:
        by_reason.setdefault(s.reason, []).append(s)
    entries = _odgt_entries(root, "train")
    empty_ids = {e["ID"] for e in entries if e["gtboxes"] == []}
    assert len(empty_ids) == 1
    assert any(next(iter(empty_ids)) in s.detail for s in by_reason["no_person"])
    neg = [g for e in entries for g in e["gtboxes"] if g["fbox"][2] < 0 or g["fbox"][3] < 0]
    assert len(neg) == 1
    assert any("negative size" in s.detail for s in by_reason["degenerate_box"])
    assert len(by_reason["malformed_annotation"]) == 1 and "invalid JSON" in by_reason["malformed_annotation"][0].detail
    assert len(by_reason["missing_file"]) == 1


def test_crowdhuman_truncated_jpeg_is_left_to_the_builder(ch):
    root, truth = ch
    split_truth = truth["splits"]["train"]
    assert split_truth["builder_skipped"] == {"corrupt_image": 1}
    key = split_truth["builder_skipped_keys"]["corrupt_image"][0]
    rec = Parsed(crowdhuman.parse(root, "train")).records[key]
    data, fmt = load_encoded(rec.image)
    assert fmt == "jpeg" and image_size(data, fmt) == (rec.width, rec.height)
    with pytest.raises(ImageError) as err:
        check_jpeg_complete(data)
    assert err.value.reason == "corrupt_image"


def test_crowdhuman_vbox_option(ch):
    root, truth = ch
    entries = {e["ID"].replace(",", "_"): e for e in _odgt_entries(root, "train")}
    parsed = Parsed(crowdhuman.parse(root, "train", box="vbox"))
    assert set(parsed.records) == set(truth["splits"]["train"]["records"])
    for key, rec in parsed.records.items():
        expected = [_xyxy(g["vbox"], rec.width, rec.height) for g in entries[key]["gtboxes"]
                    if g["tag"] == "person" and not g["extra"].get("ignore")]
        assert rec.boxes == [b for b in expected if b[2] - b[0] >= 1 and b[3] - b[1] >= 1]
    with pytest.raises(ValueError, match="box must be one of"):
        list(crowdhuman.parse(root, "train", box="hbox"))


# --------------------------------------------------------------------------- ECP
@pytest.mark.parametrize("split", ["train", "val"])
def test_ecp_matches_truth(ecp_copy, split):
    root, truth = ecp_copy
    parsed = Parsed(ecp.parse(root, split))
    assert_matches_truth(parsed, truth["splits"][split], "ecp", split)
    assert parsed.keys == sorted(parsed.keys)
    assert {r.extra["time"] for r in parsed.records.values()} == {"day", "night"}
    for key, rec in parsed.records.items():
        assert rec.extra["orient"] == truth["orient"][split][key]
        assert rec.image.kind == "file" and rec.image.path.endswith(".png")
        assert (rec.width, rec.height) == tuple(truth["image_size_in_json"])
        with Image.open(rec.image.path) as im:
            assert im.format == "PNG" and im.size == (rec.width, rec.height)


def _label(root: Path, key: str) -> dict:
    time, city, stem = key.split("_", 2)
    return json.loads((root / time / "labels" / "train" / city / f"{stem}.json").read_text())


def _box(obj) -> list[float]:
    return [float(obj[k]) for k in ("x0", "y0", "x1", "y1")]


def test_ecp_edge_cases_frame0(ecp_copy):
    root, truth = ecp_copy
    key = truth["edge_cases"]["frame0"]
    rec = Parsed(ecp.parse(root, "train")).records[key]
    objs = _label(root, key)["children"]
    by = lambda ident, tag=None: [o for o in objs if o["identity"] == ident and (tag is None or tag in o["tags"])]
    rider = by("rider")[0]
    assert rider["children"][0]["identity"] == "bicycle"
    assert _box(rider) in rec.boxes and _box(rider["children"][0]) not in rec.boxes + rec.ignore
    assert rec.extra["orient"][rec.boxes.index(_box(rider))] == rider["children"][0]["orient"]
    assert _box(by("pedestrian", "occluded>40")[0]) in rec.boxes
    far = [o for o in by("person-group-far-away") if "depiction" not in o["tags"]]
    assert _box(far[0]) in rec.ignore
    depicted = by("person-group-far-away", "depiction")[0]
    assert _box(depicted) not in rec.boxes + rec.ignore
    parked = by("bicycle")[0]
    assert _box(parked) not in rec.boxes + rec.ignore
    sitting = by("pedestrian", "sitting-lying")[0]
    assert _box(sitting) in rec.ignore and _box(sitting) not in rec.boxes
    capital = [o for o in objs if "Orient" in o]
    assert len(capital) == 1 and "orient" not in capital[0]
    assert rec.extra["orient"][rec.boxes.index(_box(capital[0]))] == capital[0]["Orient"]


def test_ecp_edge_cases_frame1_and_skips(ecp_copy):
    root, truth = ecp_copy
    key = truth["edge_cases"]["frame1"]
    parsed = Parsed(ecp.parse(root, "train"))
    rec = parsed.records[key]
    objs = _label(root, key)["children"]
    alone = [o for o in objs if o["identity"] == "rider"][0]
    assert alone["children"] == [] and _box(alone) in rec.boxes
    assert rec.extra["orient"][rec.boxes.index(_box(alone))] == alone["orient"]
    group = [o for o in objs if o["identity"] == "rider+vehicle-group-far-away"][0]
    assert _box(group) in rec.ignore
    for tag in ("depiction", "behind-glass"):
        ped = [o for o in objs if o["identity"] == "pedestrian" and tag in o["tags"]][0]
        assert _box(ped) in rec.ignore
    border = [o for o in objs if o["x0"] < 0][0]
    assert [0.0, border["y0"], border["x1"], float(rec.height)] in rec.boxes
    unknown = [s for s in parsed.skips if s.reason == "unknown_class"]
    assert len(unknown) == 1 and "dog" in unknown[0].detail and "testcity_00001" in unknown[0].source
    missing = [s for s in parsed.skips if s.reason == "missing_file"]
    assert len(missing) == 1
    label = root / missing[0].source
    assert label.is_file() and not (root / missing[0].source.replace("labels", "img").replace(".json", ".png")).exists()
    empty = [s for s in parsed.skips if s.reason == "no_person"]
    assert all(json.loads((root / s.source).read_text())["children"] == [] for s in empty)


def test_ecp_options(ecp_copy, tmp_path):
    root, truth = ecp_copy
    night = Parsed(ecp.parse(root, "val", time="night"))
    assert night.records and all(k.startswith("night_") for k in night.records)
    key = truth["edge_cases"]["night"]
    kept = Parsed(ecp.parse(root, "val", ignore_tags=()))
    sitting = [o for o in _label_val(root, key)["children"] if "sitting-lying" in o["tags"]][0]
    assert _box(sitting) in kept.records[key].boxes
    assert _box(sitting) in Parsed(ecp.parse(root, "val")).records[key].ignore
    with pytest.raises(ValueError, match="time must be"):
        list(ecp.parse(root, "val", time="dusk"))
    (tmp_path / "ECP").symlink_to(root)      # pointing at the folder that holds ECP/
    assert set(Parsed(ecp.parse(tmp_path, "val")).records) == set(truth["splits"]["val"]["records"])


def _label_val(root: Path, key: str) -> dict:
    time, city, stem = key.split("_", 2)
    return json.loads((root / time / "labels" / "val" / city / f"{stem}.json").read_text())


# --------------------------------------------------------------------------- LUPerson
def test_luperson_main_root_uses_cfs_list(lup):
    root, truth = lup
    parsed = Parsed(luperson.parse(root, "train"))
    assert_matches_truth(parsed, truth["splits"]["train"], "luperson", "train")
    assert parsed.keys == truth["order"]                 # list order, not sorted
    assert parsed.keys != sorted(parsed.keys)
    assert not set(truth["unlisted"]) & set(parsed.records)
    for rec in parsed.records.values():
        assert rec.task == "reid" and rec.labeled is False and rec.image.kind == "file"
        assert rec.boxes == [[0.0, 0.0, float(rec.width), float(rec.height)]]


def test_luperson_name_list_options(lup):
    root, truth = lup
    everything = Parsed(luperson.parse(root, "train", name_list=None))
    assert everything.keys == sorted(truth["order"] + truth["unlisted"]) and not everything.skips
    first = Parsed(luperson.parse(root, "train", keep_num=5))
    assert first.keys == truth["order"][:5]
    with pytest.raises(ValueError, match="keep_num needs a name list"):
        list(luperson.parse(root, "train", name_list=None, keep_num=5))


@pytest.mark.parametrize("variant", ["lmdb_list", "lmdb_dict", "lmdb_flat", "nl", "tree"])
def test_luperson_variants_match_truth(lup, variant):
    root, truth = lup
    v = truth["variants"][variant]
    parsed = Parsed(luperson.parse(root / v["root"], "train", **v["options"]))
    assert_matches_truth(parsed, v["splits"]["train"], "luperson", "train")
    assert parsed.keys == v["order"]


def test_luperson_keys_pickle_list_vs_dict(lup):
    root, truth = lup
    as_list = pickle.loads((root / "lmdbs" / "keys.pkl").read_bytes())
    as_dict = pickle.loads((root / "lmdb_300_30" / "keys.pkl").read_bytes())
    assert isinstance(as_list, list) and isinstance(as_dict, dict) and set(as_dict) == {"keys"}
    for folder in ("lmdbs", "lmdb_300_30"):
        for rec in Parsed(luperson.parse(root / folder, "train")).records.values():
            assert rec.image.kind == "lmdb" and rec.image.key == rec.key
            data, fmt = load_encoded(rec.image)
            assert fmt == "jpeg" and image_size(data, fmt) == (rec.width, rec.height)
    listed_only = Parsed(luperson.parse(root / "lmdbs", "train"))
    absent = set(as_list) - set(listed_only.records)
    assert len(absent) == 1
    assert [s.reason for s in listed_only.skips] == ["missing_file"]
    assert listed_only.skips[0].source.endswith(absent.pop())


def test_luperson_nl_pids(lup):
    root, truth = lup
    nl_root = root / "lupnl_lmdb"
    data = pickle.loads((nl_root / "keys.pkl").read_bytes())
    assert set(data) == {"keys", "pids"}
    noisy = Parsed(luperson.parse(nl_root, "train"))
    assert all(r.ids == [-1] and not r.labeled for r in noisy.records.values())
    labeled = Parsed(luperson.parse(nl_root, "train", use_nl_pids=True))
    assert {k: r.ids[0] for k, r in labeled.records.items()} == truth["nl_pids"]
    assert all(r.labeled for r in labeled.records.values())
    assert len(set(truth["nl_pids"].values())) < len(truth["nl_pids"])      # several crops per pid
    with pytest.raises(ValueError, match="no 'pids'"):
        list(luperson.parse(root / "lmdbs", "train", use_nl_pids=True))


def test_luperson_tree_keys_keep_folders(lup):
    root, truth = lup
    parsed = Parsed(luperson.parse(root / "extracted", "train"))
    stems = Counter(Path(r.image.path).stem for r in parsed.records.values())
    assert stems and all(n == 2 for n in stems.values())     # same names in two cities, distinct keys
    assert all(k.startswith(("france_paris_", "japan_tokyo_")) for k in parsed.records)


def test_luperson_detects_single_lmdb_subfolder(tmp_path, lup):
    root, truth = lup
    (tmp_path / "LUP").mkdir()
    (tmp_path / "LUP" / "lmdbs").symlink_to(root / "lmdbs")
    parsed = Parsed(luperson.parse(tmp_path / "LUP", "train"))
    assert set(parsed.records) == set(truth["variants"]["lmdb_list"]["splits"]["train"]["records"])
    (tmp_path / "LUP" / "other").symlink_to(root / "lmdb_300_30")
    with pytest.raises(ValueError, match="several LMDB copies"):
        list(luperson.parse(tmp_path / "LUP", "train"))


def test_luperson_sample_keys_and_restrict(lup):
    root, truth = lup
    keys = luperson.list_keys(root, name_list=None)
    shuffled = keys[::-1]
    a = luperson.sample_keys(keys, 7, seed=5)
    assert a == luperson.sample_keys(shuffled, 7, seed=5)          # listing order does not matter
    assert a == random.Random(5).sample(sorted(keys), 7)            # the documented recipe
    assert a != luperson.sample_keys(keys, 7, seed=6)
    assert len(set(a)) == 7 and set(a) <= set(keys)
    assert luperson.sample_keys(keys, 10_000, seed=5) == sorted(keys)
    with pytest.raises(ValueError):
        luperson.sample_keys(keys, -1, seed=0)
    parsed = Parsed(luperson.parse(root, "train", name_list=None, keys=a + ["not_a_key"]))
    assert parsed.keys == sorted(a)
    assert [(s.reason, s.source) for s in parsed.skips] == [("missing_file", "not_a_key")]


def test_luperson_refuses_code_in_pickles(tmp_path, lup):
    root, _ = lup
    copy = tmp_path / "evil"
    copy.mkdir()
    (copy / "lmdb").symlink_to(root / "lmdbs" / "lmdb")
    (copy / "keys.pkl").write_bytes(pickle.dumps({"keys": [Path("x")]}))
    with pytest.raises(ValueError, match="refusing to load"):
        list(luperson.parse(copy, "train"))


# --------------------------------------------------------------------------- errors, sizes
@pytest.mark.parametrize("module, expected", [
    (crowdhuman, "annotation_train.odgt"),
    (ecp, "day/"),
    (luperson, "keys.pkl"),
])
def test_unrecognisable_root_gives_clear_error(tmp_path, module, expected):
    (tmp_path / "readme.txt").write_text("nothing here")
    with pytest.raises((FileNotFoundError, ValueError)) as err:
        list(module.parse(tmp_path, "train"))
    assert expected in str(err.value) and module.NAME in str(err.value)


def test_crowdhuman_without_images_folder_is_a_clear_error(tmp_path):
    (tmp_path / "annotation_train.odgt").write_text('{"ID": "1,a", "gtboxes": []}\n')
    with pytest.raises(FileNotFoundError, match="Images/"):
        list(crowdhuman.parse(tmp_path, "train"))


def test_unknown_split_is_a_clear_error(ch):
    with pytest.raises(ValueError, match="unknown split"):
        list(crowdhuman.parse(ch[0], "test"))


@pytest.mark.parametrize("writer, parser, extra", [
    (synth_crowdhuman, crowdhuman, {}),
    (synth_ecp, ecp, {}),
    (synth_luperson, luperson, {}),
])
def test_small_size_keeps_edge_cases(tmp_path, writer, parser, extra):
    tiny = writer.write(tmp_path / "tiny", seed=1, size="tiny")
    small = writer.write(tmp_path / "small", seed=1, size="small")
    for split, split_truth in small["splits"].items():
        parsed = Parsed(parser.parse(tmp_path / "small", split))
        assert_matches_truth(parsed, split_truth, parser.NAME, split)
        tiny_n = len(tiny["splits"][split]["records"])
        assert 3 * tiny_n <= len(split_truth["records"]) <= 7 * tiny_n
        # every skip/fix reason of the tiny copy is present in the small one
        assert set(tiny["splits"][split]["skipped"]) == set(split_truth["skipped"])
        assert set(tiny["splits"][split]["fixed"]) == set(split_truth["fixed"])
