"""The hybrid method against the paper and its reference code (one test per fix).

Each test names what the reference does and fails on the behaviour it replaced.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hybridps.pretrain.hybrid import HybridConfig, HybridModel, LossConfig
from hybridps.pretrain.losses.iam import IntraTaskAlignment, consistency_loss, domain_ce
from hybridps.pretrain.losses.oim import OIMLoss
from hybridps.pretrain.losses.simsiam import PredictionMLP
from hybridps.pretrain.model import tiny_config
from hybridps.pretrain.model.norm import convert_sync_batchnorm
from hybridps.pretrain.model.roi_heads import NAERoIHeads
from hybridps.pretrain.model.search_model import build_search_model
from hybridps.pretrain.optim import param_groups
from tests.test_hybrid import make_batch

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------- 1. consistency path
def test_sgd_step_on_the_features_lowers_the_consistency_term():
    """DA Faster R-CNN feeds L_cst through a non-reversing path: descending the total loss
    w.r.t. the features must make the two levels agree more, not less."""
    torch.manual_seed(0)
    iam = IntraTaskAlignment(8, 6, num_domains=3, grl_coef=1.0, img_hidden=16, ins_hidden=16)
    img = torch.randn(2, 8, 5, 5, requires_grad=True)
    ins = torch.randn(6, 6, requires_grad=True)
    dom = torch.tensor([0, 2])
    idx = torch.tensor([0, 0, 0, 1, 1, 1])
    out = iam(img, dom, ins, idx)
    out["loss_cst"].backward()
    with torch.no_grad():
        img2, ins2 = img - 0.5 * img.grad, ins - 0.5 * ins.grad
        after = iam(img2, dom, ins2, idx)["loss_cst"]
    assert after.item() < out["loss_cst"].item()


def test_adversarial_terms_still_reverse_the_feature_gradient_with_the_coefficient():
    torch.manual_seed(0)
    iam = IntraTaskAlignment(4, 3, num_domains=2, grl_coef=0.1, img_hidden=8, ins_hidden=8)
    img = torch.randn(2, 4, 3, 3, requires_grad=True)
    dom = torch.tensor([0, 1])
    loss = iam(img, dom, torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))["loss_img"]
    g_feat, g_head = torch.autograd.grad(loss, [img, iam.img_cls.img_head.weight])
    # the same loss without the GRL: the features get -0.1 x its gradient, the head the full one
    ref_loss = domain_ce(iam.img_cls(img), dom)
    r_feat, r_head = torch.autograd.grad(ref_loss, [img, iam.img_cls.img_head.weight])
    assert torch.allclose(g_feat, -0.1 * r_feat, atol=1e-7)
    assert torch.allclose(g_head, r_head, atol=1e-7)


# ---------------------------------------------------------------------------- 2. per-position CE
def test_image_level_loss_is_per_position_cross_entropy():
    logits = torch.tensor([[[[4.0, -4.0]], [[-4.0, 4.0]]]])       # [1,2,1,2]: position 0 says 0, 1 says 1
    dom = torch.tensor([0])
    per_pos = (F.cross_entropy(torch.tensor([[4.0, -4.0]]), dom) + F.cross_entropy(torch.tensor([[-4.0, 4.0]]), dom)) / 2
    assert domain_ce(logits, dom).item() == pytest.approx(per_pos.item(), rel=1e-6)
    # pooling the logits first (the old behaviour) would give log(2)
    assert abs(domain_ce(logits, dom).item() - math.log(2)) > 1.0


# ---------------------------------------------------------------------------- 3. padding
def test_image_level_terms_ignore_padding_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 6)
    dom = torch.tensor([1, 2])
    mask = torch.zeros(2, 4, 6, dtype=torch.bool)
    mask[0, :, :3] = True
    mask[1] = True
    changed = logits.clone()
    changed[0, :, :, 3:] = 100.0 * torch.randn(3, 4, 3)           # padding content must not matter
    assert domain_ce(logits, dom, mask).item() == pytest.approx(domain_ce(changed, dom, mask).item(), rel=1e-6)
    ins = torch.randn(3, 3)
    idx = torch.tensor([0, 1, 1])
    assert consistency_loss(logits, ins, idx, mask).item() == pytest.approx(
        consistency_loss(changed, ins, idx, mask).item(), rel=1e-6)


def test_detection_iam_sees_only_the_valid_area_of_mixed_aspect_batches():
    model = HybridModel(tiny_config(), HybridConfig(num_domains=3, iam_hidden=16))
    batch = make_batch()
    # sample 0 becomes a portrait canvas next to the landscape sample 1
    for view in ("view1", "view2"):
        batch[view]["images"][0] = torch.rand(3, 128, 64)
        batch[view]["targets"][0]["boxes"] = torch.tensor([[5.0, 10.0, 40.0, 110.0], [20.0, 20.0, 60.0, 120.0]])
    seen = {}

    def grab(module, args):
        seen.setdefault("mask", args[4])

    model.det_iam.register_forward_pre_hook(grab)
    out = model(batch)
    mask = seen["mask"]
    assert mask is not None and not bool(mask.all())
    assert 0.0 < out["pad_frac"].item() < 1.0
    valid = mask.float().mean().item()
    assert valid == pytest.approx(1.0 - out["pad_frac"].item(), abs=0.15)


# ---------------------------------------------------------------------------- 4. GRL vs loss weight
def test_reference_split_of_loss_weight_and_reversal_coefficient_is_the_default():
    cfg, lc = HybridConfig(), LossConfig()
    assert cfg.grl_coef == 0.1 and lc.lambda_adv == 1.0 and lc.w_cst == 0.1
    model = HybridModel(tiny_config(), HybridConfig(num_domains=3, grl_coef=0.25, iam_hidden=16))
    assert model.det_iam.grl.coef == 0.25 and model.reid_iam.grl.coef == 0.25
    out = model(make_batch())
    assert {"acc_det_img", "acc_det_ins", "acc_reid_img", "acc_reid_ins"} <= set(out)


# ---------------------------------------------------------------------------- 5. re-ID IAM on fg
def test_reid_iam_sees_only_foreground_rois():
    torch.manual_seed(0)
    model = HybridModel(tiny_config(), HybridConfig(num_domains=3, iam_hidden=16))
    seen = []
    model.reid_iam.register_forward_pre_hook(lambda m, args: seen.append(args[2].shape[0]))
    fg_counts = []
    heads = model.search_model.roi_heads
    original = heads._train_forward

    def spy(*a, **k):
        losses, feats = original(*a, **k)
        fg_counts.append(int(feats["roi_fg"].sum()))
        assert int(feats["roi_fg"].sum()) < feats["roi_fg"].numel()   # background RoIs exist
        return losses, feats

    heads._train_forward = spy
    model(make_batch())
    assert seen == fg_counts


# ---------------------------------------------------------------------------- 6. OIM two-view positive
def test_oim_positive_override_uses_the_given_vector_for_the_own_identity_only():
    oim = OIMLoss(dim=4, num_pids=3, cq_size=2, scalar=10.0)
    x = F.normalize(torch.tensor([[1.0, 0.2, 0.0, 0.0], [0.0, 1.0, 0.0, 0.3]]), dim=1)
    labels = torch.tensor([2, 0])
    other = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]])
    loss = oim(x, labels, positive=(other, torch.tensor([True, False])))
    # LUT and queue are zero: every logit 0 except row 0's own column = 10 * cos(x0, other0)
    l0 = torch.zeros(5); l0[2] = 10.0 * F.normalize(other[0:1], dim=1)[0] @ x[0]
    expected = 0.5 * (F.cross_entropy(l0[None], torch.tensor([2])) + F.cross_entropy(torch.zeros(1, 5), torch.tensor([0])))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert float(oim.lut.abs().sum()) == 0.0          # the tables are not touched by the override


def test_two_view_option_gives_pseudo_identities_a_positive():
    torch.manual_seed(0)
    batch = make_batch(labeled=(False, False))
    for view in ("view1", "view2"):
        batch[view]["targets"][0]["pids"] = torch.tensor([7, 8])
        batch[view]["targets"][1]["pids"] = torch.tensor([9, 10])
    cfg = tiny_config(num_pids=16)
    plain = HybridModel(cfg, HybridConfig(num_domains=3, iam_hidden=16, loss=LossConfig(oim_two_view=False)))
    torch.manual_seed(0)
    two = HybridModel(cfg, HybridConfig(num_domains=3, iam_hidden=16, loss=LossConfig(oim_two_view=True)))
    two.load_state_dict(plain.state_dict())
    a, b = plain(batch)["loss_reid"].item(), two(batch)["loss_reid"].item()
    # with an empty LUT every logit is 0 (loss log(N+Q)); the other view's embedding is a real positive
    assert a == pytest.approx(math.log(16 + cfg.cq_size), rel=1e-4)
    assert b < a


# ---------------------------------------------------------------------------- 8. smooth-L1 beta
def test_box_loss_uses_smooth_l1_beta_one_like_nae():
    deltas = torch.tensor([[0.5, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    targets = torch.zeros(2, 4)
    fg = torch.tensor([True, False])
    # beta 1: 0.5 * 0.5^2 / 1 = 0.125, divided by all 2 sampled rows
    assert NAERoIHeads._box_loss(deltas, targets, fg, 1.0).item() == pytest.approx(0.0625)
    assert tiny_config().box_loss_beta == 1.0
    from hybridps.finetune.config import default_config_path, load_config   # fine-tuning builds the same head
    assert load_config(default_config_path("prw")).model.box_loss_beta == 1.0


# ---------------------------------------------------------------------------- 9. SyncBN
def test_predictor_runs_every_step_whatever_the_rows():
    pred = PredictionMLP(8, 4).train()
    for n in (0, 1, 5):
        assert pred(torch.randn(n, 8)).shape == (n, 8)      # plain BN: < 2 rows use running stats
    # with SyncBatchNorm the BN itself is entered for any row count (it joins the collective;
    # outside a process group torch runs it as a plain BN, which cannot normalise one row)
    sync = convert_sync_batchnorm(PredictionMLP(8, 4)).train()
    assert isinstance(sync.layer1[1], nn.SyncBatchNorm)
    entered = []
    sync.layer1[1].register_forward_pre_hook(lambda m, a: entered.append(a[0].shape[0]))
    for n in (0, 1, 5):
        try:
            sync(torch.randn(n, 8))
        except ValueError:
            assert n == 1
    assert entered == [0, 1, 5]


def test_hybrid_calls_the_predictor_once_per_view_even_without_pairs():
    model = HybridModel(tiny_config(), HybridConfig(num_domains=3, iam_hidden=16))
    calls = []
    model.predictor.register_forward_hook(lambda *a: calls.append(1))
    model(make_batch(labeled=(True, True)))        # no unlabeled sample: no pair, no GT row
    model(make_batch(labeled=(True, False)))
    assert len(calls) == 4


def test_frozen_bn_flags_survive_syncbn_conversion():
    model = build_search_model(tiny_config(norm_layer="frozen_bn"))
    frozen = [n for n, m in model.named_modules() if getattr(m, "_hybridps_frozen", False)]
    assert len(frozen) >= 20
    model = convert_sync_batchnorm(model)
    after = [n for n, m in model.named_modules() if getattr(m, "_hybridps_frozen", False)]
    assert after == frozen
    model.train()
    assert all(not m.training for n, m in model.named_modules() if n in set(frozen))
    syncs = [m for m in model.modules() if isinstance(m, nn.SyncBatchNorm)]
    assert syncs and all(s.training for s in syncs)     # the embedding head's BNs are synchronised
    plain = build_search_model(tiny_config())
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in convert_sync_batchnorm(plain).modules()) >= n_bn


# ---------------------------------------------------------------------------- 11. weight decay
def test_no_weight_decay_on_biases_and_norm_parameters():
    model = HybridModel(tiny_config(), HybridConfig(num_domains=3, iam_hidden=16))
    groups = param_groups(model, 5e-4)
    decayed = {id(p) for p in groups[0]["params"]}
    assert groups[1]["weight_decay"] == 0.0
    bn = model.search_model.roi_heads.embedding_head.rescaler
    assert id(bn.weight) not in decayed and id(bn.bias) not in decayed
    conv = model.search_model.backbone.layer3[0].conv1.weight
    assert id(conv) in decayed
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == n_trainable


# ---------------------------------------------------------------------------- 12. extra GT rows
def test_extra_gt_rows_are_capped_and_kept_out_of_batchnorm_statistics():
    torch.manual_seed(0)
    model = HybridModel(tiny_config(roi_batch_size=2), HybridConfig(num_domains=3, iam_hidden=16, max_con_boxes=1))
    batch = make_batch(labeled=(False, False))
    proj_bn = model.search_model.roi_heads.embedding_head.projectors["feat_res4"][1]
    batch_sizes = []
    proj_bn.register_forward_hook(lambda m, a, o: batch_sizes.append((m.training, a[0].shape[0])))
    out = model(batch)
    assert out["con_pairs"].item() == 2.0             # one person per image, both images unlabeled
    # BN calls in train mode see only the sampled RoIs; the extra GT rows ran in eval mode
    train_calls = [n for training, n in batch_sizes if training]
    assert train_calls and all(n <= 2 * 2 for n in train_calls)
    assert any(not training for training, _ in batch_sizes)
