"""The streaming build: records spilled to disk, ids drawn while streaming, the
append-only progress journal, and resume on top of it.

(Peak memory at 10^4..10^6 records is measured by benchmarks/build_scale.py,
not here.)"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hybridps.data_prep.build import BuildOptions
from hybridps.data_prep.build import spill as spill_mod
from hybridps.data_prep.build.plan import plan_build, resolve_splits
from hybridps.data_prep.build.shards import JOURNAL_NAME, Journal
from hybridps.data_prep.build.spill import RecordSpill, dump_record, load_record
from hybridps.data_prep.formats import get_format
from hybridps.data_prep.identity import assign_build
from hybridps.data_prep.manifest import load_manifest
from hybridps.data_prep.record import ImageRef, Record

from test_build import REPO, run_cli, sources, synth_world, tree_bytes

ARGS = ["--shard-size", 3, "--quiet"]
NAMES = ["market1501"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return synth_world(tmp_path_factory)


def _journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


def test_spill_round_trips_records_and_drops_later_duplicates(tmp_path, monkeypatch):
    import numpy as np

    recs = [Record("d", "train", k, ImageRef("lmdb", "/x", k), "reid", True, [[0.0, 0.0, 4.0, 8.0]],
                   [int(np.int64(i))], camera=np.int64(3), source=f"s{i}", extra={"time": "day"})
            for i, k in enumerate(["a", "b", "a", "c", "b", "a"])]
    # every key hashes the same: a hash match alone must never drop a record
    monkeypatch.setattr(spill_mod, "_key_hash", lambda key: 7)
    sp = RecordSpill(tmp_path)
    for r in recs:
        sp.append(r)
    assert list(sp.records())[2] == load_record(dump_record(recs[2]))
    dropped = sp.drop_duplicate_keys()
    assert [(r.key, r.source) for r in dropped] == [("a", "s2"), ("b", "s4"), ("a", "s5")]
    kept = list(sp.records())
    assert [(r.key, r.source) for r in kept] == [("a", "s0"), ("b", "s1"), ("c", "s3")] and len(sp) == 3
    assert kept[0].camera == 3 and kept[0].boxes == [[0.0, 0.0, 4.0, 8.0]] and kept[0].image == recs[0].image
    assert not list(tmp_path.iterdir())          # anonymous file: nothing left to clean up
    sp.close()


def test_streamed_ids_equal_assign_build(world, tmp_path):
    """Ids drawn split by split while streaming = the whole-build allocation."""
    root = world[0]
    names = ["msmt17", "prw", "crowdhuman", "market1501"]
    opts = BuildOptions(out_dir=tmp_path, sources=[(n, root / n) for n in names],
                        splits={"msmt17": tuple(get_format("msmt17").SPLITS)})
    datasets, num_ids = plan_build(opts, resolve_splits(opts), log=lambda _m: None)
    try:
        blocks, pids, ref_num = assign_build(
            [(ds.name, [r for sp in ds.splits for r in sp.spill.records()], getattr(ds.module, "ID_SPACES", {}))
             for ds in datasets])
        assert num_ids == ref_num
        for ds, block, ref in zip(datasets, blocks, pids):
            assert (ds.block.lo, ds.block.hi, ds.block.num_labeled) == (block.lo, block.hi, block.num_labeled)
            streamed = [p for sp in ds.splits for _, _, p in sp.items()]
            assert streamed == ref and streamed, ds.name
            # resuming mid-split sees the same ids as streaming from the start
            sp = ds.splits[-1]
            assert [p for _, _, p in sp.items(sp.n // 2)] == [p for _, _, p in sp.items()][sp.n // 2:]
    finally:
        for ds in datasets:
            ds.close()


def test_journal_is_appended_per_shard(world, tmp_path):
    out = tmp_path / "out"
    assert run_cli("build", out, *sources(world[0], ["market1501"]), *ARGS, "--workers", 1) == 0
    lines = _journal_lines(out / "market1501" / JOURNAL_NAME)
    n_shards = len(load_manifest(out)["datasets"]["market1501"]["splits"]["train"]["shards"])
    assert n_shards > 3
    assert "fingerprint" in lines[0] and lines[1]["plan"] and lines[1]["keep"] == 0
    assert [l["shard"]["path"] for l in lines[2:-1]] == [f"market1501/train-{i:06d}.tar" for i in range(n_shards)]
    assert lines[-1] == {"split": "train", "done": True, "tail": None}
    before = (out / "market1501" / JOURNAL_NAME).read_bytes()
    assert run_cli("build", out, *sources(world[0], ["market1501"]), *ARGS, "--workers", 1) == 0   # verified no-op
    assert (out / "market1501" / JOURNAL_NAME).read_bytes() == before


def test_killed_build_resumes_on_the_appended_journal(world, tmp_path):
    ref = tmp_path / "ref"
    assert run_cli("build", ref, *sources(world[0], NAMES), *ARGS, "--workers", 1) == 0

    out = tmp_path / "killed"
    log = tmp_path / "stderr.txt"
    cmd = [sys.executable, "-m", "hybridps.data_prep", "build", str(out), *sources(world[0], NAMES), *map(str, ARGS),
           "--workers", "2"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stderr=f, stdout=subprocess.DEVNULL, cwd=REPO,
                                env={**os.environ, "HYBRIDPS_BUILD_STALL_AFTER": "8"})
    try:
        deadline = time.time() + 120
        while "stalled after 8 samples" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, "build never reached the stall point"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    journal = out / "market1501" / JOURNAL_NAME
    killed = journal.read_bytes()
    assert [l.get("shard", {}).get("path") for l in _journal_lines(journal)[2:]] == \
        ["market1501/train-000000.tar", "market1501/train-000001.tar"]
    # a crash mid-append leaves a torn last line: it is cut off, not appended after
    journal.write_bytes(killed + b'{"split": "train", "shard": {"pa')

    assert run_cli("build", out, *sources(world[0], NAMES), *ARGS, "--workers", 1) == 0
    assert tree_bytes(out) == tree_bytes(ref) and load_manifest(out) == load_manifest(ref)
    final = journal.read_bytes()
    assert final.startswith(killed) and b'"pa\n' not in final and b'{"pa' not in final
    lines = _journal_lines(journal)
    assert lines[-1]["done"] is True and sum("shard" in l for l in lines) == 7       # 20 crops / 3
    assert Journal.load(journal, lines[0]["fingerprint"]).splits["train"].done


def test_luperson_lmdb_entries_stream_in_key_order_first_duplicate_wins(tmp_path):
    import io
    import pickle

    import lmdb
    from PIL import Image

    from hybridps.data_prep.formats import luperson
    from hybridps.data_prep.record import Skip

    root = tmp_path / "LUP"
    (root / "lmdb").mkdir(parents=True)
    keys = ["b", "a,1", "a_1", "c", "b"]          # "a,1" and "a_1" share the record key a_1
    env = lmdb.open(str(root / "lmdb"), map_size=1 << 24)
    with env.begin(write=True) as txn:
        for i, k in enumerate(dict.fromkeys(keys)):
            buf = io.BytesIO()
            Image.new("RGB", (8 + i, 16)).save(buf, format="JPEG")
            txn.put(k.encode(), buf.getvalue())
    env.close()
    (root / "keys.pkl").write_bytes(pickle.dumps(keys))
    items = list(luperson.parse(root, "train"))
    recs = [i for i in items if isinstance(i, Record)]
    assert [(r.key, r.image.key, r.width) for r in recs] == [("a_1", "a,1", 9), ("b", "b", 8), ("c", "c", 11)]
    assert sorted((s.reason, s.source) for s in items if isinstance(s, Skip)) == [
        ("duplicate_key", "lmdb:a_1"), ("duplicate_key", "lmdb:b")]
    assert luperson.list_keys(root) == ["a_1", "b", "c"]


# --------------------------------------------------------------------------- --max-side
def _samples_by_key(out: Path) -> dict[str, dict]:
    from hybridps.data_prep.manifest import shard_paths
    from hybridps.data_prep.preview import read_samples

    got = {}
    for p in shard_paths(load_manifest(out), out):
        for s in read_samples(p):
            s["meta"] = json.loads(s["json"])
            got[s["__key__"]] = s
    return got


def test_max_side_scales_images_and_boxes_and_records_the_scale(world, tmp_path):
    import io

    from PIL import Image

    names = ["crowdhuman", "market1501"]
    full, small = tmp_path / "full", tmp_path / "small"
    assert run_cli("build", full, *sources(world[0], names), "--quiet", "--workers", 1) == 0
    assert run_cli("build", small, *sources(world[0], names), "--quiet", "--workers", 2, "--max-side", 100) == 0
    a, b = _samples_by_key(full), _samples_by_key(small)
    assert set(a) == set(b)
    resized = 0
    for key, s in b.items():
        m, ref = s["meta"], a[key]["meta"]
        with Image.open(io.BytesIO(s["jpg"])) as im:
            assert im.size == (m["width"], m["height"]) and max(im.size) <= 100, key
        r = m["resize"]
        assert r["max_side"] == 100 and r["orig_size"] == [ref["width"], ref["height"]]
        sx, sy = r["scale"]
        assert (sx, sy) == (m["width"] / ref["width"], m["height"] / ref["height"])
        if max(ref["width"], ref["height"]) <= 100:
            assert (sx, sy) == (1.0, 1.0) and s["jpg"] == a[key]["jpg"]     # fits: passed through untouched
            continue
        resized += 1
        assert max(m["width"], m["height"]) == 100 and abs(sx - sy) < 0.02
        assert m["pids"] == ref["pids"] and len(m["boxes"]) == len(ref["boxes"])
        for bb, rb in zip(m["boxes"], ref["boxes"]):
            assert bb == pytest.approx([rb[0] * sx, rb[1] * sy, rb[2] * sx, rb[3] * sy], abs=1e-9)
    assert resized > 0
    assert "resize" not in next(iter(a.values()))["meta"]          # builds without --max-side are unchanged
    assert load_manifest(small)["options"]["max_side"] == 100
    assert "max_side" not in load_manifest(full)["options"]


def test_max_side_bad_values_are_usage_errors(world, tmp_path, capsys):
    src = sources(world[0], ["market1501"])
    assert run_cli("build", tmp_path / "a", *src, "--quiet", "--max-side", 8) == 2
    assert "--max-side must be in 16.." in capsys.readouterr().err
    assert run_cli("build", tmp_path / "b", *src, "--quiet", "--max-side", 100, "--canvas", "expand_resize",
                   "--canvas-size", "64x128") == 2
    assert "larger than --max-side" in capsys.readouterr().err
