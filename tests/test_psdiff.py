"""PSDiff (finetune/psdiff): noise generator, matching, forward/backward, DDIM inference,
the teacher path, loading our checkpoints, and the CLI with per-step evaluation.

Tiny sizes throughout (ResNet-18 at <= 176 px, a few proposals, 1-2 CDL stages)."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.ops import box_convert, box_iou

from hybridps.data_prep.synth import prw as synth_prw
from hybridps.finetune import cli
from hybridps.finetune.init import resolve_init
from hybridps.finetune.psdiff.config import PSDiffModelConfig, load_config
from hybridps.finetune.psdiff.diffusion import (
    DualNoiseGenerator,
    boxes_to_signal,
    cosine_alphas_cumprod,
    signal_to_boxes,
)
from hybridps.finetune.psdiff.losses import hungarian_match, set_losses
from hybridps.finetune.psdiff.model import build_psdiff
from hybridps.finetune.psdiff.run import load_init, load_teacher
from hybridps.pretrain.model import build_search_model
from hybridps.pretrain.model.config import tiny_config

TINY = Path(__file__).resolve().parents[1] / "finetune" / "configs" / "psdiff_tiny.yaml"
FAST = ["model.min_size=96", "model.max_size=176", "model.dim=32", "model.dim_dynamic=8", "model.heads=2",
        "model.num_stages=1", "model.n_train=8", "model.n_test=8", "model.detections_per_img=8",
        "eval.visualize=0"]
WEIGHTS = {"loss_cls": 2.0, "loss_l1": 5.0, "loss_giou": 2.0, "loss_reid": 5.0}


def tiny_psdiff(**over) -> PSDiffModelConfig:
    base = dict(backbone="resnet18", norm_layer="frozen_bn", min_size=64, max_size=96, dim=32, dim_dynamic=8,
                heads=2, num_stages=2, n_train=6, n_test=6, ddim_steps=4, score_thresh=0.0, detections_per_img=5)
    base.update(over)
    return PSDiffModelConfig(**base)


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "prw"
    return root, synth_prw.write(root, seed=0, size="tiny")


def _pretrain_run_dir(path: Path, seed: int = 123) -> dict:
    """A pre-training-style run dir (CONTRACTS 5) from a fresh tiny NAE model."""
    cfg = tiny_config(min_size=96, max_size=176)
    torch.manual_seed(seed)
    model = build_search_model(cfg)
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("roi_heads.reid_loss.")}
    save_file(state, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in model.backbone_state_dict().items()}, str(path / "backbone.safetensors"))
    (path / "meta.json").write_text(json.dumps({"backbone": cfg.backbone, "style": "pytorch", "mean": cfg.image_mean,
                                                "std": cfg.image_std, "steps": 0}))
    (path / "config.yaml").write_text("model: {}\n")
    return state


# --------------------------------------------------------------------------- diffusion
def test_noise_generator_repeats_gt_and_uses_the_two_scales():
    ab = cosine_alphas_cumprod(1000)
    assert ab.shape == (1000,) and bool((ab[1:] < ab[:-1]).all())
    assert ab[0] > 0.999 and ab[-1] < 1e-3

    gen = DualNoiseGenerator(1000, n_train=7, box_scale=2.0, emb_scale=3.0)
    counts = torch.bincount(gen.repeat_index(3, torch.Generator().manual_seed(0)), minlength=3)
    assert counts.sum() == 7 and set(counts.tolist()) <= {2, 3}          # uniform duplication
    assert gen.repeat_index(9, torch.Generator().manual_seed(0)).unique().numel() == 7

    wh = torch.tensor([80.0, 60.0])
    gt = torch.tensor([[10.0, 5.0, 30.0, 50.0], [40.0, 10.0, 70.0, 55.0], [0.0, 0.0, 80.0, 60.0]])
    sig = boxes_to_signal(gt, wh, 2.0)
    assert float(sig.abs().max()) <= 2.0 + 1e-6 and torch.allclose(sig[2], torch.tensor([0.0, 0.0, 2.0, 2.0]))
    assert torch.allclose(signal_to_boxes(sig, wh, 2.0), gt, atol=1e-4)

    emb = torch.nn.functional.normalize(torch.randn(3, 64), dim=-1)
    g = torch.Generator().manual_seed(1)
    # t = 0: almost no noise -> boxes are the ground truths, embeddings 3 * sqrt(D) * unit
    gen.alphas_cumprod[0] = 1.0
    orig = torch.randint
    try:
        torch.randint = lambda lo, hi, size, generator=None: torch.tensor(0)
        clean = gen.corrupt(gt, emb, wh, g)
        torch.randint = lambda lo, hi, size, generator=None: torch.tensor(999)
        noisy = gen.corrupt(gt, emb, wh, g)
    finally:
        torch.randint = orig
    assert clean.boxes.shape == (7, 4) and clean.embeddings.shape == (7, 64) and int(clean.t) == 0
    assert torch.cdist(clean.boxes, gt).min(dim=1).values.max() < 1e-3
    assert torch.allclose(clean.embeddings.norm(dim=-1), torch.full((7,), 3.0 * math.sqrt(64)), rtol=1e-4)
    # t = T-1: the embedding signal is (nearly) unit Gaussian noise; box centres and sizes are
    # clamped to the image (signal in [-s1, s1])
    assert 0.8 < float(noisy.embeddings.std()) < 1.2 and int(noisy.t) == 999
    cxcywh = box_convert(noisy.boxes, "xyxy", "cxcywh")
    assert float(cxcywh.min()) >= -1e-4 and bool((cxcywh <= torch.cat([wh, wh]) + 1e-3).all())

    empty = gen.corrupt(torch.zeros(0, 4), torch.zeros(0, 64), wh, g)
    assert empty.boxes.shape == (7, 4) and empty.embeddings.shape == (7, 64)
    pairs = gen.ddim_times(4)
    assert pairs[0][0] == 999 and pairs[-1][1] == -1 and len(pairs) == 4


# --------------------------------------------------------------------------- matching and losses
def test_hungarian_match_is_optimal_not_greedy():
    cost = torch.tensor([[1.0, 2.0], [0.5, 0.1], [3.0, 0.2]])
    pred, gt = hungarian_match(cost)
    # greedy takes (1, 1) = 0.1 first and ends at 1.1; the optimum pairs (1, 0) + (2, 1) = 0.7
    assert sorted(zip(gt.tolist(), pred.tolist())) == [(0, 1), (1, 2)]
    assert hungarian_match(torch.zeros(4, 0))[0].numel() == 0


def test_set_losses_vanish_on_the_matched_exact_prediction():
    wh = torch.tensor([100.0, 80.0])
    gt = torch.tensor([[10.0, 10.0, 40.0, 70.0], [50.0, 5.0, 90.0, 75.0]])
    gt_emb = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    boxes = torch.tensor([[[0.0, 0.0, 20.0, 20.0], [50.0, 5.0, 90.0, 75.0], [10.0, 10.0, 40.0, 70.0]]])
    emb = torch.stack([torch.randn(16), gt_emb[1] * 4.0, gt_emb[0] * 2.0])[None]   # norm does not matter
    logits = torch.tensor([[-5.0, 5.0, 5.0]])
    out = set_losses(logits, boxes, emb, [{"boxes": gt, "emb": gt_emb, "wh": wh}], WEIGHTS)
    assert float(out["loss_l1"]) < 1e-6 and float(out["loss_giou"]) < 1e-6 and float(out["loss_reid"]) < 1e-5
    assert float(out["loss_cls"]) < 0.01
    swapped = set_losses(-logits, boxes, emb, [{"boxes": gt, "emb": gt_emb, "wh": wh}], WEIGHTS)
    assert float(swapped["loss_cls"]) > 1.0


# --------------------------------------------------------------------------- model
def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 72, 90, generator=g), torch.rand(3, 80, 64, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 8.0, 40.0, 70.0], [50.0, 10.0, 85.0, 66.0]]), "pids": torch.tensor([0, -1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 75.0]]), "pids": torch.tensor([1])}]
    return images, targets


def test_forward_backward_reaches_the_backbone_and_spares_the_teacher(one_thread):
    torch.manual_seed(0)
    teacher = build_search_model(tiny_config())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = build_psdiff(tiny_psdiff(norm_layer="bn"))
    model.set_teacher(teacher)
    model.loss_weights = dict(WEIGHTS)
    model.train()
    images, targets = _batch()
    losses = model(images, targets)
    assert set(losses) == {"loss_cls", "loss_l1", "loss_giou", "loss_reid"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(WEIGHTS[k] * v for k, v in losses.items()).backward()
    for name in ("backbone.layer1.0.conv1.weight", "backbone_c5.layer4.0.conv1.weight", "fpn.inner_blocks.0.0.weight",
                 "stages.0.dynamic.kernels.weight", "stages.1.cross_attn.in_proj_weight", "time_mlp.1.weight"):
        grad = model.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert model.get_parameter("backbone.conv1.weight").grad is None          # frozen stem, as NAE
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(k.startswith("_teacher") or "teacher" in k for k in model.state_dict())
    # the re-ID targets are the teacher's own embeddings of the gt boxes
    teacher.eval()
    with torch.no_grad():
        direct = teacher.extract_query(images, [t["boxes"] for t in targets])
    for a, b in zip(model.teacher_embeddings(images, targets), direct):
        assert torch.allclose(a, b, atol=1e-5)


def test_inference_is_seeded_by_the_image_and_steps_change_the_result(one_thread):
    torch.manual_seed(0)
    model = build_psdiff(tiny_psdiff(emb_dim=16)).eval()
    images, targets = _batch()
    a = model([images[0]])[0]
    model._cache.clear()
    b = model([images[0]])[0]
    assert torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["embeddings"], b["embeddings"])
    # the sampling noise is seeded by the image content, not by the batch it comes in
    same = [torch.randn(3, generator=model._generator(images[0])) for _ in range(2)]
    assert torch.equal(*same) and not torch.equal(same[0], torch.randn(3, generator=model._generator(images[1])))
    assert a["embeddings"].shape[1] == 16 and torch.allclose(a["embeddings"].norm(dim=1), torch.ones(len(a["boxes"])))
    q = model.extract_query(images, [t["boxes"] for t in targets])
    assert [tuple(x.shape) for x in q] == [(2, 16), (1, 16)]
    model.cfg = dataclasses.replace(model.cfg, ddim_steps=1, ensemble=False)
    one = model([images[0]])[0]
    assert one["boxes"].shape[0] <= model.cfg.n_test and not torch.equal(one["boxes"], a["boxes"][: len(one["boxes"])])


# --------------------------------------------------------------------------- our checkpoints and the teacher
def test_init_from_our_pretrain_run_loads_trunk_and_layer4(tmp_path):
    source = _pretrain_run_dir(tmp_path / "pre")
    weights = resolve_init(str(tmp_path / "pre"))
    torch.manual_seed(5)
    model = build_psdiff(tiny_psdiff())
    lines = []
    rep = load_init(model, weights, "full", 0.5, log=lines.append)
    assert rep.matched_fraction == 1.0
    assert len(rep.modules["backbone"].loaded) > 50 and len(rep.modules["backbone_c5"].loaded) > 10
    text = "\n".join(lines)
    assert "backbone_c5" in text and "not loaded (outside scope 'full')" in text and "embedding_head" in text
    now = model.state_dict()
    assert torch.equal(now["backbone.layer2.0.conv1.weight"], source["backbone.layer2.0.conv1.weight"])
    assert torch.equal(now["backbone_c5.layer4.1.bn2.running_var"], source["roi_heads.box_head.layer4.1.bn2.running_var"])


def test_teacher_from_a_pretrain_run_and_refusals(tmp_path):
    import torchvision

    _pretrain_run_dir(tmp_path / "pre")
    teacher = load_teacher(str(tmp_path / "pre"), tiny_psdiff(), log=lambda _: None)
    assert teacher.cfg.emb_dim == 256 and not any(p.requires_grad for p in teacher.parameters())
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(ValueError, match="needs an embedding head"):
        load_teacher(str(tmp_path / "r18.pth"), tiny_psdiff(), log=lambda _: None)


# --------------------------------------------------------------------------- CLI
def _train(root, out, *extra) -> dict:
    argv = ["train", "--method", "psdiff", "--dataset", "prw", "--root", str(root), "--config", str(TINY),
            "--out", str(out), "--max-steps", "2", *extra, *FAST]
    assert cli.main(argv) == 0
    return json.loads((out / "meta.json").read_text())


def test_cli_train_with_teacher_then_eval_per_ddim_steps(prw, tmp_path, capsys, one_thread):
    root, truth = prw
    _pretrain_run_dir(tmp_path / "pre")
    meta = _train(root, tmp_path / "run", "--init", str(tmp_path / "pre"), "--teacher", str(tmp_path / "pre"))
    assert meta["method"] == "psdiff" and meta["steps"] == 2 and meta["init_matched_fraction"] == 1.0
    assert meta["teacher"] == str(tmp_path / "pre")
    report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert {"backbone", "backbone_c5"} <= set(report["modules"])
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert "stages.0.cross_attn.in_proj_weight" in state and not any("teacher" in k for k in state)
    history = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all(math.isfinite(h["loss"]) for h in history)
    capsys.readouterr()

    out = tmp_path / "ev"
    argv = ["eval", "--dataset", "prw", "--root", str(root), "--checkpoint", str(tmp_path / "run"),
            "--out", str(out), "--ddim-steps", "1,2", "--device", "cpu"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "DDIM steps" in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_ddim_steps"]) == {"1", "2"} and metrics["method"] == "psdiff"
    assert metrics["ddim_steps"] == 2 and metrics["search"]["n_queries"] == len(truth["protocol"]["queries"])
    for k in ("1", "2"):
        sub = json.loads((out / f"ddim{k}" / "metrics.json").read_text())
        assert 0.0 <= sub["search"]["mAP"] <= 1.0 and (out / f"ddim{k}" / "results.npz").is_file()
        assert sub["search"]["mAP"] == metrics["per_ddim_steps"][k]["mAP"]

    # the same results file is scored by the shared evaluator without the model
    assert cli.main(["eval", "--dataset", "prw", "--root", str(root), "--results", str(out / "ddim2" / "results.npz"),
                     "--out", str(tmp_path / "ev_res"), "eval.visualize=0"]) == 0
    again = json.loads((tmp_path / "ev_res" / "metrics.json").read_text())
    assert again["search"]["mAP"] == pytest.approx(metrics["search"]["mAP"])

    for bad in ("0", "x", "1,-2"):
        argv[argv.index("--ddim-steps") + 1] = bad
        assert cli.main(argv) == 2
        assert "--ddim-steps" in capsys.readouterr().err


def test_cli_refusals(prw, tmp_path, capsys):
    root, _ = prw
    base = ["train", "--method", "psdiff", "--dataset", "prw", "--root", str(root), "--config", str(TINY),
            "--out", str(tmp_path / "run"), "--max-steps", "1", *FAST]
    assert cli.main(base + ["--init", "none"]) == 2
    assert "--teacher" in capsys.readouterr().err
    import torchvision
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    assert cli.main(base + ["--init", "none", "--teacher", str(tmp_path / "r18.pth")]) == 2
    assert "embedding head" in capsys.readouterr().err
    # --teacher / --ddim-steps belong to PSDiff only
    assert cli.main(["train", "--dataset", "prw", "--root", str(root), "--init", "none", "--teacher", "x",
                     "--out", str(tmp_path / "nae")]) == 2
    assert "--method psdiff" in capsys.readouterr().err
    assert cli.main(["eval", "--dataset", "prw", "--root", str(root), "--results", str(tmp_path / "r18.pth"),
                     "--ddim-steps", "1"]) == 2
    assert "PSDiff runs only" in capsys.readouterr().err


# --------------------------------------------------------------------------- DDIM sampling
def _contracting_denoiser(model, gt: torch.Tensor, gt_emb: torch.Tensor, perfect: bool = False, low_score: int = 0):
    """A stand-in for the trained stages whose x0 estimate is alpha-bar_t of the way from the
    input box to the person (uninformative at t = T, exact at t = 0; ``perfect``: always
    exact): what is tested is the DDIM loop, the renewal and the query path (the tiny network
    cannot be trained into a useful denoiser within a unit test's CPU budget; see the README)."""
    def denoise(feats, boxes, emb_signal, t, image_sizes):
        ab = 1.0 if perfect else model.diffusion.alphas_cumprod[t].to(boxes)[:, None, None]
        pred = boxes + ab * (gt.to(boxes) - boxes)
        logits = torch.full(boxes.shape[:2], 6.0)
        logits[:, :low_score] = -6.0                   # these proposals are renewed each step
        return [(logits, pred, gt_emb.expand(*boxes.shape[:2], -1))]
    model.denoise = denoise
    return model


def test_ddim_refines_with_more_steps_and_renews_low_scores():
    torch.manual_seed(0)
    model = build_psdiff(tiny_psdiff(emb_dim=8, n_test=6, ddim_eta=0.0, ensemble=False, box_renewal=True,
                                     nms_thresh=1.0, detections_per_img=6)).eval()
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(3))
    gt = torch.tensor([24.0, 16.0, 44.0, 56.0])        # 64x80 stays 64x80 (min_size 64)
    gt_emb = torch.nn.functional.normalize(torch.ones(8), dim=0)
    _contracting_denoiser(model, gt, gt_emb)
    ious = {}
    for k in (1, 2, 4, 8):
        model.cfg = dataclasses.replace(model.cfg, ddim_steps=k)
        model._cache.clear()
        det = model([image])[0]
        assert det["boxes"].shape[0] == 6
        ious[k] = float(box_iou(det["boxes"], gt[None]).mean())
    assert ious[1] < ious[2] < ious[4] < ious[8] and ious[8] > 0.9, ious
    # a perfect denoiser lands on the person in one step
    _contracting_denoiser(model, gt, gt_emb, perfect=True)
    model.cfg, model._cache = dataclasses.replace(model.cfg, ddim_steps=1), {}
    assert torch.allclose(model([image])[0]["boxes"], gt.expand(6, 4), atol=1e-3)
    # renewal: the low-scored half is replaced by fresh noise at every step (the kept boxes move
    # to the front, so each proposal is refined from the previous step only); the set stays full
    _contracting_denoiser(model, gt, gt_emb, low_score=3)
    model.cfg, model._cache = dataclasses.replace(model.cfg, ddim_steps=8, score_thresh=0.5), {}
    det = model([image])[0]
    assert det["boxes"].shape[0] == 3 and float(box_iou(det["boxes"], gt[None]).min()) > 0.8
    q = model.extract_query([image], [gt[None]])[0]
    assert torch.allclose(q[0], gt_emb, atol=1e-5)


