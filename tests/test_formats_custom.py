"""The custom-data formats (COCO-format persons, a folder of re-ID crops)
against their synthetic copies, the way test_formats_det checks the release
formats; then both built into shards and pre-trained on for a few steps."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hybridps.data_prep.formats import coco, crops, get_format
from hybridps.data_prep.record import Record
from hybridps.data_prep.synth import coco as synth_coco
from hybridps.data_prep.synth import crops as synth_crops
from test_formats_det import Parsed, assert_matches_truth

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def coco_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "mydata"
    return root, synth_coco.write(root, seed=3)


@pytest.fixture(scope="module")
def crops_copy(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops") / "mycrops"
    return root, synth_crops.write(root, seed=3)


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def _instances(root: Path, split: str = "train") -> Path:
    return coco.find_annotation(root, split)


# --------------------------------------------------------------------------- contract
@pytest.mark.parametrize("module, task", [(coco, "det"), (crops, "reid")])
def test_module_constants(module, task):
    assert get_format(module.NAME) is module and module.TASK == task
    assert set(module.DEFAULT_SPLITS) <= set(module.SPLITS)
    assert module.LICENSE_NOTICE and "\n" not in module.LICENSE_NOTICE


# --------------------------------------------------------------------------- COCO
@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_matches_truth(coco_copy, split):
    root, truth = coco_copy
    parsed = Parsed(coco.parse(root, split))
    assert_matches_truth(parsed, truth["splits"][split], "coco", split)
    assert parsed.keys == sorted(parsed.keys)
    for rec in parsed.records.values():
        assert rec.task == "det" and rec.labeled is False and set(rec.ids) == {-1}
        with Image.open(rec.image.path) as im:
            assert im.size == (rec.width, rec.height)


def test_coco_layout_details(coco_copy):
    root, truth = coco_copy
    # person is category 7 here, not COCO's 1; val is found as instances_val2017.json with images in val2017/
    assert truth["category_id"] == 7
    assert _instances(root, "val").name == "instances_val2017.json"
    assert {Path(r.image.path).relative_to(root).parts[0] for r in Parsed(coco.parse(root, "val")).records.values()} == {"val2017"}
    train = Parsed(coco.parse(root, "train"))
    assert "extra_train_000002" in train.records               # file_name with a sub-folder
    crowd = train.records["train_000000"]
    assert len(crowd.ignore) == 1 and crowd.ignore[0] not in crowd.boxes    # iscrowd=1 -> ignore region
    # category=car: the car-only image is the one with a record now, persons are gone
    cars = Parsed(coco.parse(root, "train", category="car"))
    assert list(cars.records) == ["train_000008"]


def test_coco_annotation_order_does_not_matter(coco_copy, tmp_path):
    root = _copy(coco_copy[0], tmp_path)
    path = _instances(root)
    doc = json.loads(path.read_text())
    before = {k: (r.boxes, r.ignore) for k, r in Parsed(coco.parse(root, "train")).records.items()}
    doc["annotations"].reverse()
    doc["images"].reverse()
    path.write_text(json.dumps(doc, indent=1))
    after = {k: (r.boxes, r.ignore) for k, r in Parsed(coco.parse(root, "train")).records.items()}
    assert after == before


def test_coco_explicit_annotation_and_image_folder(coco_copy, tmp_path):
    root, truth = coco_copy
    other = tmp_path / "elsewhere"
    shutil.copytree(root / "train", other / "pictures")
    shutil.copy(_instances(root), other / "labels.json")
    parsed = Parsed(coco.parse(tmp_path, "train", annotation=other / "labels.json", images="elsewhere/pictures"))
    assert set(parsed.records) == set(truth["splits"]["train"]["records"])
    with pytest.raises(FileNotFoundError, match="images=nowhere"):
        list(coco.parse(tmp_path, "train", annotation=other / "labels.json", images="nowhere"))


@pytest.mark.parametrize("content, message", [
    (b'{"images": [', "not valid JSON"),
    (b'\xff\xfe{}', "not valid JSON"),
    (b"[1, 2]", "holds a JSON list"),
    (b'{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
    (b'{"images": [], "annotations": [], "categories": [{"id": 1, "name": "dog"}]}', "no category named person"),
    (b"[" * 100000 + b"]" * 100000, "nests too deep|not valid JSON"),
])
def test_coco_damaged_file_is_a_clear_error(tmp_path, content, message):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        list(coco.parse(tmp_path, "train"))


def test_coco_missing_or_ambiguous_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match="instances_train.json"):
        list(coco.parse(tmp_path, "train"))
    (tmp_path / "annotations").mkdir()
    for name in ("instances_train2014.json", "instances_train2017.json"):
        (tmp_path / "annotations" / name).write_text("{}")
    with pytest.raises(FileNotFoundError, match="several train annotation files"):
        list(coco.parse(tmp_path, "train"))
    with pytest.raises(ValueError, match="unknown split"):
        list(coco.parse(tmp_path, "test"))


# --------------------------------------------------------------------------- crops
def test_crops_matches_truth(crops_copy):
    root, truth = crops_copy
    parsed = Parsed(crops.parse(root, "train"))
    assert_matches_truth(parsed, truth["splits"]["train"], "crops", "train")
    assert parsed.keys == sorted(parsed.keys)
    names = truth["identities"]
    for rec in parsed.records.values():
        assert rec.task == "reid" and rec.labeled == (rec.ids[0] >= 0)
        if rec.ids[0] >= 0:
            assert rec.extra["identity"] == names[rec.ids[0]] and rec.source.startswith(rec.extra["identity"] + "/")
        else:
            assert "/" not in rec.source                        # only the loose crops are unlabeled
    assert {r.ids[0] for r in parsed.records.values()} == set(range(len(names))) | {-1}
    assert not any(".ipynb_checkpoints" in r.source for r in parsed.records.values())


def test_crops_labels_none_makes_every_crop_its_own_identity(crops_copy):
    root, truth = crops_copy
    variant = truth["variants"]["unlabeled"]
    parsed = Parsed(crops.parse(root / variant["root"], "train", **variant["options"]))
    assert_matches_truth(parsed, variant["splits"]["train"], "crops", "train")
    assert all(r.labeled is False for r in parsed.records.values())


def test_crops_flat_folder_is_unlabeled(crops_copy, tmp_path):
    root, truth = crops_copy
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in sorted(root.rglob("*.jpg")):
        if ".ipynb" not in str(p) and "garbage" not in p.name:
            shutil.copy(p, flat / f"{p.parent.name}-{p.name}")
    parsed = Parsed(crops.parse(flat, "train"))            # labels=auto: no sub-folder -> none
    assert len(parsed.records) == len(list(flat.iterdir())) - 0
    assert all(r.ids == [-1] and r.labeled is False for r in parsed.records.values())
    assert crops.resolve_labels("auto", {}) == "none" and crops.resolve_labels("auto", {"a": ["a/x.jpg"]}) == "folders"


def test_crops_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list(crops.parse(tmp_path / "missing", "train"))
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match="no .jpg"):
        list(crops.parse(tmp_path, "train"))
    Image.new("RGB", (16, 32)).save(tmp_path / "a.jpg")
    with pytest.raises(ValueError, match="labels must be one of"):
        list(crops.parse(tmp_path, "train", labels="yes"))


@pytest.mark.parametrize("writer", [synth_coco, synth_crops])
def test_writers_are_deterministic_and_small_is_larger(writer, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ta, tb = writer.write(a, seed=5), writer.write(b, seed=5)
    assert ta == tb
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    small = writer.write(tmp_path / "small", seed=5, size="small")
    assert len(small["splits"]["train"]["records"]) > len(ta["splits"]["train"]["records"])
    fmt = get_format(writer.NAME)
    recs = [r for r in fmt.parse(tmp_path / "small", "train") if isinstance(r, Record)]
    assert len(recs) == len(small["splits"]["train"]["records"])


# --------------------------------------------------------------------------- build + pre-train
def _run(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def custom_build(tmp_path_factory):
    """`data_prep synth` then one build (the real CLI) of the custom sources
    beside a release of each task, so each IAM has two domains to tell apart."""
    base = tmp_path_factory.mktemp("custom")
    synth, out = base / "synth", base / "shards"
    names = ("coco", "crowdhuman", "crops", "luperson")
    _run("-m", "hybridps.data_prep", "synth", synth, "--only", ",".join(names))
    _run("-m", "hybridps.data_prep", "build", out, *(a for n in names for a in ("--source", f"{n}={synth / n}")),
         "--workers", "1", "--quiet")
    return synth, out, json.loads((synth / "synth_truth.json").read_text())


def test_build_maps_sources_to_tasks_and_identities(custom_build, tmp_path):
    from hybridps.data_prep.manifest import load_manifest, shard_paths
    from hybridps.data_prep.preview import read_samples
    from hybridps.pretrain.train import task_domains

    synth, out, truth = custom_build
    m = load_manifest(out)
    assert m["domains"] == ["coco", "crowdhuman", "crops", "luperson"]
    assert task_domains(m) == ([0, 1], [2, 3])               # COCO persons: the detection IAM; crops: re-ID
    c, r = m["datasets"]["coco"], m["datasets"]["crops"]
    assert (c["task"], c["labeled"], c["num_labeled_ids"]) == ("det", False, 0)
    t = truth["crops"]["splits"]["train"]
    n_loose = sum(1 for rec in t["records"].values() if rec["ids"] == [-1])
    assert (r["task"], r["labeled"], r["num_labeled_ids"], r["num_pseudo_ids"]) == (
        "reid", True, len(truth["crops"]["identities"]), n_loose)
    samples = [json.loads(s["json"]) for p in shard_paths(m, out) for s in read_samples(p)]
    coco_pids = [p for s in samples if s["dataset"] == "coco" for p in s["pids"]]
    assert len(coco_pids) == len(set(coco_pids)) and min(coco_pids) >= 0    # every person its own identity
    by_local = {}
    for s in samples:
        if s["dataset"] == "crops":
            assert s["labeled"] == (s["local_ids"][0] >= 0) and s["canvas"] is None
            by_local.setdefault(s["local_ids"][0], set()).add(s["pids"][0])
    assert all(len(g) == 1 for loc, g in by_local.items() if loc >= 0)   # one identity -> one global id
    # the same tree with labels=none: no labeled id at all, one pseudo id per crop
    flat = tmp_path / "flat"
    _run("-m", "hybridps.data_prep", "build", flat, "--source", f"crops={synth / 'crops'}",
         "--format-option", "crops:labels=none", "--workers", "1", "--quiet")
    f = load_manifest(flat)["datasets"]["crops"]
    assert (f["labeled"], f["num_labeled_ids"], f["num_pseudo_ids"]) == (False, 0, len(t["records"]))


def test_short_pretraining_run_on_custom_sources(custom_build, tmp_path):
    """Two optimizer steps of the tiny config (all losses, both IAMs) on the
    shards: COCO sits in the detection IAM's domains, the crops in the re-ID
    IAM's, and the losses are finite."""
    import yaml

    _, shards, _ = custom_build
    run = tmp_path / "run"
    _run("-m", "hybridps.pretrain", "--config", ROOT / "pretrain/configs/tiny.yaml", "--shards", shards, "--out", run,
         "--max-steps", 2, "train.progress=false", "train.log_with=null", timeout=400)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["hybrid"]["det_domains"], cfg["hybrid"]["reid_domains"]) == ([0, 1], [2, 3])
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [1, 2]
    assert all(math.isfinite(h["loss"]) and "loss_det_img" in h["terms"] and "loss_reid_img" in h["terms"]
               for h in hist)
    assert json.loads((run / "meta.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------- hostile inputs (the real build)
def _build(out: Path, name: str, root: Path, *extra) -> int:
    from hybridps.data_prep import cli

    return cli.main(["build", str(out), "--source", f"{name}={root}", "--quiet", "--workers", "1", *map(str, extra)])


def _skipped(out: Path, name: str) -> dict:
    from hybridps.data_prep.manifest import load_manifest

    return load_manifest(out)["datasets"][name]["splits"]["train"]["skipped"]


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e30", "1e400", "10**400"])
def test_coco_non_finite_box_dropped_by_the_shared_record_check(coco_copy, tmp_path, value):
    import numpy as np

    from hybridps.data_prep.manifest import load_manifest, shard_paths
    from hybridps.data_prep.preview import read_samples

    root = _copy(coco_copy[0], tmp_path)
    path = _instances(root)
    base = tmp_path / "base"
    assert _build(base, "coco", root) == 0
    text = path.read_text()
    doc = json.loads(text)
    size = {i["id"]: (i["width"], i["height"]) for i in doc["images"] if isinstance(i, dict)}

    def inside(a):            # a person box the parser keeps as it is (no clipping)
        x, y, w, h = a["bbox"]
        return a["image_id"] in size and 0 <= x and 0 <= y and x + w <= size[a["image_id"]][0] \
            and y + h <= size[a["image_id"]][1] and w > 1 and h > 1
    ann = next(a for a in sorted(doc["annotations"], key=lambda a: a["id"])
               if a["category_id"] == 7 and a.get("iscrowd") == 0 and len(a["bbox"]) == 4 and inside(a))
    huge = {"1e30": 1e30, "10**400": 10 ** 400}       # 1e400 is read back as inf; 10**400 is an int literal
    ann["bbox"] = [5.0, 5.0, huge[value], 40.0] if value in huge else [float(value), 5.0, 20.0, 40.0]
    path.write_text(json.dumps(doc))                 # json writes NaN / Infinity literals, as some exporters do
    out = tmp_path / "out"
    assert _build(out, "coco", root) == 0
    got, was = _skipped(out, "coco"), _skipped(base, "coco")
    assert got.get("non_finite_box") == 1 and {k: v for k, v in got.items() if k != "non_finite_box"} == was
    fixed = lambda o: load_manifest(o)["datasets"]["coco"]["splits"]["train"]["fixed"]   # noqa: E731
    assert fixed(out) == fixed(base)                 # no spurious "box_clipped" for the dropped box
    for p in shard_paths(load_manifest(out), out):
        for s in read_samples(p):
            boxes = np.asarray(json.loads(s["json"])["boxes"], np.float64)
            assert np.isfinite(boxes).all() and np.abs(boxes).max() <= 1e6


def test_coco_bad_json_is_exit_2_one_line(coco_copy, tmp_path, capsys):
    root = _copy(coco_copy[0], tmp_path)
    path = _instances(root)
    path.write_bytes(path.read_bytes()[: 500])        # cut short, as after an interrupted download
    assert _build(tmp_path / "out", "coco", root) == 2
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if "error" in line]     # the planning log precedes it
    assert "Traceback" not in err and len(errors) == 1 and errors[0] == err.splitlines()[-1]
    assert "not valid JSON" in errors[0] and path.name in errors[0]


def test_coco_wrong_types_cost_one_entry(coco_copy, tmp_path):
    root = _copy(coco_copy[0], tmp_path)
    path = _instances(root)
    doc = json.loads(path.read_text())
    base = tmp_path / "base"
    assert _build(base, "coco", root) == 0
    doc["annotations"] += [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [1, 1, "wide", 40]},
        {"id": 2, "image_id": [1], "category_id": 7, "bbox": [1, 1, 20, 40]},
        {"id": 3, "image_id": 1, "category_id": {"name": "person"}, "bbox": [1, 1, 20, 40]},
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [1, 1, True, 40]},
        "not an object",
    ]
    doc["images"].append({"id": 777, "file_name": "/etc/passwd", "width": 1, "height": 1})
    path.write_text(json.dumps(doc))
    assert _build(tmp_path / "out", "coco", root) == 0
    got, was = _skipped(tmp_path / "out", "coco"), _skipped(base, "coco")
    assert got["malformed_annotation"] == was["malformed_annotation"] + 6
    assert {k: v for k, v in got.items() if k != "malformed_annotation"} == {
        k: v for k, v in was.items() if k != "malformed_annotation"}


def test_crops_bomb_and_unreadable_crop_are_counted(crops_copy, tmp_path):
    import struct
    import zlib

    def png_claiming(w, h):
        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))

    root = _copy(crops_copy[0], tmp_path)
    base = tmp_path / "base"
    assert _build(base, "crops", root) == 0
    (root / "alice" / "bomb.png").write_bytes(png_claiming(60000, 60000))
    expect = {**_skipped(base, "crops"), "too_large_image": 1}
    if os.geteuid() != 0:                           # root reads files whatever their mode
        victim = sorted((root / "alice").glob("0*.jpg"))[0]
        victim.chmod(0)
        expect["unreadable_file"] = 1
    assert _build(tmp_path / "out", "crops", root) == 0
    assert _skipped(tmp_path / "out", "crops") == expect
