"""Hostile files, faults and bad values against ``python -m hybridps.pretrain`` (issue 9).

Every input is made here for real: pickles with a ``__reduce__`` payload that
writes a marker file, shards rewritten with webdataset's TarWriter, JPEGs
whose header claims 11000x11000, a real SIGKILL of a real run between writing
a checkpoint and removing the old one, /dev/full as a file of the run
directory.  Cheap cases call ``pretrain.cli.main`` in this process (the same
code path as the command, minus interpreter start-up); the ones about
processes (kill, signals, exit status) run the command.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from hybridps.pretrain import data as D
from hybridps.pretrain.cli import main
from hybridps.pretrain.config import ConfigError, PretrainConfig, load_config
from hybridps.pretrain.state import COMPLETE, pick_resume, verify
from hybridps.pretrain.validate import RULES, rule_names
from test_pretrain_data import LAYOUT, write_test_build

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pretrain" / "configs" / "tiny.yaml"
PY = sys.executable


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The shard-verification cache of these tests stays in their tmp dir."""
    monkeypatch.setenv("HYBRIDPS_CACHE", str(tmp_path / "vcache"))
    monkeypatch.delenv("HYBRIDPS_DEBUG", raising=False)


def env(tmp: Path, **extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HYBRIDPS_CACHE": str(tmp / "vcache"),
            **extra}


def args(build: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return ["--config", str(TINY), "--shards", str(build), "--out", str(out), "--max-steps", str(steps),
            "train.progress=false", "train.log_with=null", *extra]


def run(tmp: Path, build: Path, out: Path, steps: int, *extra: str, timeout: int = 120, **env_extra):
    return subprocess.run([PY, "-m", "hybridps.pretrain", *args(build, out, steps, *extra)], capture_output=True, text=True,
                          env=env(tmp, **env_extra), timeout=timeout)


def in_process(capsys, build: Path, out: Path, steps: int, *extra: str) -> tuple[int, str]:
    rc = main(args(build, out, steps, *extra))
    return rc, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("hybridps pretrain: error")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("build")
    write_test_build(root)
    return root


@pytest.fixture(scope="module")
def trained(build, tmp_path_factory) -> Path:
    """2 steps, a checkpoint after each: checkpoint_0 (step 1), checkpoint_1 (step 2)."""
    tmp = tmp_path_factory.mktemp("trained")
    out = tmp / "run"
    proc = run(tmp, build, out, 2, "train.save_every=1", "train.total_limit=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- 1. code execution
class Payload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


ACCELERATE_NAMES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "optimizer.bin",
                    "scheduler.bin", "pytorch_model.bin", "scaler.pt", "sampler.bin", "dl_state_dict.bin")
OUR_NAMES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "state.json",
             "rng_0.safetensors", "rng_0.json")


