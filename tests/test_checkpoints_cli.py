"""Registry data, run-directory sources, style checks and the command line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hybridps.checkpoints import cli, registry
from hybridps.checkpoints.convert import canonicalize, convert, export, load_pretrained
from hybridps.checkpoints.safe_load import load_checkpoint
from hybridps.checkpoints.style import StyleMismatchError
from hybridps.checkpoints.targets import TARGETS, get_target


@pytest.fixture(autouse=True)
def _user_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("HYBRIDPS_OFFLINE", "1")     # nothing here may touch the network


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = torchvision.models.resnet18(weights=None).state_dict()
    return {k: (torch.randn_like(v) if v.is_floating_point() else v + 5) for k, v in sd.items()}


@pytest.fixture
def run_dir(tmp_path, r18) -> Path:
    """What a pre-training run leaves behind (CONTRACTS 5), with trained-looking heads."""
    canon = canonicalize(r18)
    full = export(canon, get_target("nae"), "resnet18", seed=7).state_dict
    model = {k: v.clone() for k, v in full.items() if "cls_score" not in k and "reid_loss" not in k}
    run = tmp_path / "run"
    run.mkdir()
    save_file(model, str(run / "model.safetensors"), metadata={"style": "pytorch"})
    save_file({k: v.clone() for k, v in r18.items() if not k.startswith("fc.")}, str(run / "backbone.safetensors"))
    (run / "meta.json").write_text(json.dumps({"backbone": "resnet18", "style": "pytorch",
                                               "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                                               "manifest_sha256": "ab" * 32, "steps": 10}))
    return run


# ------------------------------------------------------------------ registry
def test_builtin_registry_entries():
    entries = registry.load_entries()
    psvis = {n: e for n, e in entries.items() if n.startswith("psvis-")}
    assert {e.source["file"] for e in psvis.values()} == {"resnet50-ps12.pth", "resnet18-ps15.pth",
                                                         "shufflenetv1-ps19.pth"}
    assert all(e.source["repo"] == "Alice10/psvision" and e.sha256 is None and e.layout == "psvis"
               for e in psvis.values())
    for name in ("torchvision-resnet50", "torchvision-resnet18"):
        e = entries[name]
        assert e.source["type"] == "url" and e.sha256_prefix in e.source["url"] and e.style == "pytorch"
        assert e.normalization["channels"] == "RGB"
    caffe = entries["mmdet-resnet50-caffe"]
    assert caffe.style == "caffe" and caffe.normalization["channels"] == "BGR"


def test_user_registry_location_and_shadowing(tmp_path, monkeypatch):
    monkeypatch.delenv("HYBRIDPS_REGISTRY")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert registry.user_registry_path() == tmp_path / "xdg" / "hybridps" / "registry.json"
    (tmp_path / "w.pth").write_bytes(b"x")
    assert cli.main(["add", "psvis-resnet50", str(tmp_path / "w.pth"), "--arch", "resnet50", "--layout", "psvis"]) == 2
    (tmp_path / "xdg" / "hybridps").mkdir(parents=True)
    (tmp_path / "xdg" / "hybridps" / "registry.json").write_text(json.dumps({"entries": [
        {"name": "psvis-resnet18", "source": {"type": "local", "path": "/x"}, "file": "x", "arch": "resnet18",
         "layout": "psvis"}]}))
    with pytest.raises(registry.RegistryError, match="shadows a built-in"):
        registry.load_entries()


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "psvis-shufflenetv1" in out and "hf://Alice10/psvision/resnet50-ps12.pth" in out
    assert "unknown" in out and "0676ba61.." in out


# ---------------------------------------------------------- run directories
def test_run_dir_to_nae_carries_heads_and_sizes_the_oim(run_dir, tmp_path, capsys):
    out = tmp_path / "nae_prw.pth"
    assert cli.main(["convert", str(run_dir), "--to", "nae", "--out", str(out), "--num-pids", "482",
                     "--cq-size", "500", "--report-json", str(tmp_path / "r.json"),
                     "--force"]) == 0   # a resnet18 run: NAE4PS itself builds resnet50 (test_clients.py)
    text = capsys.readouterr().out
    assert "model.load_state_dict" in text
    ck = torch.load(out, weights_only=True)
    assert ck["epoch"] == 0 and ck["meta"]["style"] == "pytorch"
    sd = ck["model"]
    assert sd["roi_heads.reid_loss.lut"].shape == (482, 256) and sd["roi_heads.reid_loss.cq"].shape == (500, 256)
    model = load_checkpoint(run_dir / "model.safetensors").state_dict
    assert torch.equal(sd["rpn.head.bbox_pred.weight"], model["rpn.head.bbox_pred.weight"])
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["modules"]["embedding_head"]["loaded"] and not rep["modules"]["embedding_head"]["initialised"]
    assert rep["modules"]["box_predictor"]["initialised"] == ["roi_heads.box_predictor.cls_score.weight",
                                                              "roi_heads.box_predictor.cls_score.bias"]


def test_load_pretrained_for_our_own_training(run_dir):
    pre = load_pretrained(run_dir)
    assert pre.arch == "resnet18" and pre.style == "pytorch" and pre.normalization["mean"] == [0.485, 0.456, 0.406]
    assert "rpn.head.conv.0.0.weight" in pre.state_dict
    assert pre.report.matched_fraction == 1.0


def test_add_run_dir_then_convert_by_name(run_dir, tmp_path, capsys):
    assert cli.main(["add", "my-run", str(run_dir)]) == 0
    e = registry.get("my-run")
    assert e.arch == "resnet18" and e.layout == "hybridps" and e.style == "pytorch"
    assert cli.main(["convert", "my-run", "--to", "seqnet", "--out", str(tmp_path / "s.pth"), "--force"]) == 0
    assert "reid_head.layer4 is a copy" in capsys.readouterr().out


# ---------------------------------------------------------------- styles
def test_style_mismatch_refused_without_force(run_dir, tmp_path, capsys):
    out = tmp_path / "alignps.pth"
    assert cli.main(["convert", str(run_dir), "--to", "alignps", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "style mismatch" in err and "style='pytorch'" in err and "to_rgb=True" in err
    assert "stride" in err and "--force" in err
    assert not out.exists()
    assert cli.main(["convert", str(run_dir), "--to", "alignps", "--out", str(out), "--force"]) == 0
    ck = torch.load(out, weights_only=True)
    assert ck["meta"]["style"] == "pytorch" and "backbone.conv1.weight" not in ck["state_dict"]
    assert "layer4.1.conv2.weight" in ck["state_dict"]


def test_caffe_source_to_pytorch_target(tmp_path, r18):
    src = tmp_path / "caffe.pth"
    torch.save({"state_dict": {k: v for k, v in r18.items() if not k.startswith("fc.")},
                "meta": {"style": "caffe"}}, src)
    with pytest.raises(StyleMismatchError, match="STRIDE_IN_1X1=True"):
        convert(src, "torchvision", tmp_path / "tv.pth")
    assert not (tmp_path / "tv.pth").exists()
    res = convert(src, "mmdet", tmp_path / "mm.pth")        # mmdet: the config carries the style
    assert "style='caffe'" in res.config
    res = convert(src, "torchvision", tmp_path / "tv.pth", force=True)
    assert any(n.startswith("--force") for n in res.report.notes)


def test_unknown_style_is_reported_not_guessed(tmp_path, r18):
    torch.save(r18, tmp_path / "plain.pth")
    res = convert(tmp_path / "plain.pth", "alignps", tmp_path / "a.pth")
    assert any("style is unknown" in n for n in res.report.notes)
    assert "style" not in torch.load(tmp_path / "a.pth", weights_only=True)["meta"]


# ------------------------------------------------------------- cli details
def test_inspect_and_overwrite(run_dir, tmp_path, capsys):
    assert cli.main(["inspect", str(run_dir / "backbone.safetensors"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == "psvis" and info["arch"] == "resnet18" and info["keys"] == 120
    out = tmp_path / "t.safetensors"
    assert cli.main(["convert", str(run_dir), "--to", "timm", "--out", str(out)]) == 0
    assert cli.main(["convert", str(run_dir), "--to", "timm", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["convert", str(run_dir), "--to", "timm", "--out", str(out), "--overwrite"]) == 0


def test_offline_registry_download_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["download", "torchvision-resnet18", "--cache", str(tmp_path / "c")]) == 2
    assert "offline mode" in capsys.readouterr().err


def test_every_target_has_a_config_line():
    for t in TARGETS.values():
        assert "{out}" in t.config, t.name


def test_min_fraction_threshold_and_legacy_outputs(tmp_path, r18, capsys):
    import zipfile

    torch.save(r18, tmp_path / "tv.pth")
    out = tmp_path / "nae.pth"
    # a bare backbone fills ~90 % of NAE's keys; the rest are fresh heads
    assert cli.main(["convert", str(tmp_path / "tv.pth"), "--to", "nae", "--out", str(out),
                     "--min-fraction", "0.95", "--force"]) == 2
    assert "threshold 95%" in capsys.readouterr().err and not out.exists()
    assert cli.main(["convert", str(tmp_path / "tv.pth"), "--to", "nae", "--out", str(out),
                     "--legacy-rpn", "--legacy-format", "--force"]) == 0
    assert not zipfile.is_zipfile(out)
    sd = torch.load(out, weights_only=True)["model"]
    assert "rpn.head.conv.weight" in sd and "rpn.head.conv.0.0.weight" not in sd
    back = load_pretrained(out).state_dict
    assert "rpn.head.conv.0.0.weight" in back


def test_checkpoints_is_a_leaf_package():
    import ast

    root = Path(cli.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            parts = [n.split(".")[1] if n.startswith("hybridps.") else n.split(".")[0] for n in names]
            assert not any(p in ("data_prep", "pretrain", "finetune") for p in parts), path


def test_safetensors_we_write_are_byte_identical_for_the_same_content(tmp_path):
    """safetensors writes its metadata map in a random order per call; ours is sorted, so
    identical runs give identical files (hashes can be compared) and the header still reads."""
    import hashlib

    from safetensors import safe_open

    from hybridps.checkpoints.writers import save_safetensors

    tensors = {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3)}
    meta = {f"key{i}": f"value {i} é" for i in range(9)}
    digests = set()
    for i in range(6):
        path = tmp_path / f"m{i}.safetensors"
        save_safetensors(tensors, path, meta)
        digests.add(hashlib.sha256(path.read_bytes()).hexdigest())
        with safe_open(str(path), "pt") as f:
            assert f.metadata() == meta and torch.equal(f.get_tensor("w"), tensors["w"])
    assert len(digests) == 1
