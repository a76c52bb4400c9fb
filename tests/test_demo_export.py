"""The demo's export step (scripts/demo_export.sh) on a tiny run written by the
real pre-training exporter: every file it lists exists and loads where it says."""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torchvision

from hybridps.checkpoints import cli
from hybridps.checkpoints.safe_load import load_checkpoint
from hybridps.pretrain.config import load_config
from hybridps.pretrain.export import export_run
from hybridps.pretrain.model import build_search_model

ROOT = Path(__file__).resolve().parents[1]


def tiny_run(out: Path, *overrides: str) -> Path:
    """A pre-training run folder exactly as pretrain/export.py writes it, from an untrained model."""
    cfg = load_config(ROOT / "pretrain" / "configs" / "tiny.yaml", ["model.num_pids=12", *overrides])
    torch.manual_seed(0)
    hybrid = SimpleNamespace(search_model=build_search_model(cfg.model))
    source = SimpleNamespace(manifest_sha256="ab" * 32, num_ids=12, domains=["crowdhuman", "msmt17"])
    out.mkdir(parents=True)
    export_run(hybrid, cfg, source, out, steps=1, final_losses={"loss_total": 1.0}, world_size=1,
               distributed_type="NO")
    return out


def demo_export_argv(run: Path, out: Path) -> list[str]:
    """The demo's own step-4 command (scripts/demo.sh), with its folders replaced."""
    lines = [ln.strip() for ln in (ROOT / "scripts" / "demo.sh").read_text().splitlines()
             if ln.strip().startswith('"$PYTHON" -m hybridps.checkpoints export')]
    assert len(lines) == 1, "scripts/demo.sh must export with one `python -m hybridps.checkpoints export` line"
    argv = shlex.split(lines[0].replace('"$OUT/pretrain"', str(run)).replace('"$OUT/export"', str(out)))
    assert argv[:3] == ["$PYTHON", "-m", "hybridps.checkpoints"]
    return argv[3:]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HYBRIDPS_OFFLINE", "1")                 # nothing here may touch the network
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(tmp_path / "registry.json"))


def test_demo_export_writes_loadable_files(tmp_path, capsys, one_thread):
    run = tiny_run(tmp_path / "pretrain")
    out = tmp_path / "export"
    assert cli.main(demo_export_argv(run, out)) == 0
    stdout = capsys.readouterr().out
    names = {"torchvision_resnet18.pth", "timm_resnet18.safetensors", "mmdet_resnet18.pth",
             "detectron2_resnet18.pkl", "EXPORTS.txt"}
    assert {p.name for p in out.iterdir()} == names
    assert f"exports in {out}/" in stdout and "nae/seqnet: skipped" in stdout
    listing = (out / "EXPORTS.txt").read_text()
    assert all(n in listing for n in names - {"EXPORTS.txt"}) and "load_state_dict" in listing
    assert "nae/seqnet: skipped" in listing
    # a second run refuses to replace them silently
    assert cli.main(demo_export_argv(run, out)) == 2 and "--overwrite" in capsys.readouterr().err

    backbone = load_checkpoint(run / "backbone.safetensors").state_dict
    # torchvision: the real constructor takes it (only the classifier is absent)
    sd = torch.load(out / "torchvision_resnet18.pth", weights_only=True)
    missing, unexpected = torchvision.models.resnet18(weights=None).load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(sd["layer4.1.conv2.weight"], backbone["layer4.1.conv2.weight"])
    # timm layout = torchvision keys in safetensors; mmdet = {"state_dict": backbone.*}
    timm_sd = load_checkpoint(out / "timm_resnet18.safetensors").state_dict
    assert torch.equal(timm_sd["layer1.0.conv1.weight"], backbone["layer1.0.conv1.weight"])
    mm = torch.load(out / "mmdet_resnet18.pth", weights_only=True)
    assert torch.equal(mm["state_dict"]["layer3.0.bn1.running_var"], backbone["layer3.0.bn1.running_var"])
    # detectron2: a pickle of numpy arrays, read by the safe loader (nothing executed)
    d2 = load_checkpoint(out / "detectron2_resnet18.pkl").state_dict
    assert any(k.startswith("res5.") or "res5" in k for k in d2)


def test_export_of_a_resnet50_run_includes_nae_and_seqnet(tmp_path, capsys, one_thread):
    run = tiny_run(tmp_path / "pretrain", "model.backbone=resnet50")
    out = tmp_path / "export"
    # the default list for a ResNet-50 ends with nae and seqnet; the backbone targets are tested above
    assert cli.main(["export", str(run), "--out", str(out), "--to", "nae", "seqnet", "--num-pids", "12",
                     "--cq-size", "8"]) == 0
    assert "RPN left to the client" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"nae_resnet50.pth", "seqnet_resnet50.pth", "EXPORTS.txt"}
    # NAE4PS: torch.load(f)["model"] with its keys (tests/data/nae4ps_state_dict_keys.tsv)
    ck = torch.load(out / "nae_resnet50.pth", weights_only=True)
    keys_file = ROOT / "tests" / "data" / "nae4ps_state_dict_keys.tsv"
    want = {line.split("\t")[0] for line in keys_file.read_text().splitlines() if line and not line.startswith("#")}
    have = set(ck["model"])
    assert len(want & have) / len(want) > 0.95, sorted(want - have)[:5]
    # the tiny run used other anchors: the RPN was left to NAE's own init, and the list says so
    model = load_checkpoint(run / "model.safetensors").state_dict
    rpn = next(k for k in ck["model"] if k.startswith("rpn.head.cls_logits.weight"))
    assert not torch.equal(ck["model"][rpn], model["rpn.head.cls_logits.weight"])
    backbone_key = "backbone.body.layer3.0.conv1.weight" if "backbone.body.layer3.0.conv1.weight" in have else \
        "backbone.layer3.0.conv1.weight"
    assert torch.equal(ck["model"][backbone_key], model["backbone.layer3.0.conv1.weight"])
    assert ck["model"]["roi_heads.reid_loss.lut"].shape == (12, 256)
    assert "nae_resnet50.pth" in (out / "EXPORTS.txt").read_text()


def test_export_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for argv in (["export", str(tmp_path / "empty"), "--out", str(tmp_path / "x")],
                 ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("error:" in err[0]), err
    assert not (tmp_path / "x").exists()
