"""Key layouts: exact key sets of the reference models, strict loads, bit-exact round trips."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
import torchvision

from hybridps.checkpoints import arch as archs
from hybridps.checkpoints.convert import canonicalize, convert, export, read_source, to_canonical
from hybridps.checkpoints.layouts import detect_layout
from hybridps.checkpoints.layouts.base import detect_arch_canonical
from hybridps.checkpoints.layouts.detectron2 import from_d2, to_d2
from hybridps.checkpoints.report import InsufficientMatchError, load_into
from hybridps.checkpoints.targets import get_target

REF = Path(__file__).parent / "data"  # peer key lists (see data/README.md)


def _tsv(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (REF / name).read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")[:2]
            out[key] = tuple(ast.literal_eval(shape))
    return out


def _randomised(sd: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Distinct values everywhere (incl. num_batches_tracked) so copies and swaps are visible."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point():
            out[k] = torch.randn(v.shape, generator=g)
        else:
            out[k] = torch.randint(1, 1000, v.shape, generator=g, dtype=v.dtype)
    return out


@pytest.fixture(scope="module")
def r50() -> dict[str, torch.Tensor]:
    return _randomised(torchvision.models.resnet50(weights=None).state_dict())


@pytest.fixture(scope="module")
def r18() -> dict[str, torch.Tensor]:
    return _randomised(torchvision.models.resnet18(weights=None).state_dict(), seed=1)


def _export(sd, target, **opts):
    canon = canonicalize(sd)
    return export(canon, get_target(target), detect_arch_canonical(canon.state_dict), **opts)


# ------------------------------------------------------------------ key sets
@pytest.mark.parametrize("target,tsv", [("nae", "nae4ps_state_dict_keys.tsv"), ("seqnet", "seqnet_state_dict_keys.tsv")])
@pytest.mark.parametrize("pids,cq", [(5532, 5000), (482, 500)])
def test_full_model_exports_match_reference_key_sets(r50, target, tsv, pids, cq):
    ref = _tsv(tsv)
    ref["roi_heads.reid_loss.lut"] = (pids, 256)
    ref["roi_heads.reid_loss.cq"] = (cq, 256)
    conv = _export(r50, target, num_pids=pids, cq_size=cq)
    got = {k: tuple(v.shape) for k, v in conv.state_dict.items()}
    assert set(got) == set(ref)
    assert got == ref
    assert list(got) == list(ref), "key order should follow the reference dump"
    assert not conv.missing
    sd = conv.state_dict
    assert all(sd[k].dtype == torch.int64 for k in sd if k.endswith("num_batches_tracked"))
    assert torch.count_nonzero(sd["roi_heads.reid_loss.lut"]) == 0 and torch.count_nonzero(sd["roi_heads.reid_loss.cq"]) == 0
    assert torch.equal(sd["backbone.layer3.5.conv2.weight"], r50["layer3.5.conv2.weight"])
    assert torch.equal(sd["roi_heads.box_head.layer4.2.bn3.running_var"], r50["layer4.2.bn3.running_var"])
    if target == "seqnet":
        for k in (k for k in sd if k.startswith("roi_heads.reid_head.")):
            assert torch.equal(sd[k], sd[k.replace("reid_head", "box_head")])


def test_fresh_heads_follow_reference_init(r50):
    sd = _export(r50, "seqnet").state_dict
    assert 0.005 < sd["rpn.head.conv.0.0.weight"].std() < 0.015 and torch.count_nonzero(sd["rpn.head.conv.0.0.bias"]) == 0
    resc = "roi_heads.embedding_head.rescaler."
    assert torch.equal(sd[resc + "weight"], torch.ones(1)) and torch.equal(sd[resc + "running_var"], torch.ones(1))
    bound = 1 / 2048 ** 0.5   # torchvision FastRCNNPredictor: nn.Linear default init
    w = sd["roi_heads.faster_rcnn_predictor.cls_score.weight"]
    assert w.abs().max() <= bound and w.std() > bound / 4
    nae = _export(r50, "nae").state_dict
    assert 0.005 < nae["roi_heads.box_predictor.cls_score.weight"].std() < 0.015


def test_legacy_rpn_names(r50):
    keys = set(_export(r50, "nae", legacy_rpn=True).state_dict)
    assert {"rpn.head.conv.weight", "rpn.head.conv.bias"} <= keys
    assert not any(k.startswith("rpn.head.conv.0.0") for k in keys)


@pytest.mark.parametrize("arch", ["resnet50", "resnet18", "shufflenetv1"])
def test_psvis_export_matches_released_key_dump(arch, r50, r18):
    ref = {k: (tuple(s), d) for k, s, d in json.loads((REF / "psvis_keys.json").read_text())[arch]}
    tmpl = archs.template(arch)
    assert {k: (s, str(d)) for k, (s, d) in tmpl.items()} == ref
    assert list(tmpl) == list(ref)
    if arch == "shufflenetv1":
        src = {k: (torch.randn(s) if d == "torch.float32" else torch.tensor(7)) for k, (s, d) in ref.items()}
    else:
        src = {k: v for k, v in (r50 if arch == "resnet50" else r18).items() if not k.startswith("fc.")}
    assert detect_layout(src) == "psvis"
    conv = _export(src, "psvis")
    assert list(conv.state_dict) == list(ref) and not conv.missing
    assert all(torch.equal(conv.state_dict[k], src[k]) for k in ref)


def test_shufflenet_last_stage_is_the_roi_head():
    src = {k: torch.zeros(s, dtype=d) for k, (s, d) in archs.template("shufflenetv1").items()}
    canon = to_canonical(src, "psvis")
    assert "roi_heads.box_head.layers.2.0.g_conv_1x1_compress.conv.weight" in canon
    assert "backbone.layers.1.7.g_conv_1x1_expand.bn.bias" in canon and "backbone.conv1.conv.weight" in canon
    with pytest.raises(ValueError, match="resnet backbones, not shufflenetv1"):
        export(canonicalize(src), get_target("nae"), "shufflenetv1")


# -------------------------------------------------------------- strict loads
@pytest.mark.parametrize("name", ["resnet50", "resnet18"])
def test_strict_torchvision_and_timm_loads(tmp_path, name, r50, r18):
    import timm

    sd = r50 if name == "resnet50" else r18
    no_fc = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    torch.save(no_fc, tmp_path / "src.pth")
    with_fc = convert(tmp_path / "src.pth", "torchvision", tmp_path / "tv.pth", with_fc=True)
    assert any("fc was not in the source" in n for n in with_fc.report.notes)
    getattr(torchvision.models, name)(weights=None).load_state_dict(torch.load(tmp_path / "tv.pth"), strict=True)
    convert(tmp_path / "src.pth", "timm", tmp_path / "timm.safetensors")
    m = timm.create_model(name, pretrained=False, num_classes=0, checkpoint_path=str(tmp_path / "timm.safetensors"))
    assert torch.equal(m.state_dict()["layer2.0.conv2.weight"], sd["layer2.0.conv2.weight"])
    torch.save(sd, tmp_path / "src_fc.pth")
    convert(tmp_path / "src_fc.pth", "timm", tmp_path / "timm_fc.safetensors", with_fc=True)
    m = timm.create_model(name, pretrained=False, checkpoint_path=str(tmp_path / "timm_fc.safetensors"))
    assert torch.equal(m.state_dict()["fc.weight"], sd["fc.weight"]), "fc must come from the source when present"


# -------------------------------------------------------------- round trips
BACKBONE_TARGETS = ["hybridps", "torchvision", "timm", "psvis", "mmdet", "alignps", "roi_alignps", "psdiff",
                    "nae", "seqnet"]


@pytest.mark.parametrize("target", BACKBONE_TARGETS)
def test_round_trip_through_files_is_bit_exact(tmp_path, r18, target):
    src = tmp_path / "r18.pth"
    torch.save(r18, src)
    suffix = get_target(target).suffix
    res = convert(src, target, tmp_path / f"x{suffix}", force=True, source_style="pytorch", num_pids=10, cq_size=5)
    back = convert(res.out, "torchvision", tmp_path / "back.pth", with_fc=True, force=True)
    got = torch.load(back.out, weights_only=True)
    assert set(got) == set(r18)
    for k, v in r18.items():
        if k.startswith("fc."):
            continue
        if k.endswith("num_batches_tracked") and get_target(target).layout == "detectron2":
            assert int(got[k]) == 0     # detectron2 FrozenBN has no such buffer
            continue
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_detectron2_names_follow_reference_table():
    assert to_d2("bn1.running_mean") == "stem.conv1.norm.running_mean"
    assert to_d2("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
    assert to_d2("layer1.0.downsample.1.bias") == "res2.0.shortcut.norm.bias"
    assert to_d2("layer4.2.bn3.weight") == "res5.2.conv3.norm.weight"
    assert to_d2("layer3.5.conv2.weight") == "res4.5.conv2.weight"
    for k in archs.template("resnet50"):
        assert from_d2(to_d2(k)) == k


def test_detectron2_c4_names_are_read(r18):
    """A detectron2 C4 model keeps res5 in roi_heads; it maps to our RoI head."""
    d2 = {}
    for k, v in r18.items():
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            continue
        name = to_d2(k)
        d2[("roi_heads." if name.startswith("res5") else "backbone.") + name] = v
    d2["proposal_generator.rpn_head.conv.weight"] = torch.zeros(1)
    assert detect_layout(d2) == "detectron2"
    conv = canonicalize(d2)
    assert torch.equal(conv.state_dict["roi_heads.box_head.layer4.1.conv2.weight"], r18["layer4.1.conv2.weight"])
    assert "proposal_generator.rpn_head.conv.weight" in conv.unused


# ---------------------------------------------------------- heads / reports
def _full_canonical(r50):
    """A state_dict with our model's exact key list (NAE4PS minus cls_score and OIM buffers)."""
    nae = _export(r50, "nae", seed=3).state_dict
    return {k: v for k, v in nae.items() if "cls_score" not in k and "reid_loss" not in k}


