"""Config, schedule, CLI and the single-process trainer end to end.

The end-to-end runs use the synthetic world built by the project's own tools
(`python -m hybridps.data_prep synth` + `python -m hybridps.data_prep build`) and the real CLI in
a subprocess.  OMP_NUM_THREADS=1: on a shared 2-core machine, intra-op
threads of tiny tensors mostly wait on each other (measured 3x slower).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hybridps.pretrain.config import ConfigError, PretrainConfig, dump_config, load_config, to_dict
from hybridps.pretrain.train import lr_factor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "pretrain" / "configs"
PY = sys.executable
SYNTH = ("crowdhuman", "ecp", "msmt17", "cuhk03", "luperson")


def run_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def build_synthetic_world(root: Path, limit: int | None = None) -> Path:
    """Synthetic releases of the paper's five datasets -> shards (the real tools)."""
    synth, build = root / "synth", root / "build"
    subprocess.run([PY, "-m", "hybridps.data_prep", "synth", str(synth), "--size", "tiny", "--only", ",".join(SYNTH)],
                   check=True, capture_output=True, env=run_env(), timeout=120)
    cmd = [PY, "-m", "hybridps.data_prep", "build", str(build), "--workers", "1", "--quiet"]
    for name in SYNTH:
        cmd += ["--source", f"{name}={synth / name}"]
        if limit:
            cmd += ["--limit", f"{name}={limit}"]
    subprocess.run(cmd, check=True, capture_output=True, env=run_env(), timeout=120)
    return build


