"""data_prep build on the real synthetic copies, read back with stock webdataset.

The synthetic world (all formats that have a writer) is written once per test
session; one full build of every format's default split is shared by the
read-only checks.  Builds that need other arguments use two small datasets.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hybridps.data_prep import cli, imageio
from hybridps.data_prep.formats import FORMATS, get_format
from hybridps.data_prep.manifest import load_manifest, shard_paths
from hybridps.data_prep.preview import read_samples
from hybridps.data_prep.record import Record
from hybridps.data_prep.synth import write_world, writer_module

REPO = Path(__file__).resolve().parents[1]


def available_formats() -> list[str]:
    return [n for n in FORMATS if writer_module(n) is not None]


def synth_world(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny synthetic world, shared by every test module of the session."""
    root = tmp_path_factory.getbasetemp() / "synth_world_tiny_s0"
    done = root / "synth_truth.json"
    if not done.exists():
        write_world(root, seed=0, size="tiny", only=available_formats())
    return root, json.loads(done.read_text())


def run_cli(*argv) -> int:
    return cli.main([str(a) for a in argv])


def sources(world: Path, names) -> list[str]:
    out = []
    for n in names:
        out += ["--source", f"{n}={world / n}"]
    return out


def tree_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.tar"))}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synth_world(tmp_path_factory)


@pytest.fixture(scope="module")
def full_build(world, tmp_path_factory):
    """Every available format, default splits, shard size 7, two workers."""
    root, truth = world
    out = tmp_path_factory.mktemp("full_build")
    names = list(truth)
    assert run_cli("build", out, *sources(root, names), "--shard-size", 7, "--workers", 2, "--quiet") == 0
    return out, load_manifest(out), truth


def all_samples(out: Path, manifest: dict) -> dict[str, list[dict]]:
    by_ds = defaultdict(list)
    for p in shard_paths(manifest, out):
        for s in read_samples(p):
            s["meta"] = json.loads(s["json"])
            by_ds[s["meta"]["dataset"]].append(s)
    return by_ds


# --------------------------------------------------------------------------- read back
def test_every_listed_format_built(full_build):
    out, m, truth = full_build
    assert m["domains"] == list(truth)
    assert len(truth) == len(FORMATS), f"synthetic writers missing for: {set(FORMATS) - set(truth)}"
    for name in truth:
        assert sum(e["samples"] for e in m["datasets"][name]["splits"].values()) > 0, name


def test_stock_webdataset_reads_every_sample(full_build):
    import webdataset as wds

    out, m, _ = full_build
    urls = [str(p) for p in shard_paths(m, out)]
    ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("rgb")
    seen = []
    for s in ds:
        meta = s["json"]
        assert s["__key__"] == f"{meta['dataset']}-{meta['split']}-" + s["__key__"].split("-", 2)[2]
        assert s["jpg"].shape == (meta["height"], meta["width"], 3)
        assert len(meta["boxes"]) == len(meta["pids"]) == len(meta["local_ids"]) > 0
        assert set(meta) == {"dataset", "split", "domain", "task", "labeled", "width", "height", "boxes",
                             "pids", "local_ids", "ignore", "camera", "source", "canvas"}
        assert meta["domain"] == m["domains"].index(meta["dataset"])
        seen.append(s["__key__"])
    total = sum(e["samples"] for d in m["datasets"].values() for e in d["splits"].values())
    assert len(seen) == len(set(seen)) == total


def test_tar_tf_lists_jpg_json_pairs(full_build):
    out, m, _ = full_build
    for p in shard_paths(m, out):
        names = subprocess.run(["tar", "tf", str(p)], check=True, capture_output=True, text=True).stdout.split()
        entry = next(s for d in m["datasets"].values() for e in d["splits"].values() for s in e["shards"]
                     if out / s["path"] == p)
        assert len(names) == 2 * entry["samples"]
        assert [n.rsplit(".", 1)[1] for n in names] == ["jpg", "json"] * entry["samples"]
        assert not list(p.parent.glob("*.tmp"))


