"""benchmarks/ablation.py: the multi-seed protocol runs end to end and is deterministic."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "ablation.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import ablation  # noqa: E402


def test_paired_difference_and_interval_by_hand():
    p = ablation.paired([3.0, 5.0, 7.0], [1.0, 2.0, 3.0])
    # differences 2, 3, 4: mean 3, sd 1, t(0.975, 2) = 4.303 -> half-width 4.303 / sqrt(3)
    assert p["diff"] == pytest.approx(3.0)
    assert p["ci95"] == pytest.approx([3.0 - 4.303 / 3 ** 0.5, 3.0 + 4.303 / 3 ** 0.5], rel=1e-6)
    m, s = ablation.mean_std([1.0, 2.0, 3.0])
    assert (m, s) == (2.0, 1.0)


def test_quick_mode_rows_and_full_mode_covers_the_paper_analogues():
    quick = {r.name for r in ablation.rows(True)}
    assert quick == {"random", "backbone", "full", "no_iam", "no_con"}
    full = {r.name for r in ablation.rows(False)}
    for name in ("inter_task", "random_paste", "oim_two_view", "oim_sampled", "2ds", "2ds_no_iam", "gap2.5", "gap2.5_no_iam",
                 "random@10%", "full@10%", "random@30%", "full@30%", "random@60%", "full@60%"):
        assert name in full
    assert {r.pretrain for r in ablation.rows(False)} - {None} <= set(ablation.PRETRAINS)
    assert ("oim_sampled", "full") in {(a, b) for a, b, _ in ablation.comparisons(full)}


def _run(out: Path) -> dict:
    cmd = [sys.executable, str(SCRIPT), "--out", str(out), "--quick", "--configs", "random,full", "--seeds", "0",
           "--pretrain-steps", "2", "--finetune-steps", "2", "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "ablation.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_same_seed_gives_identical_numbers(tmp_path):
    a = _run(tmp_path / "a")
    assert set(a["configs"]) == {"random", "full"}
    assert a["protocol"]["n_queries"] >= 100
    assert all(len(c["mAP"]) == 1 for c in a["configs"].values())
    assert (tmp_path / "a" / "ablation.md").read_text().startswith("Seeds [0]")
    # the second run re-does every pre-training / fine-tuning / evaluation job on the same world
    (tmp_path / "b").mkdir()
    for d in (tmp_path / "a").iterdir():
        if d.name.startswith(("world_", "shards_")):
            shutil.copytree(d, tmp_path / "b" / d.name)
    b = _run(tmp_path / "b")
    assert not (tmp_path / "b" / "logs" / "synth_1.log").exists()      # world reused, jobs re-run
    assert (tmp_path / "b" / "logs" / "pretrain_default_s0.log").exists()
    assert a["configs"] == b["configs"]
