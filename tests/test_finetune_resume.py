"""Fine-tuning parity with pre-training: checkpoints, exact --resume, periodic
evaluation that does not change the run, TensorBoard.

A real kill: the run is SIGKILLed by pretrain/state.py's fault hook right
after a checkpoint lands, then resumed; its final weights must equal an
uninterrupted run's bit for bit (same seed, same machine).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hybridps.data_prep.synth import prw as synth_prw
from hybridps.finetune import cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "finetune" / "configs" / "tiny.yaml"
FAST = ["model.min_size=96", "model.max_size=176", "model.roi_batch_size=8", "model.rpn_post_nms_train=32",
        "model.rpn_post_nms_test=12", "model.rpn_pre_nms_test=100", "model.detections_per_img=8",
        "eval.visualize=0"]
# 6 of the 22 tiny PRW images at batch 2: 3 steps per epoch, so 5 steps cross an
# epoch boundary and a step-4 checkpoint sits mid-epoch
STEPS = ["--train-fraction", "0.25", "--max-steps", "5", "--seed", "3"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Every run of this module on one intra-op thread, as the killed subprocess
    (OMP_NUM_THREADS=1): float reductions differ with the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "prw"
    synth_prw.write(root, seed=0, size="tiny")
    return root


def argv(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--dataset", "prw", "--root", str(root), "--config", str(TINY), "--init", "none",
            "--out", str(out), *STEPS, *extra, *FAST]


@pytest.fixture(scope="module")
def reference(prw, tmp_path_factory) -> Path:
    """The uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "run"
    assert cli.main(argv(prw, out)) == 0
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def _losses(run: Path) -> list[tuple[int, float, dict]]:
    rows = [json.loads(ln) for ln in (run / "history.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["terms"]) for r in rows]


@pytest.mark.slow
def test_killed_then_resumed_run_ends_with_identical_weights(prw, reference, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HYBRIDPS_FAULT": "checkpoint_renamed@4"}
    # --eval-every 2: the evaluation at step 2 must not change what follows either
    proc = subprocess.run([sys.executable, "-m", "hybridps.finetune", *argv(prw, out, "--save-every", "2", "--eval-every", "2")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (out / "model.safetensors").exists()                         # it died mid-run
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_0", "checkpoint_1"]
    assert [json.loads(ln)["step"] for ln in (out / "evals.jsonl").read_text().splitlines()] == [2]

    assert cli.main(argv(prw, out, "--save-every", "2", "--eval-every", "2", "--resume")) == 0
    _assert_same_weights(reference, out)
    assert _losses(out) == _losses(reference)                                 # the whole trajectory
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 5 and meta["resumed_from"].endswith("checkpoint_1")
    # the reported result is the final model's, and says so
    metrics = json.loads((out / "eval_prw" / "metrics.json").read_text())
    assert metrics["model"] == {"run": str(out), "steps": 5, "selection": "last"}
    evals = [json.loads(ln) for ln in (out / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and 0.0 <= evals[0]["mAP"] <= 1.0
    log = (out / "log.txt").read_text()
    assert "resumed from" in log and "reported result: the final model (step 5)" in log


def test_resume_refusals(prw, reference, tmp_path, capsys):
    # a finished run: a plain re-run is refused, not silently restarted
    assert cli.main(argv(prw, reference)) == 2
    assert "--resume" in capsys.readouterr().err
    # another seed is another run
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(reference, copy)
    bad = argv(prw, copy, "--resume")
    bad[bad.index("--seed") + 1] = "4"
    assert cli.main(bad) == 2
    assert "train.seed: 3 -> 4" in capsys.readouterr().err
    assert cli.main(argv(prw, tmp_path / "empty", "--resume")) == 2
    assert "no checkpoints" in capsys.readouterr().err
    assert cli.main(argv(prw, copy, "--resume", "--overwrite")) == 2
    assert "pass one of them" in capsys.readouterr().err
    # --overwrite starts over: the old checkpoints go, the new run is the reference run again
    assert cli.main(argv(prw, copy, "--overwrite")) == 0
    assert [p.name for p in (copy / "checkpoints").iterdir()] == ["checkpoint_0"]
    assert _losses(copy) == _losses(reference)


def test_resume_past_the_end_extends_the_run(prw, reference, tmp_path):
    """--resume with a larger --max-steps continues a finished run from its final checkpoint."""
    import shutil

    out = tmp_path / "longer"
    shutil.copytree(reference, out)
    more = argv(prw, out, "--resume")
    more[more.index("--max-steps") + 1] = "6"
    assert cli.main(more) == 0
    assert [s for s, _, _ in _losses(out)] == [1, 2, 3, 4, 5, 6]
    assert _losses(out)[:5] == _losses(reference)
    assert json.loads((out / "meta.json").read_text())["steps"] == 6


def test_tensorboard_events_written(prw, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "tb"
    short = argv(prw, out, "--log-with", "tensorboard", "train.log_every=1")
    short[short.index("--max-steps") + 1] = "2"
    assert cli.main(short) == 0
    events = list(out.glob("finetune/**/events.out.tfevents.*"))
    assert events, sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"loss", "lr", "loss_reid"} <= set(tags), tags
    assert [e.step for e in acc.Scalars("loss")] == [1, 2]
