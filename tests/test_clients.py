"""Exports as the real downstream clients load them by default (issue 10).

Run in CI with what pip installs: timm and torchvision load the files through their own
calls.  detectron2, SeqNet/NAE4PS on torch 1.2, psvis on mmcv 1.x and AlignPS cannot be
installed from PyPI on this Python; ``scripts/check_clients.sh`` builds their own
environments and loads every export through each client's loading function (the README's
"verified loads" table is its output).  Here detectron2's matching rule is reproduced from
its source (see ``d2_align``), against the key lists of its real R50-C4 / R50-FPN models.
"""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from hybridps.checkpoints import cli
from hybridps.checkpoints.convert import canonicalize, convert, export
from hybridps.checkpoints.safe_load import load_checkpoint
from hybridps.checkpoints.targets import TARGETS, ClientMismatchError, config_line, get_target

DATA = Path(__file__).parent / "data"
NAE_ANCHORS = [32, 64, 128, 256, 512]


@pytest.fixture(autouse=True)
def _offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(tmp_path / "registry.json"))
    monkeypatch.setenv("HYBRIDPS_OFFLINE", "1")


def _random(sd: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point()
            else torch.randint(1, 1000, v.shape, generator=g, dtype=v.dtype) for k, v in sd.items()}


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    return _random(torchvision.models.resnet50(weights=None).state_dict(), 0)


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    return _random(torchvision.models.resnet18(weights=None).state_dict(), 1)


def _run_dir(root: Path, backbone: dict[str, torch.Tensor], arch: str, anchors: list[int] | None,
             metadata: dict[str, str] | None = None, name: str = "run") -> Path:
    """A pre-training run directory (CONTRACTS 5) with trained-looking heads."""
    full = export(canonicalize(backbone), get_target("nae"), arch, seed=7).state_dict
    model = _random({k: v for k, v in full.items() if "cls_score" not in k and "reid_loss" not in k}, 3)
    run = root / f"{name}_{arch}"
    run.mkdir()
    save_file(model, str(run / "model.safetensors"), metadata={"style": "pytorch", **(metadata or {})})
    (run / "meta.json").write_text(json.dumps({"backbone": arch, "style": "pytorch"}))
    if anchors is not None:
        (run / "config.yaml").write_text(f"model:\n  backbone: {arch}\n  anchor_sizes: {anchors}\n"
                                         "  aspect_ratios: [0.5, 1.0, 2.0]\n")
    return run


# ------------------------------------------------------------------ 1. detectron2
def d2_align(model_keys: list[str], ckpt_keys: list[str]) -> dict[str, str]:
    """detectron2's ``align_and_update_state_dicts`` matching, reproduced (detectron2 is not on PyPI).

    detectron2/checkpoint/c2_model_loading.py @ 02b5c4e: a checkpoint key matches a model key
    equal to it or ending with ``"." + key``; the longest match wins; one checkpoint key
    matching two model keys raises.  The real ``DetectionCheckpointer(model).load`` on real
    C4 and FPN models runs in scripts/check_clients.sh.
    """
    out: dict[str, str] = {}
    used: dict[str, str] = {}
    for mk in sorted(model_keys):
        hits = [ck for ck in ckpt_keys if mk == ck or mk.endswith("." + ck)]
        if not hits:
            continue
        ck = max(hits, key=len)
        if ck in used:
            raise ValueError(f"{ck} matches {used[ck]} and {mk}")
        used[ck] = mk
        out[mk] = ck
    return out