def pretrain_cmd(shards: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [PY, "-m", "hybridps.pretrain", "--config", str(CONFIGS / "tiny.yaml"), "--shards", str(shards),
            "--out", str(out), "--max-steps", str(steps), "train.progress=false", *extra]


def run_pretrain(shards: Path, out: Path, steps: int, *extra: str, timeout: int = 240):
    proc = subprocess.run(pretrain_cmd(shards, out, steps, *extra), capture_output=True, text=True,
                          env=run_env(), timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def losses(run: Path) -> list[dict]:
    """history.jsonl rows with the model's named values flattened next to step/lr/loss."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{"step": r["step"], "lr": r["lr"], "loss": r["loss"], **r["terms"]} for r in rows]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    return build_synthetic_world(tmp_path_factory.mktemp("world"), limit=3)


@pytest.fixture(scope="module")
def uninterrupted(world, tmp_path_factory) -> Path:
    """4 steps, checkpoint every 2: the reference trajectory."""
    out = tmp_path_factory.mktemp("runs") / "ref"
    run_pretrain(world, out, 4, "train.save_every=2")
    return out


# --------------------------------------------------------------------------- config
@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml")))
def test_every_shipped_config_loads_and_round_trips(name, tmp_path):
    cfg = load_config(CONFIGS / f"{name}.yaml")
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_ablations_change_only_what_they_say():
    paper = to_dict(load_config(CONFIGS / "paper.yaml"))

    def diff(a, b, prefix=""):
        out = set()
        for k in a:
            if isinstance(a[k], dict) and isinstance(b[k], dict):
                out |= diff(a[k], b[k], f"{prefix}{k}.")
            elif a[k] != b[k]:
                out.add(prefix + k)
        return out

    expect = {
        "no_iam": {"hybrid.loss.adv_det", "hybrid.loss.adv_reid"},
        "no_con": {"hybrid.loss.con"},
        "random_paste": {"data.reid_canvas", "data.paste_scale"},
        "inter_task": {"hybrid.loss.inter_task"},
        "det_only": {"data.weights.msmt17", "data.weights.cuhk03", "data.weights.luperson"},
    }
    for name, keys in expect.items():
        ablation = to_dict(load_config(CONFIGS / f"{name}.yaml"))
        assert diff(paper, ablation) == keys | {"train.output_dir"}, name
    assert paper["model"]["backbone"] == "resnet50"
    assert (paper["model"]["min_size"], paper["model"]["max_size"]) == (900, 1500)
    assert set(paper["data"]["weights"]) == set(SYNTH)


def test_overrides_and_unknown_keys(tmp_path):
    cfg = load_config(CONFIGS / "tiny.yaml", ["train.lr=0.5", "data.weights={a: 1, b: 0.5}",
                                              "hybrid.loss.con=false", "model.anchor_sizes=[8, 16]"])
    assert cfg.train.lr == 0.5 and cfg.data.weights == {"a": 1.0, "b": 0.5}
    assert cfg.hybrid.loss.con is False and cfg.model.anchor_sizes == [8, 16]
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load_config(CONFIGS / "tiny.yaml", ["train.lrr=1"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(CONFIGS / "tiny.yaml", ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(CONFIGS / "tiny.yaml", ["train.lr"])
    (tmp_path / "bad.yaml").write_text("include: tiny.yaml\ndata: {batch_sise: 2}\n")
    (tmp_path / "tiny.yaml").write_text((CONFIGS / "tiny.yaml").read_text())
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "a.yaml").write_text("include: b.yaml\n")
    (tmp_path / "b.yaml").write_text("include: a.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="norm_layer"):
        load_config(CONFIGS / "tiny.yaml", ["model.norm_layer=groupnorm"])
    with pytest.raises(ConfigError, match="remainder"):
        load_config(CONFIGS / "tiny.yaml", ["data.remainder=keep"])


def test_include_merges_recursively(tmp_path):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"train": {"lr": 0.1, "max_steps": 7}}))
    (tmp_path / "child.yaml").write_text("include: base.yaml\ntrain: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.train.lr, cfg.train.max_steps) == (0.2, 7)
    assert isinstance(cfg, PretrainConfig)


def test_lr_schedule():
    t = load_config(CONFIGS / "tiny.yaml", ["train.warmup_steps=10", "train.warmup_factor=0.1",
                                            "train.schedule=step", "train.milestones=[20, 30]",
                                            "train.max_steps=40"]).train
    assert lr_factor(0, t) == pytest.approx(0.1)
    assert lr_factor(5, t) == pytest.approx(0.55)
    assert [lr_factor(s, t) for s in (10, 19, 20, 30)] == pytest.approx([1, 1, 0.1, 0.01])
    t.schedule = "cosine"
    assert lr_factor(10, t) == pytest.approx(1) and lr_factor(25, t) == pytest.approx(0.5)
    assert lr_factor(40, t) == pytest.approx(0, abs=1e-9)


def test_cli_reports_bad_input_without_traceback(tmp_path):
    proc = subprocess.run(pretrain_cmd(tmp_path / "nowhere", tmp_path / "run", 1), capture_output=True,
                          text=True, env=run_env(), timeout=120)
    assert proc.returncode == 2
    assert "manifest not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(pretrain_cmd(tmp_path, tmp_path / "run", 1, "train.bogus=1"), capture_output=True,
                          text=True, env=run_env(), timeout=120)
    assert proc.returncode == 2 and "unknown config key" in proc.stderr


PSVIS_KEYS = Path(__file__).parent / "data" / "psvis_keys.json"   # dumped from the released PretrainPS weights


@pytest.mark.parametrize("backbone", ["resnet18", "shufflenet"])
def test_backbone_export_layout(backbone):
    """resnet: exactly torchvision's keys and shapes minus fc; shufflenet: the psvis keys."""
    from torchvision.models import resnet18

    from hybridps.pretrain.export import backbone_state, search_model_state
    from hybridps.pretrain.model import ModelConfig, build_search_model

    model = build_search_model(ModelConfig(backbone=backbone, num_pids=10, cq_size=4))
    got = {k: list(v.shape) for k, v in backbone_state(model).items()}
    assert not any(k.startswith(("fc.", "roi_heads.", "backbone.")) for k in got)
    assert not any(k.startswith("roi_heads.reid_loss.") for k in search_model_state(model))
    if backbone == "resnet18":
        want = {k: list(v.shape) for k, v in resnet18().state_dict().items() if not k.startswith("fc.")}
    else:
        want = {k: shape for k, shape, _ in json.loads(PSVIS_KEYS.read_text())["shufflenetv1"]}
    assert got == want


# --------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_run_directory_outputs(uninterrupted, world):
    from safetensors.torch import load_file
    from torchvision.models import resnet18

    from hybridps.pretrain.model import build_search_model

    run = uninterrupted
    for name in ("model.safetensors", "backbone.safetensors", "config.yaml", "meta.json", "history.jsonl", "log.txt"):
        assert (run / name).is_file(), name
    meta = json.loads((run / "meta.json").read_text())
    manifest_sha = __import__("hashlib").sha256((world / "manifest.json").read_bytes()).hexdigest()
    assert meta["manifest_sha256"] == manifest_sha and meta["steps"] == 4 and meta["world_size"] == 1
    assert meta["backbone"] == "resnet18" and meta["style"] == "pytorch" and len(meta["mean"]) == 3
    assert set(meta["final_losses"]) >= {"loss", "loss_reid", "loss_con", "loss_det_img", "simsiam_std"}

    cfg = load_config(run / "config.yaml")
    manifest = json.loads((world / "manifest.json").read_text())
    assert cfg.model.num_pids == manifest["num_ids"] and cfg.hybrid.num_domains == len(manifest["domains"])

    state = load_file(str(run / "model.safetensors"))
    assert not any(k.startswith("roi_heads.reid_loss.") for k in state)
    model = build_search_model(cfg.model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("roi_heads.reid_loss.") for k in missing) and missing

    backbone = load_file(str(run / "backbone.safetensors"))
    net = resnet18()
    del net.fc
    net.load_state_dict(backbone, strict=True)
    assert torch.equal(backbone["layer4.0.conv1.weight"], state["roi_heads.box_head.layer4.0.conv1.weight"])
    assert torch.equal(backbone["layer3.0.conv1.weight"], state["backbone.layer3.0.conv1.weight"])

    hist = losses(run)
    assert [h["step"] for h in hist] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert list(run.glob("pretrain/**/events.out.tfevents.*"))            # the tensorboard tracker wrote
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["checkpoint_0", "checkpoint_1"]
    ck = load_file(str(run / "checkpoints" / "checkpoint_1" / "model.safetensors"))
    assert any(k.endswith("reid_loss.lut") for k in ck)                   # OIM buffers are checkpointed
    state = json.loads((run / "checkpoints" / "checkpoint_1" / "state.json").read_text())
    assert state["step"] == 4 and state["loader"]["consumed"] == 4 and state["loader"]["epoch"] == 0
    assert not list((run / "checkpoints").rglob("*.pkl")) and not list((run / "checkpoints").rglob("*.bin"))


@pytest.mark.slow
def test_kill_and_resume_reproduces_the_trajectory(uninterrupted, world, tmp_path):
    """Kill a run after its step-2 checkpoint, resume it: steps 3-4 match."""
    out = tmp_path / "killed"
    proc = subprocess.Popen(pretrain_cmd(world, out, 50, "train.save_every=2"), env=run_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / "checkpoints" / "checkpoint_0" / "COMPLETE.json"       # written last, then renamed into place
    deadline = time.time() + 240
    try:
        while not done.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert done.exists(), "no checkpoint before the deadline"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / "model.safetensors").exists()               # it really died mid-run
    proc = run_pretrain(world, out, 4, "--resume", "train.save_every=2")
    assert "resumed from" in proc.stdout + proc.stderr
    ref, got = losses(uninterrupted), losses(out)
    assert [h["step"] for h in got] == [1, 2, 3, 4]
    for a, b in zip(ref, got):
        for key in a:
            # null: a monitor undefined in that batch (no dataset of an IAM's task), in both runs
            if a[key] is None or b[key] is None:
                assert a[key] is None and b[key] is None, (a["step"], key)
            else:
                assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)


@pytest.mark.slow
def test_resume_refuses_a_silent_restart(uninterrupted, world):
    proc = subprocess.run(pretrain_cmd(world, uninterrupted, 5), capture_output=True, text=True,
                          env=run_env(), timeout=120)
    assert proc.returncode == 2 and "already holds checkpoints" in proc.stderr


@pytest.mark.slow
def test_bf16_and_gradient_accumulation(world, tmp_path):
    out = tmp_path / "acc"
    run_pretrain(world, out, 2, "train.grad_accum=2", "train.mixed_precision=bf16", "train.log_with=null")
    keys = (out / "ranks" / "keys_rank0.tsv").read_text().splitlines()
    assert [ln.split("\t")[0] for ln in keys] == ["1"] * 4 + ["2"] * 4     # 2 micro-batches of 2 per step
    hist = losses(out)
    assert [h["step"] for h in hist] == [1, 2] and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert not list(out.glob("pretrain/**/events.out.tfevents.*"))       # logging off means no tracker


def window_means(hist: list[dict], steps: range) -> dict[str, float]:
    rows = [h for h in hist if h["step"] in steps]
    # null: a monitor undefined in that batch
    return {k: sum(r[k] for r in rows if r[k] is not None) / len(rows) for k in rows[0]}


# Losses the whole network minimises.  Not asserted, but printed:
# * the IAM domain-classification losses -- through the gradient-reversal layer
#   the backbone *maximises* them, so they stay near log(num_domains) by design;
# * loss_rpn_reg -- it starts small (~0.04) and within 36 steps it only drifts
#   (measured: first epoch 0.042, last epoch 0.047); the RPN box deltas learn
#   more slowly than anything else at this lr;
# * loss_box_reg -- NAE/SeqNet normalise the summed smooth-L1 (beta 1) of the
#   foreground RoIs by ALL sampled RoIs: early on the only positives are the
#   appended GT boxes (target 0), and as the RPN improves more real positives
#   enter the sum, so the term grows while regression improves (measured here:
#   0.30 -> 0.43 over 36 steps).
MINIMISED = ("loss", "loss_rpn_cls", "loss_det_cls", "loss_reid", "loss_con")


@pytest.mark.slow
def test_short_run_lowers_the_losses(world, tmp_path):
    """36 steps = 6 epochs of the 12-sample world with flip/crop/colour off, so
    both windows see the same images: the last epoch's mean losses are below
    the first epoch's.  (L_con needs the most steps: SimSiam starts near 0.)"""
    out = tmp_path / "learn"
    run_pretrain(world, out, 36, "train.lr=0.01", "train.warmup_steps=2", "train.log_with=null",
                 "data.crop_prob=0", "data.flip_prob=0", "data.color_jitter=[0, 0, 0, 0]", timeout=600)
    hist = losses(out)
    first, last = window_means(hist, range(1, 7)), window_means(hist, range(31, 37))
    report = {k: (round(first[k], 4), round(last[k], 4)) for k in sorted(first) if k.startswith("loss")}
    print(json.dumps(report))
    for key in MINIMISED:
        assert last[key] < first[key], (key, report)


@pytest.mark.slow
def test_iam_probe_script_runs(world, tmp_path):
    proc = subprocess.run([PY, str(ROOT / "benchmarks" / "iam_probe.py"), "--shards", str(world), "--steps", "2",
                           "--work", str(tmp_path)], capture_output=True, text=True, env=run_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert [(ln["variant"], ln["group"]) for ln in lines] == [
        (v, g) for v in ("iam", "no_iam") for g in ("all", "det", "reid")]
    assert all(0.0 <= ln["probe_accuracy"] <= 1.0 for ln in lines)
    assert [ln["domains"] for ln in lines[:3]] == [5, 2, 3]   # crowdhuman+ecp / msmt17+cuhk03+luperson
    assert "with IAM" in proc.stdout


def test_intra_task_alignment_scopes_follow_the_manifest_tasks():
    """align_scope task: detection IAM over det/ps datasets, re-ID IAM over re-ID ones."""
    from types import SimpleNamespace

    from hybridps.pretrain.config import load_config
    from hybridps.pretrain.train import TrainError, resolve_for_data, task_domains

    manifest = {"num_ids": 50, "domains": ["crowdhuman", "msmt17", "ecp", "luperson"],
                "datasets": {"crowdhuman": {"task": "det"}, "msmt17": {"task": "reid"},
                             "ecp": {"task": "det"}, "luperson": {"task": "reid"}}}
    assert task_domains(manifest) == ([0, 2], [1, 3])
    source = SimpleNamespace(manifest=manifest, num_ids=50, domains=manifest["domains"])
    cfg = resolve_for_data(load_config("pretrain/configs/tiny.yaml"), source)
    assert (cfg.hybrid.num_domains, cfg.hybrid.det_domains, cfg.hybrid.reid_domains) == (4, [0, 2], [1, 3])
    assert cfg.model.num_pids == 50
    everything = resolve_for_data(load_config("pretrain/configs/tiny.yaml", ["hybrid.align_scope=all"]), source)
    assert everything.hybrid.det_domains is None and everything.hybrid.reid_domains is None
    with pytest.raises(ConfigError, match="align_scope"):      # refused at load time now
        load_config("pretrain/configs/tiny.yaml", ["hybrid.align_scope=bogus"])
    with pytest.raises(TrainError, match="align_scope"):
        resolve_for_data(dataclasses.replace(cfg, hybrid=dataclasses.replace(cfg.hybrid, align_scope="bogus")), source)


def test_logged_means_leave_out_undefined_monitors():
    """A NaN monitor (no rows of that IAM's domains in a batch) does not poison the mean."""
    from types import SimpleNamespace

    from hybridps.pretrain.loop import reduce_means

    single = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    got = reduce_means(single, {"loss": [1.0, 3.0], "acc_det_img": [float("nan"), 0.5],
                                 "acc_reid_img": [float("nan"), float("nan")]})
    assert got["loss"] == 2.0 and got["acc_det_img"] == 0.5 and math.isnan(got["acc_reid_img"])