def test_shard_hashes_and_sizes_in_manifest(full_build):
    import hashlib

    out, m, _ = full_build
    for d in m["datasets"].values():
        for e in d["splits"].values():
            assert sum(s["samples"] for s in e["shards"]) == e["samples"]
            assert all(s["samples"] <= 7 for s in e["shards"])
            for s in e["shards"]:
                assert hashlib.sha256((out / s["path"]).read_bytes()).hexdigest() == s["sha256"]


# --------------------------------------------------------------------------- counts vs truth
def merged(*counters):
    out = defaultdict(int)
    for c in counters:
        for k, v in c.items():
            out[k] += v
    return {k: v for k, v in out.items() if v}


def test_manifest_counts_equal_truth(full_build):
    out, m, truth = full_build
    for name, t in truth.items():
        for split, e in m["datasets"][name]["splits"].items():
            ts = t["splits"][split]
            dropped = ts.get("builder_skipped", {})
            assert e["records"] == len(ts["records"]), (name, split)
            assert e["samples"] == len(ts["records"]) - sum(dropped.values()), (name, split)
            assert e["skipped"] == merged(ts["skipped"], dropped), (name, split)
            assert {k: v for k, v in e["fixed"].items() if v} == merged(ts.get("fixed", {})), (name, split)
            kept = {k: r for k, r in ts["records"].items()
                    if k not in {x for keys in ts.get("builder_skipped_keys", {}).values() for x in keys}}
            assert e["boxes"] == sum(len(r["boxes"]) for r in kept.values()), (name, split)


def test_sample_annotations_equal_truth(full_build):
    out, m, truth = full_build
    for name, samples in all_samples(out, m).items():
        for s in samples:
            meta = s["meta"]
            rec = truth[name]["splits"][meta["split"]]["records"][s["__key__"].split("-", 2)[2]]
            np.testing.assert_allclose(meta["boxes"], rec["boxes"], atol=1e-3, err_msg=s["__key__"])
            assert meta["local_ids"] == rec["ids"], s["__key__"]
            np.testing.assert_allclose(np.reshape(meta["ignore"], (-1, 4)), np.reshape(rec["ignore"], (-1, 4)),
                                       atol=1e-3)
            assert (meta["width"], meta["height"]) == (rec["width"], rec["height"])
            assert meta["canvas"] is None


# --------------------------------------------------------------------------- identities
def test_global_identity_space(full_build):
    out, m, _ = full_build
    samples = all_samples(out, m)
    blocks = sorted((d["id_range"], name) for name, d in m["datasets"].items())
    assert blocks[0][0][0] == 0 and blocks[-1][0][1] == m["num_ids"]
    for (a, _), (b, _) in zip(blocks, blocks[1:]):
        assert a[1] == b[0], "id blocks must tile [0, num_ids) without overlap or gap"
    assert m["num_ids"] == sum(d["num_labeled_ids"] + d["num_pseudo_ids"] for d in m["datasets"].values())

    for name, d in m["datasets"].items():
        lo, hi = d["id_range"]
        pairs = [(l, g) for s in samples[name] for l, g in zip(s["meta"]["local_ids"], s["meta"]["pids"])]
        task = d["task"]
        assert all(lo <= g < hi for _, g in pairs if g >= 0), name
        if task == "det" or (task == "reid" and not d["labeled"]):
            gids = [g for _, g in pairs]
            assert min(gids) >= lo and len(gids) == len(set(gids)), f"{name}: pseudo ids must be unique"
            if task == "reid":
                assert all(len(s["meta"]["pids"]) == 1 for s in samples[name])
        else:
            labeled = {(l, g) for l, g in pairs if l >= 0}
            local_to_global = dict(labeled)
            assert len(local_to_global) == len(labeled), f"{name}: one local id -> several global ids"
            assert len(set(local_to_global.values())) == len(local_to_global), f"{name}: ids merged"
            ordered = [local_to_global[k] for k in sorted(local_to_global)]
            assert ordered == list(range(lo, lo + len(ordered))), f"{name}: labeled ids not a sorted block"
            assert d["num_labeled_ids"] == len(ordered) + (d["unused_ids"] if d["num_pseudo_ids"] == 0 else 0)
            if task == "ps":
                assert all(g == -1 for l, g in pairs if l < 0), f"{name}: unlabeled ps boxes must be -1"


