"""Real multi-process runs of the trainer on CPU (gloo), launched with accelerate.

`accelerate launch --cpu --num_processes 2` silently runs ONE process, so the
launches here use ACCELERATE_USE_CPU=true + --multi_gpu, and every test
asserts the world size the ranks themselves report (ranks/rank<r>.json).
Every launch has a timeout: the failure mode of a distributed bug is a hang.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from hybridps.pretrain import data as D
from test_pretrain_train import CONFIGS, ROOT, build_synthetic_world, run_env

pytestmark = pytest.mark.slow
ACCELERATE = str(Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "accelerate")
if not Path(ACCELERATE).is_file():
    ACCELERATE = str(Path(__import__("sys").executable).parent / "accelerate")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_args(port: int, num_machines: int = 1, machine_rank: int = 0) -> list[str]:
    args = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", str(num_machines),
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port)]
    if num_machines > 1:
        args += ["--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return args


def pretrain_args(shards: Path, out: Path, steps: int) -> list[str]:
    return ["-m", "hybridps.pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--shards", str(shards), "--out", str(out),
            "--max-steps", str(steps), "train.progress=false"]


def env() -> dict:
    return {**run_env(), "ACCELERATE_USE_CPU": "true"}


def rank_reports(run: Path) -> list[dict]:
    return [json.loads((run / "ranks" / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    # 14 usable samples -> an epoch of 12 at world 2 x batch 2 = 3 steps
    return build_synthetic_world(tmp_path_factory.mktemp("world"), limit=3)


@pytest.mark.timeout(400)
def test_two_processes_share_the_epoch_and_the_oim_tables(world, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(launch_args(free_port()) + pretrain_args(world, out, 3), capture_output=True, text=True,
                          env=env(), timeout=360)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    reports = rank_reports(out)
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world_size"] == 2 and r["distributed_type"] == "MULTI_CPU" for r in reports)
    assert reports[0]["lut_sha256"] == reports[1]["lut_sha256"]       # OIM LUT synchronised
    assert reports[0]["cq_sha256"] == reports[1]["cq_sha256"]
    assert reports[0]["params_sha256"] == reports[1]["params_sha256"]
    assert json.loads((out / "meta.json").read_text())["world_size"] == 2

    seen = {r: [ln.split("\t")[1] for ln in (out / "ranks" / f"keys_rank{r}.tsv").read_text().splitlines()]
            for r in (0, 1)}
    assert len(seen[0]) == len(seen[1]) == 6                          # equal share: 3 steps x batch 2
    union = seen[0] + seen[1]
    assert len(set(union)) == len(union)                              # no sample on two ranks
    src = D.open_source(shards=str(world))
    reader = D.ShardReader(src.shards)
    every_key = {reader.key(s, i) for s, info in enumerate(src.shards) for i in range(info.samples)}
    assert len(every_key) == 14 and set(union) <= every_key
    plan = D.equalize(D.epoch_plan(src, D.dataset_weights(src, None), seed=0, epoch=0), 2, 2, "drop")
    assert sorted(union) == sorted(D.plan_keys(reader, plan))          # the union is exactly the epoch

    # the checkpoint holds every rank's RNG state; resuming in 2 processes continues, in 1 is refused
    ckpt = out / "checkpoints" / "checkpoint_0"
    assert {p.name for p in ckpt.glob("rng_*.safetensors")} == {"rng_0.safetensors", "rng_1.safetensors"}
    single = subprocess.run([sys.executable] + pretrain_args(world, out, 4) + ["--resume"], capture_output=True,
                            text=True, env=run_env(), timeout=120)
    assert single.returncode == 2 and "world_size: 2 -> 1" in single.stderr, single.stderr[-2000:]
    proc = subprocess.run(launch_args(free_port()) + pretrain_args(world, out, 4) + ["--resume"],
                          capture_output=True, text=True, env=env(), timeout=360)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "checkpoint_0 at step 3" in proc.stdout + proc.stderr
    reports = rank_reports(out)
    assert all(r["steps"] == 4 for r in reports) and reports[0]["params_sha256"] == reports[1]["params_sha256"]


@pytest.mark.timeout(400)
def test_two_node_launch_on_loopback(world, tmp_path):
    out, port = tmp_path / "run", free_port()
    procs = [subprocess.Popen(launch_args(port, 2, r) + pretrain_args(world, out, 2), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env()) for r in (0, 1)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=360)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    reports = rank_reports(out)
    assert all(r["world_size"] == 2 and r["steps"] == 2 for r in reports)
    assert reports[0]["lut_sha256"] == reports[1]["lut_sha256"]
    assert (out / "model.safetensors").is_file()
