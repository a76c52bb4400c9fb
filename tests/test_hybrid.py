"""HybridModel: loss composition, L_con pairing, graph safety, switches, optimisation steps."""
from __future__ import annotations

import pytest
import torch

from hybridps.pretrain.hybrid import HybridConfig, HybridModel, LossConfig, matched_pairs
from hybridps.pretrain.model import tiny_config

PS = ("loss_rpn_cls", "loss_rpn_reg", "loss_box_reg", "loss_det_cls", "loss_reid")
IAM = tuple(f"loss_{t}_{lv}" for t in ("det", "reid") for lv in ("img", "ins", "cst"))


pytestmark = pytest.mark.usefixtures("one_thread")


def make_view(seed: int, shift: float = 0.0) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 96, 128, generator=g)]
    targets = [
        {"boxes": torch.tensor([[10.0, 10.0, 40.0, 80.0], [60.0, 20.0, 90.0, 90.0]]) + shift,
         "pids": torch.tensor([1, 5]), "track": torch.tensor([0, 1])},
        {"boxes": torch.tensor([[20.0, 10.0, 50.0, 80.0], [70.0, 5.0, 100.0, 70.0]]) + shift,
         "pids": torch.tensor([-1, -1]), "track": torch.tensor([0, 1]),
         "ignore": torch.tensor([[105.0, 0.0, 128.0, 96.0]])},
    ]
    return {"images": images, "targets": targets}


def make_batch(labeled=(True, False)) -> dict:
    return {"view1": make_view(0), "view2": make_view(1, shift=2.0),
            "domain": torch.tensor([0, 2]), "labeled": torch.tensor(labeled)}


def build(**loss) -> HybridModel:
    torch.manual_seed(0)
    return HybridModel(tiny_config(), HybridConfig(num_domains=3, iam_hidden=32, loss=LossConfig(**loss)))


def test_forward_returns_every_loss_and_weighted_total():
    model = build(eta=0.7, lambda_adv=0.3, w_box_reg=10.0, w_cst=2.0, inter_task=True)
    out = model(make_batch())
    for key in PS + IAM + ("loss_con", "loss_inter", "loss", "simsiam_std", "acc_det_img", "acc_reid_ins"):
        assert key in out and torch.isfinite(out[key]), key
    det = out["loss_rpn_cls"] + out["loss_rpn_reg"] + 10.0 * out["loss_box_reg"] + out["loss_det_cls"]
    adv = sum(out[f"loss_{t}_img"] + out[f"loss_{t}_ins"] + 2.0 * out[f"loss_{t}_cst"] for t in ("det", "reid"))
    expected = det + out["loss_reid"] + 0.7 * out["loss_con"] + 0.3 * (adv + out["loss_inter"])
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # sample 1 is unlabeled and both its boxes appear in both views
    assert out["con_pairs"].item() == 2.0


def test_matched_pairs_by_track():
    i, j = matched_pairs({"track": torch.tensor([4, 0, 2])}, {"track": torch.tensor([2, 5, 4])})
    assert sorted(zip(i.tolist(), j.tolist())) == [(0, 2), (2, 0)]
    with pytest.raises(ValueError, match="track"):
        matched_pairs({}, {"track": torch.tensor([0])})


def test_all_labeled_batch_has_zero_con_and_every_parameter_gets_a_gradient():
    model = build(inter_task=True)
    out = model(make_batch(labeled=(True, True)))
    assert out["loss_con"].item() == 0.0 and out["con_pairs"].item() == 0.0
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_zero_box_batch_and_domain_subset():
    model = HybridModel(tiny_config(), HybridConfig(num_domains=3, iam_hidden=32, det_domains=[1]))
    batch = make_batch(labeled=(False, False))
    for view in ("view1", "view2"):
        for t in batch[view]["targets"]:
            t.update(boxes=torch.zeros(0, 4), pids=torch.zeros(0, dtype=torch.long),
                     track=torch.zeros(0, dtype=torch.long))
    out = model(batch)      # no sample of domain 1: the detection IAM sees nothing
    assert out["loss_det_img"].item() == 0.0 and out["loss_con"].item() == 0.0
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is not None for p in model.det_iam.parameters())


def test_switches_remove_modules_and_terms():
    model = build(con=False, adv_det=False, adv_reid=False, reid=False)
    assert model.predictor is None and model.det_iam is None and model.reid_iam is None
    out = model(make_batch())
    assert "loss_con" not in out and "loss_det_img" not in out
    det = out["loss_rpn_cls"] + out["loss_rpn_reg"] + 10.0 * out["loss_box_reg"] + out["loss_det_cls"]
    assert out["loss"].item() == pytest.approx(det.item(), rel=1e-5)
    with pytest.raises(ValueError, match="num_domains=1"):
        HybridModel(tiny_config(), HybridConfig(num_domains=1))


@pytest.mark.timeout(120)
def test_few_optimisation_steps_lower_the_total_loss():
    # rpn_post_nms_train=0 leaves only the appended GT boxes as RoIs, so the sampled set stays
    # fixed; with RPN proposals, better proposals bring in more (and harder) foreground RoIs and
    # the box loss of a 2-image batch rises while the model improves.
    torch.manual_seed(0)
    model = HybridModel(tiny_config(rpn_post_nms_train=0), HybridConfig(num_domains=3, iam_hidden=32))
    batch = make_batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.003, momentum=0.9)
    history = []
    for _ in range(5):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({k: v.item() for k, v in out.items()})
    first, last = history[0], history[-1]
    assert last["loss"] < history[1]["loss"] < first["loss"]
    # not only the OIM table filling up: the other terms go down as well
    assert last["loss"] - last["loss_reid"] < first["loss"] - first["loss_reid"]
    assert last["loss_rpn_cls"] < first["loss_rpn_cls"] and last["loss_con"] < first["loss_con"]