def rehash(ckpt: Path) -> None:
    """What an attacker who can write the folder can also do: list the planted file as complete."""
    record = json.loads((ckpt / COMPLETE).read_text())
    record["files"] = {p.name: {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
                       for p in ckpt.iterdir() if p.name != COMPLETE}
    (ckpt / COMPLETE).write_text(json.dumps(record))


def test_planted_pickles_never_run(trained, build, tmp_path, capsys):
    """A pickle at every file name a checkpoint (ours or accelerate's) can hold,
    plain and with COMPLETE.json re-hashed to list it: --resume refuses (exit 2)
    and the payload never runs."""
    run_dir = copy_run(trained, tmp_path / "run")
    ckpt = run_dir / "checkpoints" / "checkpoint_1"
    marker = tmp_path / "PWNED"
    outcomes = {}
    for name in ACCELERATE_NAMES + OUR_NAMES + (COMPLETE,):
        for consistent in (False, True):
            if consistent and name == COMPLETE:
                continue
            target, backup = ckpt / name, ckpt / f"{name}.orig"
            saved_record = (ckpt / COMPLETE).read_bytes()
            if target.exists():
                os.replace(target, backup)
            torch.save(Payload(marker), target)
            if consistent:
                rehash(ckpt)
            rc, err = in_process(capsys, build, run_dir, 3, "--resume", str(ckpt))
            outcomes[(name, consistent)] = rc
            assert not marker.exists(), f"payload ran from {name}"
            assert rc == 2, (name, consistent, err[-2000:])
            one_line_error(err)
            target.unlink()
            if backup.exists():
                os.replace(backup, target)
            (ckpt / COMPLETE).write_bytes(saved_record)
    assert len(outcomes) == 2 * len(ACCELERATE_NAMES + OUR_NAMES) + 1
    verify(ckpt)                                # restored intact


def test_planted_pickles_in_a_real_resume(trained, build, tmp_path):
    """The command itself, pickles planted in every checkpoint folder, plus a
    folder in accelerate's own layout: exit 2, one line, no payload."""
    run_dir = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "PWNED"
    legacy = run_dir / "checkpoints" / "checkpoint_7"
    legacy.mkdir()
    for ckpt in (run_dir / "checkpoints").iterdir():
        for name in ACCELERATE_NAMES:
            torch.save(Payload(marker), ckpt / name)
    proc = run(tmp_path, build, run_dir, 3, "--resume")
    assert proc.returncode == 2 and not marker.exists(), proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert "no complete checkpoint" in line and "pickle" in line and "unexpected file" in line


# --------------------------------------------------------------------------- 2. data loss
def test_sigkill_between_new_and_old_checkpoint_keeps_a_resumable_one(build, tmp_path, capsys):
    out = tmp_path / "run"
    # total_limit=1: the old checkpoint must survive until the new one is complete
    extra = ("train.save_every=1", "train.total_limit=1")
    proc = run(tmp_path, build, out, 3, *extra, HYBRIDPS_FAULT="checkpoint_written@2")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = out / "checkpoints"
    assert verify(ckpts / "checkpoint_0")["step"] == 1
    assert (ckpts / ".checkpoint_1.partial").is_dir() and not (ckpts / "checkpoint_1").exists()
    rc, err = in_process(capsys, build, out, 3, *extra)                # a fresh run may not overwrite it
    assert rc == 2 and "pass --resume" in one_line_error(err)
    resumed = run(tmp_path, build, out, 3, *extra, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint_0 at step 1" in resumed.stdout + resumed.stderr
    assert [p.name for p in ckpts.iterdir()] == ["checkpoint_2"]        # limit 1, partial cleaned up
    assert [json.loads(ln)["step"] for ln in (out / "history.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert (out / "model.safetensors").is_file()


def test_sigkill_after_rename_resumes_from_the_new_one(build, tmp_path):
    out = tmp_path / "run"
    proc = run(tmp_path, build, out, 3, "train.save_every=1", "train.total_limit=1",
               HYBRIDPS_FAULT="checkpoint_renamed@2")
    assert proc.returncode == -signal.SIGKILL
    assert pick_resume(out, "latest").name == "checkpoint_1"
    assert verify(out / "checkpoints" / "checkpoint_0")["step"] == 1    # not yet pruned, still whole


def test_half_written_and_truncated_checkpoints_fall_back(trained, build, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    half = ckpts / "checkpoint_2"                      # newest, written by a run killed mid-save
    shutil.copytree(ckpts / "checkpoint_1", half)
    (half / COMPLETE).unlink()
    model = ckpts / "checkpoint_1" / "model.safetensors"   # complete, then truncated on disk
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    with open(run_dir / "history.jsonl", "a") as f:      # a killed run's half-written last lines
        f.write('{"step": 3, "loss": 1.2')
    with open(run_dir / "ranks" / "keys_rank0.tsv", "a") as f:
        f.write("3\tdetA-tr")

    rc, err = in_process(capsys, build, run_dir, 3, "--resume", str(ckpts / "checkpoint_1"))
    assert rc == 2 and "truncated" in one_line_error(err)
    proc = run(tmp_path, build, run_dir, 3, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint_0 at step 1" in proc.stdout + proc.stderr
    assert "incomplete" in proc.stderr and "truncated" in proc.stderr and "dropped 1 unreadable" in proc.stderr
    assert [json.loads(ln)["step"] for ln in (run_dir / "history.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_export_files_appear_whole_or_not_at_all(tmp_path):
    from hybridps.pretrain.export import _atomic

    def dies_halfway(p):
        p.write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        _atomic(tmp_path / "model.safetensors", dies_halfway)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- 3. memory bombs
def jpeg_with_header(w: int, h: int) -> bytes:
    """A 16x16 JPEG whose SOF0 header claims w x h (a few hundred bytes)."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
    raw = bytearray(buf.getvalue())
    i = raw.index(b"\xff\xc0")
    raw[i + 5:i + 9] = h.to_bytes(2, "big") + w.to_bytes(2, "big")
    return bytes(raw)


def first_sample(build: Path) -> dict:
    reader = D.ShardReader(D.open_source(shards=str(build)).shards)
    return next(D.read_samples([(0, (0, 0, 0), 1)], reader))


def with_json(sample: dict, **changes) -> dict:
    meta = json.loads(sample["json"])
    meta.update(changes)
    return dict(sample, json=json.dumps(meta).encode())


@pytest.mark.parametrize("side", [11000, 60000])
def test_jpeg_header_bombs_are_refused_before_decoding(build, side):
    bomb = jpeg_with_header(side, side)
    assert len(bomb) < 10_000
    sample = dict(with_json(first_sample(build), width=side, height=side), jpg=bomb)
    t0 = time.perf_counter()
    with pytest.raises(D.DataError, match=r"Mpx|too large") as e:
        list(D.decode_samples([sample]))
    assert time.perf_counter() - t0 < 2 and "train-000000.tar" in str(e.value)
    with pytest.raises(D.DataError, match="json says 96x72"):          # header and json disagree
        list(D.decode_samples([dict(first_sample(build), jpg=jpeg_with_header(200, 100))]))


def rewrite_shard(build: Path, rel: str, mutate, index: int = 0) -> None:
    """Rewrite one shard with sample ``index`` mutated; the manifest gets the new sha256
    (the shard is the build's own, only its content is hostile)."""
    path = build / rel
    with wds.WebDataset(str(path), shardshuffle=False) as ds:
        samples = [{k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")} for s in ds]
    samples[index] = mutate(samples[index])
    with wds.TarWriter(str(path)) as sink:
        for s in samples:
            sink.write(s)
    man = json.loads((build / "manifest.json").read_text())
    for split in man["datasets"][rel.split("/")[0]]["splits"].values():
        for shard in split["shards"]:
            if shard["path"] == rel:
                shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (build / "manifest.json").write_text(json.dumps(man))


def test_bomb_in_a_shard_stops_the_run_with_one_line(build, tmp_path):
    hostile = tmp_path / "b"
    shutil.copytree(build, hostile)
    rewrite_shard(hostile, "detA/train-000000.tar",
                  lambda s: dict(with_json(s, width=11000, height=11000), jpg=jpeg_with_header(11000, 11000)))
    # a DataLoader worker meets it: the error crosses the process boundary and stays one line
    proc = run(tmp_path, hostile, tmp_path / "run", 8, "data.num_workers=1", timeout=120)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "11000x11000" in line and "data.max_pixels" in line and "detA/train-000000.tar" in line


# --------------------------------------------------------------------------- 4. silent wrong output
def test_tampered_shard_is_refused_naming_it(build, tmp_path):
    hostile = tmp_path / "b"
    shutil.copytree(build, hostile)
    shard = hostile / "reidB" / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[3000] ^= 0xFF                                   # same size, one flipped byte of JPEG data
    shard.write_bytes(bytes(raw))
    proc = run(tmp_path, hostile, tmp_path / "run", 2)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "reidB/train-000000.tar" in line and "sha256" in line


def test_shard_checks_size_cache_and_verify_flag(build, tmp_path, capsys):
    hostile = tmp_path / "b"
    shutil.copytree(build, hostile)
    src = D.open_source(shards=str(hostile))
    reader = D.ShardReader(src.shards)
    reader.key(0, 0)                                    # verified once: remembered by path/size/mtime
    cache = json.loads((tmp_path / "vcache" / "verified-shards.json").read_text())
    assert len(cache) == 1
    shard = Path(src.shards[0].url)
    raw = bytearray(shard.read_bytes())
    raw[3000] ^= 0xFF
    shard.write_bytes(bytes(raw))                       # new mtime: the cache entry no longer applies
    with pytest.raises(D.DataError, match="sha256"):
        D.ShardReader(src.shards).key(0, 0)
    os.utime(shard, ns=(0, int(cache_mtime(cache))))     # forge the old mtime: only --verify-shards re-hashes
    D.ShardReader(src.shards).key(0, 0)
    with pytest.raises(D.DataError, match="sha256"):
        D.ShardReader(src.shards, verify=True).key(0, 0)
    rc, err = in_process(capsys, hostile, tmp_path / "run", 1, "--verify-shards")
    assert rc == 2 and "detA/train-000000.tar" in one_line_error(err) and "sha256" in err
    man = json.loads((hostile / "manifest.json").read_text())
    man["datasets"]["reidC"]["splits"]["train"]["shards"][0]["size"] = 12345
    (hostile / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(D.DataError, match="12345"):
        D.ShardReader(D.open_source(shards=str(hostile)).shards).key(3, 0)


def cache_mtime(cache: dict) -> int:
    return int(next(iter(cache)).split("|")[2])


NAN = float("nan")
BAD_JSON = {
    "width as string": ({"width": "96"}, "'width'"),
    "3-value box": ({"boxes": [[1.0, 2.0, 3.0]]}, "'boxes'[0]"),
    "1e30 coordinate": ({"boxes": [[0.0, 0.0, 1e30, 10.0]]}, "'boxes'[0]"),
    "NaN box": ({"boxes": [[NAN, 0.0, 10.0, 10.0]]}, "'boxes'[0]"),
    "box as string": ({"boxes": ["0,0,1,1"]}, "'boxes'[0]"),
    "inf ignore": ({"ignore": [[0.0, 0.0, float("inf"), 1.0]]}, "'ignore'[0]"),
    "pid 2**70": ({"pids": [2 ** 70]}, "'pids'[0]"),
    "pid outside range": ({"pids": [10 ** 6]}, "'pids'[0]"),
    "pid as float": ({"pids": [1.5]}, "'pids'"),
    "pid count": ({"pids": []}, "pids"),
    "domain outside": ({"domain": 7}, "'domain'"),
    "domain of another dataset": ({"domain": 1}, "'domain'"),
    "labeled as string": ({"labeled": "yes"}, "'labeled'"),
    "task unknown": ({"task": "cls"}, "'task'"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON))
def test_hostile_sample_json_is_a_clear_error(build, case):
    changes, key = BAD_JSON[case]
    sample = first_sample(build)
    meta = json.loads(sample["json"])
    if "pids" in changes and changes["pids"]:
        changes = {"pids": changes["pids"] * len(meta["boxes"])}
    with pytest.raises(D.DataError) as e:
        list(D.decode_samples([with_json(sample, **changes)]))
    msg = str(e.value)
    assert key in msg and "detA/train-000000.tar" in msg and "\n" not in msg, msg


def test_json_that_is_not_an_object(build):
    sample = dict(first_sample(build), json=b"[1, 2]")
    with pytest.raises(D.DataError, match="json lacks"):
        list(D.decode_samples([sample]))


def _set(path: list, value):
    def apply(man):
        node = man
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return man
    return apply


SHARD0 = ["datasets", "detA", "splits", "train", "shards", 0]
BAD_MANIFEST = {
    "a list": (lambda man: [man], "JSON object"),
    "num_ids 10**12": (_set(["num_ids"], 10 ** 12), "num_ids"),      # a 10^12-row OIM LUT
    "num_ids as string": (_set(["num_ids"], "20"), "num_ids"),
    "domain swapped": (_set(["datasets", "detA", "domain"], 2), "'domain'"),
    "unknown task": (_set(["datasets", "detA", "task"], "cls"), "'task'"),
    "id_range past num_ids": (_set(["datasets", "reidC", "id_range"], [0, 10 ** 9]), "id_range"),
    "shard path escapes": (_set(SHARD0 + ["path"], "../../etc/passwd"), "'path'"),
    "absolute shard path": (_set(SHARD0 + ["path"], "/etc/passwd"), "'path'"),
    "samples negative": (_set(SHARD0 + ["samples"], -3), "'samples'"),
    "sha256 not hex": (_set(SHARD0 + ["sha256"], "zz"), "'sha256'"),
    "domains not names": (_set(["domains"], [1, 2, 3]), "'domains'"),
    "not json": (None, "not valid JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFEST))
def test_hostile_manifest_is_a_clear_error(build, tmp_path, case):
    mutate, needle = BAD_MANIFEST[case]
    root = tmp_path / "b"
    shutil.copytree(build, root)
    if mutate is None:
        (root / "manifest.json").write_bytes(b"\xff\xfe{not json")
    else:
        (root / "manifest.json").write_text(json.dumps(mutate(json.loads((root / "manifest.json").read_text()))))
    with pytest.raises(D.DataError) as e:
        D.open_source(shards=str(root))
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_diverging_run_stops_without_exporting(build, tmp_path):
    out = tmp_path / "run"
    proc = run(tmp_path, build, out, 8, "train.lr=1e6", "train.warmup_steps=0", "train.save_every=0")
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = one_line_error(proc.stderr)
    assert "non-finite loss" in line and "step " in line and "loss" in line
    assert not (out / "model.safetensors").exists() and not (out / "backbone.safetensors").exists()
    assert not list(out.glob("checkpoints/checkpoint_*"))


@pytest.mark.parametrize("change, key", [
    ("data.batch_size=4", "data.batch_size"),
    ("data.weights={detA: 2, reidB: 1, reidC: 1}", "data.weights"),
    ("model.backbone=shufflenet", "model.backbone"),
    ("model.emb_dim=128", "model.emb_dim"),
])
def test_resume_with_changed_settings_is_refused(trained, build, tmp_path, capsys, change, key):
    run_dir = copy_run(trained, tmp_path / "run")
    rc, err = in_process(capsys, build, run_dir, 3, "--resume", change)
    assert rc == 2 and key in one_line_error(err), err[-2000:]


def test_meta_json_that_is_a_list(trained, build, tmp_path, capsys):
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "meta.json").write_text("[1, 2, 3]")
    rc, err = in_process(capsys, build, run_dir, 3, "--resume")
    assert rc == 2 and "meta.json" in one_line_error(err)


BAD_VALUES = {"model.anchor_sizes": "[0]", "data.min_visible": "2", "hybrid.loss.eta": "-1",
              "hybrid.loss.w_reid": "-0.5", "data.crop_prob": "5", "data.flip_prob": "-1", "train.log_every": "0",
              "data.num_workers": "-1", "train.lr": ".nan", "data.crop_scale": "[0.9, 0.5]",
              "train.total_limit": "0", "model.roi_bg_iou": "0.9", "data.max_pixels": "0"}


def test_every_bad_config_value_is_reported_at_once(capsys, tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [f"{k}={v}" for k, v in BAD_VALUES.items()])
    msg = str(e.value)
    assert f"{len(BAD_VALUES)} bad config values" in msg and "\n" not in msg
    for key in BAD_VALUES:
        assert key in msg, key
    cfg = load_config(TINY, ["train.lr=1e6", "train.max_steps=1e2", "hybrid.loss.eta=2.5e-1"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.hybrid.loss.eta) == (1e6, 100, 0.25)
    (tmp_path / "c.yaml").write_text(f"include: {TINY}\ntrain: {{lr: 3e-3, weight_decay: 1E-4}}\n")
    assert load_config(tmp_path / "c.yaml").train.weight_decay == 1e-4
    rc, err = in_process(capsys, tmp_path, tmp_path / "r", 1, "train.log_every=0")
    assert rc == 2 and "train.log_every" in one_line_error(err)


def test_every_config_field_has_a_range_rule():
    assert sorted(set(rule_names(PretrainConfig)) - set(RULES)) == []


def test_single_dataset_build_names_the_settings_to_change(tmp_path, capsys):
    one = tmp_path / "one"
    write_test_build(one, {"detA": LAYOUT["detA"]})
    rc, err = in_process(capsys, one, tmp_path / "run", 1)
    assert rc == 2 and "hybrid.loss.adv_det=false hybrid.loss.adv_reid=false" in one_line_error(err)


# --------------------------------------------------------------------------- 5. the command's error contract
def test_environment_errors_are_one_line_exit_2(build, tmp_path, capsys):
    full = tmp_path / "full"
    full.mkdir()
    (full / "config.yaml").symlink_to("/dev/full")      # every write there fails with ENOSPC
    proc = run(tmp_path, build, full, 1)
    assert proc.returncode == 2 and "disk full" in one_line_error(proc.stderr)
    rc, err = in_process(capsys, build, Path("/sys/hybridps-denied"), 1)   # EPERM even for root
    assert rc == 2 and "permission denied" in one_line_error(err)
    rc, err = in_process(capsys, build, build / "manifest.json", 1)
    assert rc == 2 and "not a directory" in one_line_error(err)
    (tmp_path / "bad.yaml").write_text("train: [unclosed\n")
    rc = main(["--config", str(tmp_path / "bad.yaml"), "--shards", str(build)])
    assert rc == 2 and "not valid YAML" in one_line_error(capsys.readouterr().err)


def test_interrupt_exits_130(build, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([PY, "-m", "hybridps.pretrain", *args(build, out, 500)], env=env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 90
        while not (out / "history.jsonl").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]


def test_internal_errors_exit_1_with_traceback_only_in_debug(build, tmp_path, capsys, monkeypatch):
    import hybridps.pretrain.train
    from hybridps import pretrain
    def broken(cfg, resume=None):
        raise RuntimeError("a bug")

    monkeypatch.setattr(pretrain.train, "train", broken)
    rc, err = in_process(capsys, build, tmp_path / "run", 1)
    assert rc == 1 and "internal error: RuntimeError: a bug" in err and "Traceback" not in err
    monkeypatch.setenv("HYBRIDPS_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a bug"):
        main(args(build, tmp_path / "run", 1))


def test_finite_values_only_in_logged_json(trained):
    """Sanity for the checks above: the reference run's losses are finite."""
    rows = [json.loads(ln) for ln in (trained / "history.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