def test_trained_heads_are_carried_not_reinitialised(r50):
    canon = _full_canonical(r50)
    assert detect_layout(canon) == "hybridps"
    seq = _export(canon, "seqnet", seed=99)
    for k in ("rpn.head.cls_logits.weight", "roi_heads.embedding_head.projectors.feat_res5.0.weight",
              "roi_heads.box_predictor.bbox_pred.1.running_mean"):
        assert torch.equal(seq.state_dict[k], canon[k]) and seq.source_of[k] == k
    rep = seq.report("t")
    assert len(rep.modules["rpn"].loaded) == 6 and not rep.modules["rpn"].initialised
    assert set(rep.modules["faster_rcnn_predictor"].initialised) == {
        k for k in seq.state_dict if "faster_rcnn_predictor" in k}


def test_roi_alignps_carries_heads_with_mmdet_names(r50):
    canon = _full_canonical(r50)
    sd = _export(canon, "roi_alignps").state_dict
    assert torch.equal(sd["roi_head.shared_head.layer4.0.conv2.weight"], r50["layer4.0.conv2.weight"])
    assert torch.equal(sd["backbone.layer4.0.conv2.weight"], r50["layer4.0.conv2.weight"])
    assert torch.equal(sd["rpn_head.rpn_conv.weight"], canon["rpn.head.conv.0.0.weight"])
    assert sd["rpn_head.rpn_cls.weight"].shape == (15, 1024, 1, 1)
    w8 = canon["roi_heads.box_predictor.bbox_pred.0.weight"]
    assert torch.equal(sd["roi_head.bbox_head.fc_reg.0.weight"], w8[4:8])
    assert sd["roi_head.bbox_head.fc_reg.1.running_mean"].shape == (4,)
    assert torch.equal(sd["roi_head.bbox_head.embedding_head.projectors.1.0.weight"],
                       canon["roi_heads.embedding_head.projectors.feat_res5.0.weight"])
    back = to_canonical(sd)
    assert torch.equal(back["roi_heads.embedding_head.rescaler.weight"], canon["roi_heads.embedding_head.rescaler.weight"])
    assert torch.equal(back["roi_heads.box_predictor.bbox_pred.0.weight"][4:8], w8[4:8])