def test_assign_build_rules():
    from hybridps.data_prep.identity import assign_build
    from hybridps.data_prep.record import ImageRef

    def rec(task, labeled, ids, key):
        return Record("d", "train", key, ImageRef("file", "x"), task, labeled, [[0, 0, 1, 1]] * len(ids), ids)

    det = [rec("det", False, [-1, -1], "a"), rec("det", False, [-1], "b")]
    reid = [rec("reid", True, [42], "a"), rec("reid", True, [7], "b"), rec("reid", True, [42], "c"),
            rec("reid", True, [-1], "d")]
    ps = [rec("ps", True, [5, -1], "a"), rec("ps", True, [3, 5], "b")]
    unl = [rec("reid", False, [-1], "a"), rec("reid", False, [-1], "b")]
    blocks, pids, num = assign_build([("det", det), ("reid", reid), ("ps", ps), ("unl", unl)])
    assert pids[0] == [[0, 1], [2]]
    assert pids[1] == [[4], [3], [4], [5]]            # sorted labels 7, 42 -> 3, 4; a -1 crop gets a pseudo id
    assert pids[2] == [[7, -1], [6, 7]]               # labels 3, 5 -> 6, 7; unlabeled stays -1
    assert pids[3] == [[8], [9]]
    assert [(b.lo, b.hi, b.num_labeled, b.num_pseudo) for b in blocks] == [
        (0, 3, 0, 3), (3, 6, 2, 1), (6, 8, 2, 0), (8, 10, 0, 2)]
    assert num == 10


def test_unused_ids_count_dropped_records(full_build):
    out, m, truth = full_build
    for name, d in m["datasets"].items():
        if d["task"] != "det":
            continue
        # det: every box of a record dropped at the image stage leaves its pseudo id unused
        t = truth[name]["splits"]["train"]
        dropped = {k for keys in t.get("builder_skipped_keys", {}).values() for k in keys}
        assert d["unused_ids"] == sum(len(t["records"][k]["boxes"]) for k in dropped), name


# --------------------------------------------------------------------------- pixels
def _records(name: str, root: Path, split: str = "train") -> dict[str, Record]:
    return {r.key: r for r in get_format(name).parse(root / name, split) if isinstance(r, Record)}


@pytest.mark.parametrize("name", ["market1501", "crowdhuman", "msmt17", "luperson", "prw"])
def test_jpeg_passes_through_byte_identical(full_build, world, name):
    out, m, _ = full_build
    recs = _records(name, world[0])
    samples = all_samples(out, m)[name]
    assert samples
    for s in samples:
        payload, fmt = imageio.load_encoded(recs[s["__key__"].split("-", 2)[2]].image)
        assert fmt == "jpeg" and s["jpg"] == payload


def test_png_and_raw_are_encoded_to_jpeg(full_build, world):
    out, m, _ = full_build
    by_ds = all_samples(out, m)
    for name in ("ecp", "cuhk03"):
        recs = _records(name, world[0])
        assert by_ds[name]
        for s in by_ds[name]:
            payload, fmt = imageio.load_encoded(recs[s["__key__"].split("-", 2)[2]].image)
            assert fmt in ("png", "raw"), name
            src = imageio.decode_rgb(payload, fmt)
            assert s["jpg"][:2] == b"\xff\xd8"
            assert s["jpg"] == imageio.encode_jpeg(src, 95), f"{name}: not the source encoded at quality 95"
            got = np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).astype(float)
            assert got.shape == src.shape
            assert np.abs(got - src).mean() < 8.0, f"{name}: re-encoded JPEG too far from the source"


