"""Search model: key layouts (NAE4PS, psvis), train/eval forward for every backbone kind,
proposal labelling with ignore regions, zero-box images, config validation."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from hybridps.pretrain.model import ModelConfig, build_search_model, tiny_config
from hybridps.pretrain.model.backbones import build_backbone
from hybridps.pretrain.model.shufflenet_v1 import ShuffleNetV1

REF = Path(__file__).parent / "data"  # peer key lists (see data/README.md)
LOSS_KEYS = {"loss_rpn_cls", "loss_rpn_reg", "loss_box_reg", "loss_det_cls", "loss_reid"}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_batch(zero_boxes: bool = False):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 120, generator=g)]
    if zero_boxes:
        empty = {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)}
        return images, [dict(empty), dict(empty)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 80.0], [60.0, 20.0, 90.0, 90.0]]),
         "pids": torch.tensor([3, -1]), "ignore": torch.tensor([[100.0, 0.0, 128.0, 96.0]])},
        {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)},
    ]
    return images, targets


def _reference_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in path.read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


# ------------------------------------------------------------------------------------ key layouts
def test_resnet50_state_dict_matches_nae4ps_reference():
    ref = _reference_shapes(REF / "nae4ps_state_dict_keys.tsv")
    expected = {k: v for k, v in ref.items() if not k.startswith("roi_heads.box_predictor.cls_score.")}
    expected["roi_heads.reid_loss.header_cq"] = ()      # our queue pointer is a saved buffer
    with torch.device("meta"):
        model = build_search_model(ModelConfig(backbone="resnet50", num_pids=5532, cq_size=5000))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(got) == set(expected), (set(got) ^ set(expected))
    assert got == expected
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"backbone.conv1.weight", "backbone.bn1.weight", "backbone.bn1.bias"}


def test_backbone_state_dicts_match_psvis_keys():
    psvis = json.loads((REF / "psvis_keys.json").read_text())
    for name, arch in (("resnet50", "resnet50"), ("resnet18", "resnet18"), ("shufflenet", "shufflenetv1")):
        with torch.device("meta"):
            model = build_search_model(ModelConfig(backbone=name, num_pids=4, cq_size=4))
        got = {k: list(v.shape) for k, v in model.backbone_state_dict().items()}
        assert got == {k: shape for k, shape, _ in psvis[arch]}, name


def test_shufflenet_loads_psvis_shaped_weights_strictly():
    psvis = json.loads((REF / "psvis_keys.json").read_text())["shufflenetv1"]
    dtypes = {"torch.float32": torch.float32, "torch.int64": torch.int64}
    state = {k: torch.zeros(shape, dtype=dtypes[dt]) for k, shape, dt in psvis}
    net = ShuffleNetV1(groups=3)
    net.load_state_dict(state, strict=True)
    outs = net(torch.rand(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [240, 480, 960]
    assert [o.shape[-1] for o in outs] == [8, 4, 2]


# ------------------------------------------------------------------------------ train / eval paths
def _check_train_eval(cfg: ModelConfig) -> None:
    torch.manual_seed(0)
    model = build_search_model(cfg)
    images, targets = tiny_batch()
    targets[0]["need_emb"] = torch.tensor([True, True])     # GT embeddings are made only for flagged boxes
    losses, feats = model(images, targets, return_features=True)
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    r = feats["roi_batch_idx"].shape[0]
    assert feats["roi_maps"].shape == (r, model.c4_channels, cfg.roi_output_size, cfg.roi_output_size)
    assert feats["box_vecs"].shape == (r, model.c5_channels)
    assert feats["reid_emb"].shape == (r, cfg.emb_dim)
    assert feats["img_feat"].shape[:2] == (2, model.c4_channels)
    assert [g.shape for g in feats["gt_emb_raw"]] == [(2, cfg.emb_dim), (0, cfg.emb_dim)]
    model.eval()
    with torch.no_grad():
        dets = model(images)
        queries = model.extract_query(images, [targets[0]["boxes"], torch.zeros(0, 4)])
    assert len(dets) == 2
    for det, img in zip(dets, images):
        n = det["boxes"].shape[0]
        assert det["scores"].shape == (n,) and det["embeddings"].shape == (n, cfg.emb_dim)
        if n:
            assert torch.allclose(det["embeddings"].norm(dim=1), torch.ones(n), atol=1e-4)
            assert det["boxes"][:, 2].max() <= img.shape[-1] + 1e-3 and det["boxes"][:, 3].max() <= img.shape[-2] + 1e-3
    assert queries[0].shape == (2, cfg.emb_dim) and queries[1].shape == (0, cfg.emb_dim)
    assert torch.allclose(queries[0].norm(dim=1), torch.ones(2), atol=1e-4)


def test_resnet18_train_and_eval_with_contract_roi_size():
    _check_train_eval(tiny_config(roi_output_size=14))


@pytest.mark.parametrize("backbone", ["shufflenet", "timm:resnet10t", "timm:mobilenetv3_small_050",
                                      "timm:mambaout_femto"])   # the last one works channels-last
def test_other_backbones_train_and_eval(backbone):
    _check_train_eval(tiny_config(backbone=backbone))


def test_timm_backbone_keeps_timm_names():
    import timm
    parts = build_backbone("timm:resnet10t")
    ref = timm.create_model("resnet10t", num_classes=0).state_dict()
    got = {**parts.body.state_dict(), **parts.head.state_dict()}
    assert set(got) == set(ref) and (parts.c4_channels, parts.c5_channels) == (256, 512)


def test_zero_box_images_train():
    model = build_search_model(tiny_config())
    images, targets = tiny_batch(zero_boxes=True)
    losses, feats = model(images, targets, return_features=True)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_reid"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    sum(losses.values()).backward()
    assert [g.shape[0] for g in feats["gt_emb_raw"]] == [0, 0]


def test_sampled_oim_option_reaches_the_model_and_trains():
    model = build_search_model(tiny_config(oim_sample=4))
    assert model.roi_heads.reid_loss.sample == 4
    images, targets = tiny_batch()
    losses = model(images, targets)
    assert torch.isfinite(losses["loss_reid"]) and losses["loss_reid"].item() > 0
    sum(losses.values()).backward()
    cols = model.roi_heads.reid_loss.last_columns
    assert cols is not None and cols.numel() == 4         # 16 ids in the tiny config, 4 scored
    with pytest.raises(ValueError, match="oim_sample"):
        tiny_config(oim_sample=-1)


def test_outputs_do_not_mutate_caller_targets():
    model = build_search_model(tiny_config(min_size=192, max_size=256))
    images, targets = tiny_batch()
    before = targets[0]["boxes"].clone(), targets[0]["ignore"].clone()
    model(images, targets)
    assert torch.equal(targets[0]["boxes"], before[0]) and torch.equal(targets[0]["ignore"], before[1])


# ------------------------------------------------------------------------------------- labelling
def test_proposal_labels_with_ignore_zone_and_ignore_regions():
    heads = build_search_model(tiny_config()).roi_heads
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "pids": torch.tensor([7]),
              "ignore": torch.tensor([[50.0, 50.0, 100.0, 100.0]])}
    proposals = torch.tensor([
        [0.0, 0.0, 10.0, 10.0],     # IoU 1 -> person, pid 7
        [0.0, 0.0, 10.0, 25.0],     # IoU 0.4 -> ignore zone [0.1, 0.5)
        [20.0, 20.0, 30.0, 30.0],   # IoU 0 -> background
        [60.0, 60.0, 70.0, 70.0],   # background inside an ignore region -> ignored
    ])
    det, pids, matched = heads.label_proposals(proposals, target)
    assert det.tolist() == [1, -1, 0, -1]
    assert int(pids[0]) == 7 and torch.equal(matched[0], target["boxes"][0])
    empty = {"boxes": torch.zeros(0, 4), "pids": torch.zeros(0, dtype=torch.long)}
    det, _, _ = heads.label_proposals(proposals, empty)
    assert det.tolist() == [0, 0, 0, 0]


def test_rpn_ignores_background_anchors_inside_ignore_regions():
    rpn = build_search_model(tiny_config()).rpn
    anchors = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [60.0, 60.0, 70.0, 70.0], [20.0, 20.0, 30.0, 30.0]])]
    target = {"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "ignore": torch.tensor([[50.0, 50.0, 100.0, 100.0]])}
    labels, _ = rpn.assign_targets_to_anchors(anchors, [target])
    assert labels[0].tolist() == [1.0, -1.0, 0.0]


# ------------------------------------------------------------------------------ options / errors
def test_frozen_bn_keeps_running_stats_and_keys():
    model = build_search_model(tiny_config(norm_layer="frozen_bn"))
    model.train()
    bn = model.backbone.layer1[0].bn1
    assert not bn.training and not bn.weight.requires_grad
    assert model.roi_heads.embedding_head.rescaler.training
    before = bn.running_mean.clone()
    images, targets = tiny_batch()
    model(images, targets)
    assert torch.equal(bn.running_mean, before)
    assert set(model.state_dict()) == set(build_search_model(tiny_config()).state_dict())


def test_config_validation_messages():
    with pytest.raises(ValueError, match="pretrained"):
        ModelConfig(pretrained="yes")
    with pytest.raises(ValueError, match="norm_layer"):
        ModelConfig(norm_layer="gn")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_search_model(tiny_config(backbone="vgg"))
    with pytest.raises(ValueError, match="targets\\[0\\] has a box"):
        build_search_model(tiny_config())([torch.rand(3, 32, 32)],
                                          [{"boxes": torch.tensor([[5.0, 5.0, 5.0, 9.0]]), "pids": torch.tensor([0])}])


@pytest.mark.skipif(
    os.path.exists(os.path.join(torch.hub.get_dir(), "checkpoints", "resnet18-f37072fd.pth")),
    reason="ImageNet weights are cached here, so the offline failure cannot be observed")
def test_imagenet_weights_offline_fail_with_clear_message():
    with pytest.raises(RuntimeError, match="could not obtain ImageNet weights.*pretrained: false"):
        build_search_model(tiny_config(pretrained="imagenet"))


def test_gt_embeddings_match_a_direct_computation():
    torch.manual_seed(0)
    model = build_search_model(tiny_config(roi_batch_size=4))
    model.train()
    for m in model.modules():                 # batch-independent rows make the check exact
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    images, targets = tiny_batch()
    targets[1] = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 70.0], [50.0, 10.0, 80.0, 75.0], [90.0, 0.0, 118.0, 60.0]]),
                  "pids": torch.tensor([0, 1, -1])}
    for t in targets:
        t["need_emb"] = torch.ones(t["boxes"].shape[0], dtype=torch.bool)
    _, feats = model(images, targets, return_features=True)
    with torch.no_grad():
        image_list, scaled, _ = model._prepare(images, targets)
        c4 = model.backbone(image_list.tensors)
        heads = model.roi_heads
        ref = heads.embedding_head.project(
            heads.roi_features({"feat_res4": c4}, [t["boxes"] for t in scaled], image_list.image_sizes))
    got = torch.cat(feats["gt_emb_raw"]).detach()
    assert got.shape == (5, 256) and torch.allclose(got, ref, atol=1e-4)


def test_channels_last_timm_backbone_keeps_names_and_gives_nchw():
    import timm
    parts = build_backbone("timm:mambaout_femto")
    assert parts.body.nhwc_out and parts.head.nhwc_in
    ref = timm.create_model("mambaout_femto", num_classes=0).state_dict()
    got = {**parts.body.state_dict(), **parts.head.state_dict()}
    assert set(got) <= set(ref) and all(k.startswith(("stem", "stages")) for k in got)
    assert parts.body(torch.rand(1, 3, 64, 96)).shape[1] == parts.c4_channels
    assert parts.head(torch.rand(2, parts.c4_channels, 14, 14)).shape[1] == parts.c5_channels