def test_nae_and_seqnet_back_to_canonical(r50):
    canon = _full_canonical(r50)
    for target in ("nae", "seqnet"):
        sd = _export(canon, target).state_dict
        assert detect_layout(sd) == target
        conv = canonicalize(sd)
        assert set(conv.state_dict) == set(canon)
        assert "roi_heads.reid_loss.lut" in conv.unused


def test_zero_key_load_is_refused():
    model = torchvision.models.resnet18(weights=None)
    prefixed = {"backbone." + k: v for k, v in model.state_dict().items()}
    with pytest.raises(InsufficientMatchError, match="0 keys matched"):
        load_into(model, prefixed)
    half = dict(list(model.state_dict().items())[:20])
    with pytest.raises(InsufficientMatchError, match="threshold"):
        load_into(model, half, min_fraction=0.5)
    rep = load_into(model, half, min_fraction=0.1)
    assert 0.1 < rep.matched_fraction < 0.5


def test_conversion_with_nothing_usable_is_refused(tmp_path, r18):
    only_heads = {"rpn.head.cls_logits.weight": torch.zeros(15, 256, 1, 1), "backbone.body.foo": torch.zeros(1)}
    torch.save(only_heads, tmp_path / "heads.pth")
    with pytest.raises(Exception, match="cannot tell the backbone|0 keys"):
        convert(tmp_path / "heads.pth", "seqnet", tmp_path / "o.pth")
    assert not (tmp_path / "o.pth").exists()
    partial = {k: v for k, v in r18.items() if k.startswith(("conv1", "bn1", "layer1"))}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(Exception):
        convert(tmp_path / "partial.pth", "psvis", tmp_path / "p.pth")
    assert not (tmp_path / "p.pth").exists()


def test_read_source_picks_layout_from_file_metadata(tmp_path, r18):
    res = convert_to(tmp_path, r18, "mmdet")
    src = read_source(res.out)
    assert src.layout == "mmdet" and src.style == "pytorch"


def convert_to(tmp_path, sd, target):
    torch.save(sd, tmp_path / "s.pth")
    return convert(tmp_path / "s.pth", target, tmp_path / f"t{get_target(target).suffix}", source_style="pytorch")


def test_extra_pretraining_modules_are_tolerated_and_reported(r50):
    canon = _full_canonical(r50)
    canon["roi_heads.simsiam_predictor.0.weight"] = torch.zeros(4, 4)
    assert detect_layout(canon) == "hybridps"
    conv = canonicalize(canon)
    assert "roi_heads.simsiam_predictor.0.weight" in conv.unused
    assert "roi_heads.simsiam_predictor.0.weight" not in conv.state_dict