# --------------------------------------------------------------------------- bad inputs
@pytest.fixture
def broken_market(world, tmp_path):
    """A Market-1501 copy with one truncated and one garbage JPEG."""
    src = world[0] / "market1501"
    dst = tmp_path / "market1501"
    shutil.copytree(src, dst)
    jpgs = sorted(dst.rglob("bounding_box_train/*.jpg"))
    data = jpgs[3].read_bytes()
    jpgs[3].write_bytes(data[: len(data) // 2])
    return dst, jpgs[3]


def test_truncated_jpeg_counted_not_fatal(broken_market, tmp_path):
    root, bad = broken_market
    out = tmp_path / "out"
    assert run_cli("build", out, "--source", f"market1501={root}", "--workers", 1, "--quiet") == 0
    e = load_manifest(out)["datasets"]["market1501"]["splits"]["train"]
    assert e["skipped"] == {"corrupt_image": 1}
    assert e["samples"] == e["records"] - 1


def test_strict_fails_on_image_skip(broken_market, tmp_path, capsys):
    root, bad = broken_market
    out = tmp_path / "out"
    assert run_cli("build", out, "--source", f"market1501={root}", "--strict", "--quiet", "--shard-size", 2) == 2
    err = capsys.readouterr().err
    assert "market1501/train" in err and "corrupt_image" in err and bad.name in err
    assert "Traceback" not in err
    assert not list(out.rglob("*.tmp")) and not (out / "manifest.json").exists()


def test_strict_fails_on_parser_skip(world, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli("build", out, *sources(world[0], ["crowdhuman"]), "--strict", "--quiet") == 2
    err = capsys.readouterr().err
    assert "--strict: crowdhuman/train:" in err and "annotation_train.odgt" in err
    assert "Traceback" not in err


def test_header_size_disagreeing_with_annotation_clips_and_counts_fix(world, tmp_path):
    root = tmp_path / "ecp"
    shutil.copytree(world[0] / "ecp", root)
    label = sorted(root.glob("day/labels/train/berlin/*.json"))[0]
    doc = json.loads(label.read_text())
    w, h = doc["imagewidth"], doc["imageheight"]
    doc["imagewidth"], doc["imageheight"] = 2 * w, 2 * h          # the annotation lies about the size
    ped = next(c for c in doc["children"] if c["identity"] == "pedestrian")
    ped["x0"], ped["x1"] = w - 10.0, w + 40.0                     # inside the claimed frame, not the real one
    label.write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert run_cli("build", out, "--source", f"ecp={root}", "--quiet", "--workers", 1) == 0
    m = load_manifest(out)
    assert m["datasets"]["ecp"]["splits"]["train"]["fixed"].get("image_size_mismatch") == 1
    key = f"ecp-train-day_berlin_{label.stem}"
    sample = next(s for p in shard_paths(m, out) for s in read_samples(p) if s["__key__"] == key)
    meta = json.loads(sample["json"])
    assert (meta["width"], meta["height"]) == (w, h)
    assert [w - 10.0, w] in [[b[0], b[2]] for b in meta["boxes"]]
    assert all(b[2] <= w and b[3] <= h for b in meta["boxes"])


def test_encode_job_counts_unreadable_images(tmp_path):
    from hybridps.data_prep.build.encode import Dropped, EncodeSettings, Job, Sample, encode_job
    from hybridps.data_prep.record import ImageRef

    good = np.zeros((20, 10, 3), np.uint8)
    png = io.BytesIO()
    Image.fromarray(good).save(png, format="PNG")
    files = {"ok.png": png.getvalue(), "cut.png": png.getvalue()[:40], "text.jpg": b"hello world"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    def run(name):
        rec = Record("d", "train", name.replace(".", "_"), ImageRef("file", str(tmp_path / name)), "reid", False,
                     [[0, 0, 10, 20]], [-1], source=name)
        return encode_job(Job(0, 0, rec, [5]), EncodeSettings())

    ok = run("ok.png")
    assert isinstance(ok, Sample) and ok.jpg[:2] == b"\xff\xd8" and json.loads(ok.meta)["pids"] == [5]
    for name, reason in (("missing.jpg", "missing_file"), ("cut.png", "corrupt_image"), ("text.jpg", "corrupt_image")):
        res = run(name)
        assert isinstance(res, Dropped) and res.reason == reason and res.source == name, (name, res)


# --------------------------------------------------------------------------- resume
RESUME_ARGS = ["--shard-size", 3, "--quiet"]


def _build_cmd(out, world, extra=()):
    return [sys.executable, "-m", "hybridps.data_prep", "build", str(out), *sources(world, ["market1501", "crowdhuman"]),
            *[str(a) for a in RESUME_ARGS], *map(str, extra)]


def test_killed_build_resumes_byte_identical(world, tmp_path):
    ref = tmp_path / "ref"
    assert run_cli("build", ref, *sources(world[0], ["market1501", "crowdhuman"]), *RESUME_ARGS, "--workers", 1) == 0

    out = tmp_path / "killed"
    log = tmp_path / "stderr.txt"
    env = {**os.environ, "HYBRIDPS_BUILD_STALL_AFTER": "5"}
    with open(log, "w") as f:
        proc = subprocess.Popen(_build_cmd(out, world[0], ["--workers", 2]), stderr=f, stdout=subprocess.DEVNULL,
                                cwd=REPO, env=env)
    try:
        deadline = time.time() + 120
        while "stalled after 5 samples" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "build never reached the stall point"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Killed mid-shard: one finished shard, the second only as .tmp, no manifest.
    assert (out / "market1501/train-000000.tar").exists()
    assert (out / "market1501/train-000001.tar.tmp").exists()
    assert not (out / "market1501/train-000001.tar").exists() and not (out / "manifest.json").exists()

    assert run_cli("build", out, *sources(world[0], ["market1501", "crowdhuman"]), *RESUME_ARGS, "--workers", 1) == 0
    assert tree_bytes(out) == tree_bytes(ref)
    assert not list(out.rglob("*.tmp"))
    assert load_manifest(out) == load_manifest(ref)

    # A damaged finished shard is detected (sha256) and rewritten identically.
    victim = out / "market1501/train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    assert run_cli("build", out, *sources(world[0], ["market1501", "crowdhuman"]), *RESUME_ARGS, "--workers", 2) == 0
    assert tree_bytes(out) == tree_bytes(ref)


def test_rerun_with_other_arguments_refuses_unless_overwrite(world, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["build", out, *sources(world[0], ["market1501"]), "--quiet", "--workers", 1]
    assert run_cli(*args, "--shard-size", 5) == 0
    assert run_cli(*args, "--shard-size", 5) == 0                      # same arguments: verified, no-op
    assert run_cli(*args, "--shard-size", 4) == 2
    err = capsys.readouterr().err
    assert "different arguments" in err and "shard_size" in err and "--overwrite" in err
    assert len(list((out / "market1501").glob("*.tar"))) == 4         # untouched (20 samples / 5)
    assert run_cli(*args, "--shard-size", 4, "--overwrite") == 0
    assert len(list((out / "market1501").glob("*.tar"))) == 5
    assert load_manifest(out)["options"]["shard_size"] == 4


def test_refuses_non_build_directory(world, tmp_path, capsys):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet") == 2
    assert "not empty" in capsys.readouterr().err
    assert run_cli("build", out, *sources(world[0], ["market1501"]), "--quiet", "--overwrite") == 0
    assert (out / "notes.txt").read_text() == "mine"


def test_workers_do_not_change_bytes(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    names = ["ecp", "cuhk03", "crowdhuman"]
    assert run_cli("build", a, *sources(world[0], names), "--shard-size", 4, "--workers", 1, "--quiet") == 0
    assert run_cli("build", b, *sources(world[0], names), "--shard-size", 4, "--workers", 2, "--quiet") == 0
    assert tree_bytes(a) == tree_bytes(b) and tree_bytes(a)


# --------------------------------------------------------------------------- limit / canvas
def test_limit_is_seeded_and_saved(world, tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert run_cli("build", out, *sources(world[0], ["luperson", "market1501"]), "--limit", "luperson=5",
                       "--limit", "market1501=7", "--seed", 3, "--quiet") == 0
        runs.append(out)
    keys = [(r / "luperson/subset_keys.txt").read_text() for r in runs]
    assert keys[0] == keys[1] and len(keys[0].split()) == 5
    m = load_manifest(runs[0])
    e = m["datasets"]["luperson"]["splits"]["train"]
    assert e["subset"] == {"n": 5, "seed": 3, "count": 5, "keys_file": "luperson/subset_keys.txt"}
    assert e["samples"] == 5 and m["datasets"]["market1501"]["splits"]["train"]["samples"] == 7
    written = sorted(s["__key__"].split("-", 2)[2] for p in shard_paths(m, runs[0], ["luperson"]) for s in read_samples(p))
    assert written == sorted(keys[0].split())
    other = tmp_path / "c"
    assert run_cli("build", other, *sources(world[0], ["luperson"]), "--limit", "luperson=5", "--seed", 4, "--quiet") == 0
    assert (other / "luperson/subset_keys.txt").read_text() != keys[0]


@pytest.mark.parametrize("mode", ["expand_resize", "random_paste"])
def test_canvas_baked_for_reid_only(world, tmp_path, mode):
    plain, baked = tmp_path / "plain", tmp_path / "baked"
    names = ["market1501", "crowdhuman"]
    assert run_cli("build", plain, *sources(world[0], names), "--quiet") == 0
    assert run_cli("build", baked, *sources(world[0], names), "--quiet", "--canvas", mode, "--canvas-size", "96x160") == 0
    m = load_manifest(baked)
    assert m["options"]["canvas"]["mode"] == mode
    s_plain, s_baked = all_samples(plain, load_manifest(plain)), all_samples(baked, m)
    for a, b in zip(s_plain["crowdhuman"], s_baked["crowdhuman"]):
        assert a["jpg"] == b["jpg"] and a["json"] == b["json"]          # det untouched
    for a, b in zip(s_plain["market1501"], s_baked["market1501"]):
        meta = b["meta"]
        assert (meta["width"], meta["height"]) == (96, 160) and meta["canvas"]["mode"] == mode
        x0, y0, x1, y1 = meta["boxes"][0]
        assert meta["boxes"][0] == list(map(float, meta["canvas"]["region"]))
        assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 160
        assert meta["pids"] == a["meta"]["pids"]
        img = np.asarray(Image.open(io.BytesIO(b["jpg"])).convert("RGB"))
        assert img.shape == (160, 96, 3)


def test_identity_spaces_keep_split_label_spaces_apart():
    """MSMT17 query/gallery labels restart at 0 for other people: building
    train+query must not merge them with train identities."""
    from hybridps.data_prep.identity import assign_build
    from hybridps.data_prep.record import ImageRef, Record

    def rec(split, key, pid):
        return Record("msmt17", split, key, ImageRef("file", "x.jpg"), "reid", True, [[0, 0, 8, 16]], [pid])

    records = [rec("train", "a", 0), rec("val", "b", 0), rec("query", "c", 0), rec("gallery", "d", 0)]
    spaces = {"train": "train", "val": "train", "query": "test", "gallery": "test"}
    blocks, pids, num_ids = assign_build([("msmt17", records, spaces)])
    assert [p[0] for p in pids[0]] == [1, 1, 0, 0]  # ("test", 0) sorts before ("train", 0)
    assert num_ids == 2 and blocks[0].num_labeled == 2
    _, pids_single, n_single = assign_build([("msmt17", records)])  # no spaces: each split its own
    assert n_single == 4 and len({p[0] for p in pids_single[0]}) == 4