def _d2_keys(name: str) -> dict[str, list[int]]:
    rows = [ln.split("\t") for ln in (DATA / f"detectron2_r50_{name}_keys.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]
    return {k: json.loads(shape) for k, shape in rows}


@pytest.mark.parametrize("model", ["c4", "fpn"])
def test_detectron2_export_fills_every_resnet_weight_of_c4_and_fpn_models(tmp_path, r50, model):
    torch.save(r50, tmp_path / "r50.pth")
    res = convert(tmp_path / "r50.pth", "detectron2", tmp_path / "d2.pkl", source_style="pytorch")
    arrays = load_checkpoint(res.out).state_dict
    assert "stem.conv1.weight" in arrays and "res5.2.conv3.norm.weight" in arrays
    assert not any(k.startswith("backbone.") for k in arrays)
    keys = _d2_keys(model)
    matched = d2_align(list(keys), list(arrays))
    resnet = [k for k in keys if ".stem." in f".{k}" or ".res" in k and "rpn" not in k]
    assert len(resnet) == 265 and set(resnet) <= set(matched), sorted(set(resnet) - set(matched))[:3]
    assert all(list(arrays[matched[k]].shape) == keys[k] for k in matched)
    assert len(set(matched.values())) == len(arrays), "every file key is used exactly once"


def test_pre_fix_bottom_up_names_matched_nothing_in_a_c4_model(r50):
    old = ["backbone.bottom_up." + k for k in ("stem.conv1.weight", "res2.0.conv1.weight", "res5.0.conv1.weight")]
    assert d2_align(list(_d2_keys("c4")), old) == {}
    assert len(d2_align(list(_d2_keys("fpn")), old)) == 3


# ------------------------------------------------------------------ 2. nae / seqnet containers
@pytest.mark.parametrize("target", ["seqnet", "nae"])
def test_nae_seqnet_default_is_the_container_torch_1_2_reads(tmp_path, r50, target, capsys):
    run = _run_dir(tmp_path, r50, "resnet50", NAE_ANCHORS)
    out = tmp_path / f"{target}.pth"
    assert cli.main(["convert", str(run), "--to", target, "--out", str(out)]) == 0
    assert "loads on torch 1.2" in capsys.readouterr().out
    assert not zipfile.is_zipfile(out), "torch 1.2 cannot read the zip container"
    sd = torch.load(out, weights_only=True)["model"]
    assert "rpn.head.conv.weight" in sd and "rpn.head.conv.0.0.weight" not in sd
    # current torchvision's own RPNHead reads the old names (its _load_from_state_dict remaps them)
    holder = torch.nn.Module()
    holder.rpn = torch.nn.Module()
    holder.rpn.head = torchvision.models.detection.rpn.RPNHead(1024, 15)
    holder.load_state_dict({k: v for k, v in sd.items() if k.startswith("rpn.")}, strict=True)
    assert torch.equal(holder.rpn.head.conv[0][0].weight, sd["rpn.head.conv.weight"])
    model = load_checkpoint(run / "model.safetensors").state_dict
    assert torch.equal(sd["rpn.head.conv.weight"], model["rpn.head.conv.0.0.weight"])


def test_legacy_container_with_new_rpn_names_is_refused(tmp_path, r50, capsys):
    run = _run_dir(tmp_path, r50, "resnet50", NAE_ANCHORS)
    with pytest.raises(ClientMismatchError, match=r"strict=False\) would leave the RPN conv random"):
        convert(run, "seqnet", tmp_path / "s.pth", legacy_rpn=False, legacy_format=True)
    assert cli.main(["convert", str(run), "--to", "seqnet", "--out", str(tmp_path / "s.pth"),
                     "--no-legacy-rpn", "--legacy-format"]) == 2
    assert "RPN conv random" in capsys.readouterr().err and not (tmp_path / "s.pth").exists()
    # asked for explicitly, the current-torch-only file is still written, and said so
    res = convert(run, "seqnet", tmp_path / "z.pth", legacy_rpn=False, legacy_format=False)
    assert zipfile.is_zipfile(res.out) and any("torch >= 1.6 only" in n for n in res.report.notes)
    with pytest.raises(ClientMismatchError, match="only applies to nae/seqnet"):
        convert(run, "psvis", tmp_path / "p.pth", legacy_rpn=True)
    with pytest.raises(ClientMismatchError, match="only applies to nae/seqnet"):
        convert(run, "psvis", tmp_path / "p.pth", fresh_rpn=True)


# ------------------------------------------------------------------ 3. psvis usage line
def test_psvis_usage_line_imports_what_psvis_exports():
    psvis = TARGETS["psvis"]
    line = config_line(psvis, "OUT.pth", "resnet50", "pytorch", 1, 1)
    assert line.startswith("from psvis.models.backbones import resnet50; model = resnet50(pretrained=False)")
    assert "psvis.resnet50" not in line and "hub/checkpoints/resnet50-ps12.pth" in line
    assert "hub/checkpoints/resnet18-ps15.pth" in config_line(psvis, "o", "resnet18", None, 1, 1)
    shuffle = config_line(psvis, "o", "shufflenetv1", None, 1, 1)
    assert shuffle.startswith("from psvis.models.backbones.shufflenet_v1 import shufflenetv1;")
    assert "shufflenetv1-ps19.pth" in shuffle
    assert config_line(psvis, "o", "resnet101", None, 1, 1).startswith(
        "from psvis.models.backbones import ResNet; model = ResNet(101)")


# ------------------------------------------------------------------ 4. what a client would reject or misuse
@pytest.mark.parametrize("target", ["nae", "seqnet"])
def test_resnet18_to_nae_or_seqnet_is_refused(tmp_path, r18, target, capsys):
    torch.save(r18, tmp_path / "r18.pth")
    out = tmp_path / f"{target}.pth"
    assert cli.main(["convert", str(tmp_path / "r18.pth"), "--to", target, "--out", str(out)]) == 2
    assert "hard-wires resnet50" in capsys.readouterr().err and not out.exists()
    res = convert(tmp_path / "r18.pth", target, out, force=True)
    assert any(n.startswith("WARNING (--force)") and "resnet18" in n for n in res.report.notes)


def test_rpn_for_other_anchors_is_refused_then_fresh_or_forced(tmp_path, r50, capsys):
    run = _run_dir(tmp_path, r50, "resnet50", [16, 32, 64, 128, 256])      # the tiny config's anchors
    out = tmp_path / "nae.pth"
    assert cli.main(["convert", str(run), "--to", "nae", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "anchor_sizes (16, 32, 64, 128, 256) vs nae's (32, 64, 128, 256, 512)" in err and not out.exists()
    model = load_checkpoint(run / "model.safetensors").state_dict

    fresh = convert(run, "nae", out, fresh_rpn=True)
    sd = torch.load(out, weights_only=True)["model"]
    assert not torch.equal(sd["rpn.head.cls_logits.weight"], model["rpn.head.cls_logits.weight"])
    assert float(sd["rpn.head.cls_logits.bias"].abs().sum()) == 0.0           # NAE's own init
    assert torch.equal(sd["roi_heads.box_head.layer4.0.conv1.weight"], model["roi_heads.box_head.layer4.0.conv1.weight"])
    unexpected = [k for c in fresh.report.modules.values() for k in c.unexpected]
    assert "rpn.head.cls_logits.weight" in unexpected
    assert any("--fresh-rpn" in n for n in fresh.report.notes)

    forced = convert(run, "nae", out, overwrite=True, force=True)
    sd = torch.load(out, weights_only=True)["model"]
    assert torch.equal(sd["rpn.head.cls_logits.weight"], model["rpn.head.cls_logits.weight"])
    assert any(n.startswith("WARNING (--force)") and "anchors" in n for n in forced.report.notes)


def test_rpn_anchors_from_file_metadata_and_unknown_anchors(tmp_path, r50):
    # pretrain/export.py records the anchors in model.safetensors, so a file copied out of its run still says
    run = _run_dir(tmp_path, r50, "resnet50", None, {"anchor_sizes": json.dumps([16, 32, 64, 128, 256])})
    with pytest.raises(ClientMismatchError, match="other anchors"):
        convert(run / "model.safetensors", "seqnet", tmp_path / "s.pth")
    ok = _run_dir(tmp_path, r50, "resnet50", NAE_ANCHORS, name="ok")
    res = convert(ok, "seqnet", tmp_path / "ok.pth")
    assert any("source RPN anchors match seqnet's" in n for n in res.report.notes)
    unknown = _run_dir(tmp_path, r50, "resnet50", None, name="unknown")
    res = convert(unknown, "seqnet", tmp_path / "u.pth")
    assert any(n.startswith("WARNING: the source's RPN anchors are unknown") for n in res.report.notes)


# ------------------------------------------------------------------ 5. clients that pip installs
def test_timm_loads_the_export_by_both_of_its_file_options(tmp_path, r50):
    import timm

    torch.save({k: v for k, v in r50.items() if not k.startswith("fc.")}, tmp_path / "r50.pth")
    res = convert(tmp_path / "r50.pth", "timm", tmp_path / "t.safetensors")
    m = timm.create_model("resnet50", pretrained=False, num_classes=0, checkpoint_path=str(res.out))   # strict
    assert torch.equal(m.state_dict()["layer3.5.conv2.weight"], r50["layer3.5.conv2.weight"])
    m = timm.create_model("resnet50", pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=str(res.out)))
    assert torch.equal(m.state_dict()["layer4.2.bn3.running_var"], r50["layer4.2.bn3.running_var"])
    assert m.eval()(torch.rand(1, 3, 64, 64)).shape == (1, 2048)


def test_torchvision_strict_and_psvis_export_into_torchvision(tmp_path, r50):
    torch.save(r50, tmp_path / "r50.pth")
    convert(tmp_path / "r50.pth", "torchvision", tmp_path / "tv.pth", with_fc=True)
    m = torchvision.models.resnet50(weights=None)
    m.load_state_dict(torch.load(tmp_path / "tv.pth"))                              # strict
    assert torch.equal(m.fc.weight, r50["fc.weight"])
    convert(tmp_path / "r50.pth", "psvis", tmp_path / "ps.pth")
    inc = torchvision.models.resnet50(weights=None).load_state_dict(
        torch.load(tmp_path / "ps.pth", weights_only=True)["state_dict"], strict=False)
    assert sorted(inc.missing_keys) == ["fc.bias", "fc.weight"] and not inc.unexpected_keys
