"""benchmarks/gpu_check.py: "no GPU" and exit 0 without CUDA; the opt-in CPU dry run of every stage."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _env() -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.pop("HYBRIDPS_DEBUG", None)
    return env


def test_without_gpu_says_no_gpu_and_exits_zero(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no GPU")
    assert not out.exists()          # nothing measured, nothing written


def test_bad_arguments_exit_2():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "0"], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr


@pytest.mark.skipif(not os.environ.get("HYBRIDPS_GPU_CHECK_DRY"),
                    reason="opt-in (HYBRIDPS_GPU_CHECK_DRY=1): the CPU dry run of every stage takes minutes")
def test_dry_run_cpu_runs_every_stage(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--dry-run-cpu", "--out", str(tmp_path / "work"),
                           "--json", str(out)], capture_output=True, text=True, env=_env(), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["dry_run_cpu"] and not r["skipped"]
    assert r["matmul"]["tflops"] > 0
    h = r["hybrid_step"]
    assert h["step_s"] > 0 and h["gflop_per_step"] > 0 and h["tflops"] > 0
    assert r["largest_batch"]["largest_batch"] == 2          # the dry run's cap; CPU never runs out
    assert r["loader"]["images_per_s"] > 0 and r["loader"]["images"] > 0
    c = r["chain"]
    assert 0.0 <= c["mAP"] <= 100.0 and c["n_queries"] > 0
    assert (tmp_path / "work" / "finetune" / "eval" / "metrics.json").is_file()
    assert "| hybrid step resnet18" in proc.stdout and "| total wall time" in proc.stdout
