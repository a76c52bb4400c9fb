"""UGAS (SFM, self-distillation, uncertainty guidance) and IIDFC (FC loss, PAM) options of the
NAE model: hand-computed losses, build/train with gradients into the new parts, inference cost
(parameters and FLOPs) of the training-only parts, and the fine-tuning export round trip."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from hybridps.pretrain.config import ConfigError, load_config as load_pretrain_config
from hybridps.pretrain.losses import FCLoss, OIMLoss, fc_target_logits, self_distillation, uncertainty_weighted
from hybridps.pretrain.model import build_search_model, tiny_config
from hybridps.pretrain.model.iidfc import PedestrianAttention

pytestmark = pytest.mark.usefixtures("one_thread")

UGAS = dict(ugas_sfm=True, ugas_distill=True, ugas_uncertainty=True)
IIDFC = dict(iidfc_fc=True, iidfc_pam=True)


def tiny_batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 80, 120, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 40.0, 80.0], [60.0, 20.0, 90.0, 90.0]]),
                "pids": torch.tensor([3, -1])},
               {"boxes": torch.tensor([[20.0, 5.0, 50.0, 70.0]]), "pids": torch.tensor([5])}]
    return images, targets


# ------------------------------------------------------------------------------ hand-computed losses
def test_fc_loss_hand_computed():
    # LUT rows e0, e1; x at 60 degrees from e0, label 0: theta_y = pi/3, other cosine sin 60.
    loss = FCLoss(2, num_pids=2, cq_size=0, scalar=30.0, m1=0.9, m2=0.1)
    loss.lut.copy_(torch.eye(2))
    x = torch.tensor([[0.5, math.sqrt(3) / 2]], requires_grad=True)
    target = math.cos(0.9 * math.pi / 3 + 0.1)            # 0.50409 (cos 1.04248)
    expected = math.log1p(math.exp(30 * (math.sqrt(3) / 2 - target)))
    got = loss(x, torch.tensor([0]))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(10.8583, abs=1e-3)    # 30 * 0.36194 + log1p(e^-10.858)
    got.backward()
    assert torch.isfinite(x.grad).all()
    # eq. 13 as printed: m1*theta + m2 > theta only below theta = m2 / (1 - m1) = 1 rad, so the
    # margin acts on samples already near their centre (compactness); at 60 deg (1.047 rad) the
    # target logit is a hair above the plain cosine
    assert target > 0.5 and math.cos(0.9 * 0.5 + 0.1) < math.cos(0.5)
    # m1 = 1, m2 = 0 is exactly OIM (same tables, same update)
    plain, fc1 = OIMLoss(2, 2, 0), FCLoss(2, 2, 0, m1=1.0, m2=0.0)
    plain.lut.copy_(torch.eye(2))
    fc1.lut.copy_(torch.eye(2))
    x2 = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    assert fc1(x2, torch.tensor([1, 0])).item() == pytest.approx(plain(x2, torch.tensor([1, 0])).item(), rel=1e-5)


def test_fc_target_logits_only_touch_the_target_column_and_stay_finite_at_cos_one():
    cos = torch.tensor([[1.0, 0.2, -0.3], [0.0, -1.0, 0.5]], requires_grad=True)
    out = fc_target_logits(cos, torch.tensor([0, 1]), 0.9, 0.1)
    assert out[0, 0].item() == pytest.approx(math.cos(0.1), abs=1e-3)   # theta 0 -> cos(m2)
    assert out[1, 1].item() == pytest.approx(math.cos(0.9 * math.pi + 0.1), abs=1e-3)
    assert torch.equal(out[0, 1:], cos[0, 1:].detach()) and out[1, 0] == 0.0 and out[1, 2] == 0.5
    out.sum().backward()
    assert torch.isfinite(cos.grad).all()


def test_uncertainty_weighting_hand_computed():
    per = torch.tensor([2.0, 1.0])
    log_var = torch.tensor([0.0, math.log(2.0)], requires_grad=True)
    got = uncertainty_weighted(per, log_var)
    # (e^0 * 2 + 0 + e^{-ln 2} * 1 + ln 2) / 2
    assert got.item() == pytest.approx((2.0 + 0.5 + math.log(2.0)) / 2, rel=1e-6)
    got.backward()
    # d/ds_i = (1 - e^{-s_i} l_i) / 2: the high-loss sample is pushed to a larger variance
    assert log_var.grad.tolist() == pytest.approx([(1 - 2.0) / 2, (1 - 0.5) / 2], rel=1e-6)
    # s = 0 everywhere is the plain mean
    assert uncertainty_weighted(per, torch.zeros(2)).item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        uncertainty_weighted(per, torch.zeros(3))


def test_self_distillation_hand_computed():
    teacher = torch.tensor([[0.0, math.log(3.0)]])          # p = (1/4, 3/4)
    student = torch.zeros(1, 2, requires_grad=True)          # q = (1/2, 1/2)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)   # 0.130812
    got = self_distillation(student, teacher, temperature=1.0)
    assert got.item() == pytest.approx(kl, rel=1e-5) and kl == pytest.approx(0.130812, abs=1e-6)
    # temperature 2 on doubled logits: the same distributions, times T^2
    assert self_distillation(2 * student, 2 * teacher, 2.0).item() == pytest.approx(4 * kl, rel=1e-5)
    got.backward()
    assert student.grad[0].tolist() == pytest.approx([0.25, -0.25], abs=1e-6)   # q - p
    assert self_distillation(teacher.clone(), teacher, 1.0).item() == pytest.approx(0.0, abs=1e-7)


def test_pam_hand_computed_and_weight_sharing():
    pam = PedestrianAttention(channels=4)
    # one shared 3x3 kernel for the three dilations; SE on 12 channels; 1x1 to one map
    assert pam.conv.weight.shape == (4, 2, 3, 3) and pam.out.weight.shape == (1, 12, 1, 1)
    assert sum(p.numel() for p in pam.parameters()) == (4 * 2 * 9 + 4) + (12 * 3 + 3 + 3 * 12 + 12) + (12 + 1)
    with torch.no_grad():
        for p in pam.parameters():
            p.zero_()
    x = torch.randn(2, 5, 4, 4)
    # zero weights: M_p = sigmoid(0) = 1/2 everywhere -> F' = F / 2 (eq. 5-7)
    assert torch.allclose(pam(x), x / 2)
    with torch.no_grad():
        pam.conv.weight[:, 1, 1, 1] = 1.0        # centre tap on the channel-max descriptor
        pam.out.weight.fill_(1.0)
        pam.se.fc2.bias.fill_(100.0)             # SE gate ~ 1
    m = pam.attention(x)
    expected = torch.sigmoid(3 * 4 * torch.relu(x.amax(dim=1, keepdim=True)))   # 3 dilations x 4 channels
    assert torch.allclose(m, expected, atol=1e-5)


# ------------------------------------------------------------------------------ build and train
@pytest.mark.parametrize("options,new_parts", [
    (UGAS, ("roi_heads.sfm.", "roi_heads.uncertainty.")),
    (IIDFC, ("roi_heads.pam.",)),
    ({**UGAS, **IIDFC}, ("roi_heads.sfm.", "roi_heads.uncertainty.", "roi_heads.pam.")),
])
def test_options_train_with_finite_losses_and_gradients_in_new_parts(options, new_parts):
    torch.manual_seed(0)
    model = build_search_model(tiny_config(**options))
    model.train()
    images, targets = tiny_batch()
    sum(model(images, targets).values()).backward()   # step 1 fills the (empty, all-zero) OIM tables
    model.zero_grad(set_to_none=True)
    losses = model(images, targets)
    if options.get("ugas_sfm"):
        assert {"loss_reid_shallow", "loss_distill"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    for prefix in new_parts:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(prefix)]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads), prefix
        assert any(g.abs().sum() > 0 for g in grads), f"no gradient reaches {prefix}"
    model.eval()
    dim = 256 + (128 if options.get("ugas_sfm") else 0)
    with torch.no_grad():
        dets = model(images)
        q = model.extract_query(images, [t["boxes"] for t in targets])
    assert all(d["embeddings"].shape[1] == dim for d in dets)
    assert q[0].shape == (2, dim) and torch.allclose(q[0].norm(dim=1), torch.ones(2), atol=1e-4)


def test_distillation_gradient_reaches_only_the_shallow_branch():
    torch.manual_seed(0)
    model = build_search_model(tiny_config(ugas_sfm=True, ugas_distill=True))
    model.train()
    losses = model(*tiny_batch())
    assert losses["loss_distill"].item() == 0.0          # empty tables: both distributions uniform
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    losses = model(*tiny_batch())
    assert losses["loss_distill"].item() > 0
    losses["loss_distill"].backward()
    assert model.roi_heads.sfm.proj[0].weight.grad.abs().sum() > 0
    deep = model.roi_heads.embedding_head.projectors["feat_res5"][0].weight.grad
    assert deep is None or deep.abs().sum() == 0        # the deep teacher is detached


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="ugas_distill needs model.ugas_sfm"):
        tiny_config(ugas_distill=True)
    with pytest.raises(ConfigError, match="fine-tuning options"):
        load_pretrain_config(None, ["model.ugas_sfm=true"])
    cfg = load_pretrain_config(None, ["model.iidfc_fc=true", "model.iidfc_pam=true"])   # allowed in pre-training
    assert cfg.model.iidfc_fc and cfg.model.iidfc_pam


# ------------------------------------------------------------------------------ inference cost
def _inference_cost(model) -> tuple[int, int, list[dict]]:
    model.eval()
    images, targets = tiny_batch()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        dets = model(images)
        model.extract_query(images, [t["boxes"] for t in targets])
    params = sum(p.numel() for p in model.parameters())
    return params, counter.get_total_flops(), dets


def _pair(base_options: dict, extra: dict):
    torch.manual_seed(0)
    base = build_search_model(tiny_config(score_thresh=0.0, **base_options))
    full = build_search_model(tiny_config(score_thresh=0.0, **base_options, **extra))
    missing, unexpected = full.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("roi_heads.uncertainty.") or "reid_loss" in k for k in missing)
    return base, full


@pytest.mark.parametrize("base_options,extra", [
    ({}, dict(ugas_uncertainty=True)),                                   # UG alone
    (dict(ugas_sfm=True), dict(ugas_distill=True, ugas_uncertainty=True)),   # SD + UG on top of SFM
    (dict(iidfc_pam=True), dict(iidfc_fc=True)),                          # FC is a loss only
])
def test_training_only_parts_cost_nothing_at_inference(base_options, extra):
    base, full = _pair(base_options, extra)
    p0, f0, d0 = _inference_cost(base)
    p1, f1, d1 = _inference_cost(full)
    assert f1 == f0 > 0
    head = sum(p.numel() for p in full.roi_heads.uncertainty.parameters()) if full.roi_heads.uncertainty else 0
    assert p1 - head == p0                   # the uncertainty head is the only extra parameter ...
    full.roi_heads.uncertainty = None        # ... and inference does not touch it
    for a, b in zip(d0, _inference_cost(full)[2]):
        assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["embeddings"], b["embeddings"])


def test_sfm_and_pam_cost_is_stated():
    """SFM and PAM are inference parts: they add parameters and FLOPs (numbers in the README)."""
    torch.manual_seed(0)
    p0, f0, _ = _inference_cost(build_search_model(tiny_config(score_thresh=0.0)))
    p_sfm, f_sfm, d = _inference_cost(build_search_model(tiny_config(score_thresh=0.0, ugas_sfm=True)))
    p_pam, f_pam, _ = _inference_cost(build_search_model(tiny_config(score_thresh=0.0, iidfc_pam=True)))
    assert d[0]["embeddings"].shape[1] == 256 + 128
    assert p_sfm > p0 and f_sfm > f0
    assert 0 < p_pam - p0 < 1000 and f_pam > f0


# ------------------------------------------------------------------------------ export round trip
def test_finetune_export_with_options_reloads_strictly(tmp_path):
    cfg = tiny_config(score_thresh=0.0, **UGAS, **IIDFC)
    torch.manual_seed(0)
    model = build_search_model(cfg)
    model.train()
    sum(model(*tiny_batch()).values()).backward()     # fills the OIM tables too
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    assert any(k.startswith("roi_heads.reid_loss_shallow.") for k in state)
    assert any(k.startswith("roi_heads.pam.") for k in state) and any(k.startswith("roi_heads.sfm.") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    again = build_search_model(cfg)
    again.load_state_dict(load_file(str(tmp_path / "model.safetensors")), strict=True)
    images, _ = tiny_batch()
    model.eval()
    again.eval()
    with torch.no_grad():
        for a, b in zip(model(images), again(images)):
            assert torch.equal(a["embeddings"], b["embeddings"])


# ------------------------------------------------------------------------------ pre-training
def test_iidfc_options_in_the_hybrid_pretraining_step():
    """FC replaces the cross entropy of the hybrid objective's OIM call (also with the two-view
    positive) and PAM sits in the RoI head: one hybrid step trains them, finite."""
    from hybridps.pretrain.hybrid import HybridConfig, HybridModel, LossConfig
    from tests.test_hybrid import make_batch

    torch.manual_seed(0)
    model = HybridModel(tiny_config(**IIDFC), HybridConfig(num_domains=3, iam_hidden=32,
                                                           loss=LossConfig(oim_two_view=True)))
    assert isinstance(model.search_model.roi_heads.reid_loss, FCLoss)
    out = model(make_batch(labeled=(True, True)))
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["loss_reid"])
    out["loss"].backward()
    pam = [p.grad for n, p in model.named_parameters() if n.startswith("search_model.roi_heads.pam.")]
    assert pam and all(g is not None and torch.isfinite(g).all() for g in pam)