def test_tiny_overfit_lowers_the_loss_and_steps_differ(one_thread):
    """The real network on one image: training lowers the box and re-ID losses of a fixed
    noise draw, and 1 vs 4 DDIM steps give different detections."""
    torch.manual_seed(0)
    teacher = build_search_model(tiny_config(min_size=64, max_size=96))
    model = build_psdiff(tiny_psdiff(n_train=4, n_test=4, num_stages=1))
    model.set_teacher(teacher)
    model.loss_weights = dict(WEIGHTS)
    image = torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0)) * 0.2
    image[:, 16:56, 24:44] = torch.tensor([0.9, 0.2, 0.2])[:, None, None]
    target = [{"boxes": torch.tensor([[24.0, 16.0, 44.0, 56.0]]), "pids": torch.tensor([0])}]

    def fixed_loss():
        torch.manual_seed(123)                          # same t and noise every time
        return model([image], target)

    model.train()
    with torch.no_grad():
        start = fixed_loss()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(40):
        torch.manual_seed(123)
        losses = model([image], target)
        opt.zero_grad()
        sum(WEIGHTS[k] * v for k, v in losses.items()).backward()
        opt.step()
    with torch.no_grad():
        end = fixed_loss()
    assert float(end["loss_reid"]) < 0.5 * float(start["loss_reid"])
    assert float(end["loss_l1"] + end["loss_giou"]) < 0.5 * float(start["loss_l1"] + start["loss_giou"])
    model.eval()
    out = {}
    for k in (1, 4):
        model.cfg = dataclasses.replace(model.cfg, ddim_steps=k)
        out[k] = model([image])[0]["boxes"]
    assert out[1].shape != out[4].shape or not torch.allclose(out[1], out[4])
