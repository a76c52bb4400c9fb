"""Fine-tuning on the synthetic copies: data loading, INIT kinds, the CLI.

Everything runs on the tiny synthetic PRW / CUHK-SYSU releases written by
data_prep/synth at CPU size; training runs take a couple of optimizer steps.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from hybridps.data_prep.synth import cuhk_sysu as synth_cuhk
from hybridps.data_prep.synth import prw as synth_prw
from hybridps.finetune import cli
from hybridps.finetune.config import load_config
from hybridps.finetune.datasets import (
    PersonSearchDataset,
    hflip,
    load_protocol,
    load_train_records,
    relabel,
    train_subset,
)
from hybridps.finetune.engine import lr_factor
from hybridps.finetune.evaluate import Detections, SearchInputs
from hybridps.finetune.init import InitError, load_scoped, resolve_init
from hybridps.finetune.results_io import write_results
from hybridps.pretrain.model import build_search_model

TINY = Path(__file__).resolve().parents[1] / "finetune" / "configs" / "tiny.yaml"
# even smaller than tiny.yaml: these tests check plumbing, not learning
FAST = ["model.min_size=96", "model.max_size=176", "model.roi_batch_size=8", "model.rpn_post_nms_train=32",
        "model.rpn_post_nms_test=12", "model.rpn_pre_nms_test=100", "model.detections_per_img=8",
        "eval.visualize=2"]


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "prw"
    return root, synth_prw.write(root, seed=0, size="tiny")


@pytest.fixture(scope="module")
def cuhk(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "cuhk_sysu"
    return root, synth_cuhk.write(root, seed=0, size="tiny")


def tiny_model_cfg(num_pids=6):
    cfg = load_config(TINY, FAST + [f"model.num_pids={num_pids}"])
    return cfg.model


# --------------------------------------------------------------------------- data
def test_prw_splits_load_with_expected_counts(prw):
    root, truth = prw
    protocol = load_protocol("prw", root)
    assert [g.key for g in protocol.gallery] == list(truth["splits"]["test"]["records"])
    assert len(protocol.queries) == len(truth["protocol"]["queries"])
    assert protocol.per_query_gallery is None
    records, _ = load_train_records("prw", root)
    assert len(records) == len(truth["splits"]["train"]["records"])
    relabelled, lab = relabel(records)
    # sorted distinct training pids -> contiguous rows: the real set gives 483, not NAE's 482
    assert lab.num_ids == len(truth["train_ids"])
    assert sorted(lab.mapping) == sorted(truth["train_ids"])
    assert list(lab.mapping.values()) == list(range(lab.num_ids))
    ids = {i for r in relabelled for i in r.ids}
    assert ids <= set(range(lab.num_ids)) | {-1} and -1 in ids


@pytest.mark.parametrize("size", [50, 100, -1])
def test_cuhk_test_split_loads_with_gallery_sizes(cuhk, size):
    root, truth = cuhk
    protocol = load_protocol("cuhk_sysu", root, size)
    assert [g.key for g in protocol.gallery] == list(truth["splits"]["test"]["records"])
    assert len(protocol.queries) == len(truth["protocol"]["queries"])
    want = truth["protocol"]["per_query_gallery"][50 if size == -1 else size]
    assert [len(g) for g in protocol.per_query_gallery] == [len(g) for g in want]
    assert protocol.gallery_size == size
    records, _ = load_train_records("cuhk_sysu", root)
    assert relabel(records)[1].num_ids == truth["num_train_ids"]


def test_train_subset_is_seeded_and_stable(prw):
    root, _ = prw
    records, _ = load_train_records("prw", root)
    a = [r.key for r in train_subset(records, 0.5, seed=3)]
    assert a == [r.key for r in train_subset(records, 0.5, seed=3)]
    assert a != [r.key for r in train_subset(records, 0.5, seed=4)]
    assert len(a) == round(0.5 * len(records))
    assert len(train_subset(records, 1.0, seed=3)) == len(records)


def test_dataset_item_and_flip(prw):
    root, _ = prw
    records, _ = load_train_records("prw", root)
    records, _ = relabel(records)
    image, target, key = PersonSearchDataset(records)[0]
    assert image.shape[0] == 3 and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert target["boxes"].shape == (len(records[0].boxes), 4) and key == records[0].key
    target = dict(target, ignore=torch.tensor([[0.0, 5.0, 30.0, 60.0]]))
    flipped, ft = hflip(image, target)
    assert torch.equal(flipped[..., 0], image[..., -1])
    w = image.shape[-1]
    assert torch.allclose(ft["boxes"][:, [0, 2]], w - target["boxes"][:, [2, 0]])
    # ignore regions move with the image (they stayed put before)
    assert ft["ignore"].tolist() == [[w - 30.0, 5.0, float(w), 60.0]]
    assert torch.equal(ft["pids"], target["pids"])
    back, bt = hflip(flipped, ft)
    assert torch.equal(back, image) and torch.allclose(bt["boxes"], target["boxes"])
    assert torch.allclose(bt["ignore"], target["ignore"])


def test_lr_schedule_warmup_and_step():
    t = load_config(TINY).train
    t.milestones, t.warmup_factor = [2], 0.001
    assert lr_factor(0, 10, t) == pytest.approx(0.001)
    assert lr_factor(9, 10, t) == pytest.approx(1.0)  # warm-up spans iters - 1 steps
    assert lr_factor(15, 10, t) == pytest.approx(1.0)
    assert lr_factor(20, 10, t) == pytest.approx(0.1)


# --------------------------------------------------------------------------- INIT
def _pretrain_run_dir(path: Path, cfg) -> dict:
    """A pre-training-style run dir (CONTRACTS 5) written from a fresh model."""
    torch.manual_seed(123)
    model = build_search_model(cfg)
    path.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("roi_heads.reid_loss.")}
    save_file(state, str(path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in model.backbone_state_dict().items()}, str(path / "backbone.safetensors"))
    (path / "meta.json").write_text(json.dumps({"backbone": cfg.backbone, "style": "pytorch",
                                                "mean": cfg.image_mean, "std": cfg.image_std, "steps": 0}))
    (path / "config.yaml").write_text("model: {}\n")
    return state


@pytest.mark.parametrize("scope", ["backbone", "full"])
def test_scoped_load_from_run_dir(tmp_path, scope):
    cfg = tiny_model_cfg()
    source = _pretrain_run_dir(tmp_path / "run", cfg)
    weights = resolve_init(str(tmp_path / "run"))
    torch.manual_seed(7)
    model = build_search_model(cfg)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    lines = []
    rep = load_scoped(model, weights, scope, log=lines.append)
    assert rep.matched_fraction == 1.0 and "backbone" in lines[0]
    now = model.state_dict()
    key_bb, key_l4 = "backbone.layer1.0.conv1.weight", "roi_heads.box_head.layer4.0.conv1.weight"
    key_rpn, key_emb = "rpn.head.cls_logits.weight", "roi_heads.embedding_head.projectors.feat_res4.0.weight"
    assert torch.equal(now[key_bb], source[key_bb]) and torch.equal(now[key_l4], source[key_l4])
    for key in (key_rpn, key_emb):
        assert torch.equal(now[key], source[key] if scope == "full" else fresh[key])
    assert torch.equal(now["roi_heads.reid_loss.lut"], fresh["roi_heads.reid_loss.lut"])


def test_init_refuses_a_load_that_matches_too_little(tmp_path):
    import torchvision

    sd = torchvision.models.resnet18().state_dict()
    torch.save(sd, tmp_path / "tv.pth")
    model = build_search_model(tiny_model_cfg())
    weights = resolve_init(str(tmp_path / "tv.pth"))
    assert weights.backbone == "resnet18"
    # a torchvision ResNet has no RPN / embedding head: fine for "backbone", too little for "full" at 99%
    assert load_scoped(model, weights, "backbone", log=lambda _: None).matched_fraction == 1.0
    with pytest.raises(InitError, match="only .* of the target's keys"):
        load_scoped(model, weights, "full", min_fraction=0.99, log=lambda _: None)
    stem_only = {k: v for k, v in sd.items() if k.startswith(("conv1", "bn1", "layer1."))}
    torch.save(stem_only, tmp_path / "stem.pth")
    with pytest.raises(InitError):
        load_scoped(model, resolve_init(str(tmp_path / "stem.pth")), "backbone", log=lambda _: None)
    with pytest.raises(InitError, match="no registry entry"):
        resolve_init("no-such-registry-name-or-file")


# --------------------------------------------------------------------------- training through the CLI
def _train(root, out, init, scope, *extra):
    argv = ["train", "--dataset", "prw", "--root", str(root), "--config", str(TINY), "--init", init,
            "--init-scope", scope, "--out", str(out), "--max-steps", "2", *extra, *FAST]
    assert cli.main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["steps"] == 2 and meta["init"] == init
    assert (out / "config.yaml").is_file() and (out / "history.jsonl").read_text().count("\n") == 2
    return meta


def test_train_from_none_then_eval(prw, tmp_path):
    root, truth = prw
    meta = _train(root, tmp_path / "run", "none", "full", "--eval")
    assert meta["init_matched_fraction"] is None and meta["num_train_ids"] == len(truth["train_ids"])
    state = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert state["roi_heads.reid_loss.lut"].shape[0] == len(truth["train_ids"])
    metrics = json.loads((tmp_path / "run" / "eval_prw" / "metrics.json").read_text())
    assert metrics["search"]["n_queries"] == len(truth["protocol"]["queries"])
    assert 0.0 <= metrics["search"]["mAP"] <= 1.0
    assert (tmp_path / "run" / "eval_prw" / "topk.png").stat().st_size > 0
    assert (tmp_path / "run" / "eval_prw" / "results.npz").is_file()


def test_train_backbone_scope_from_torchvision_file(prw, tmp_path):
    import torchvision

    root, _ = prw
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18.pth")
    meta = _train(root, tmp_path / "run", str(tmp_path / "resnet18.pth"), "backbone",
                  "--train-fraction", "0.5", "--seed", "1")
    assert meta["init_matched_fraction"] == 1.0
    subset = json.loads((tmp_path / "run" / "train_subset.json").read_text())
    records, _ = load_train_records("prw", root)
    assert subset == sorted(r.key for r in train_subset(records, 0.5, 1))
    report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert set(report["modules"]) == {"backbone", "box_head"}


def test_train_full_scope_from_pretrain_run_dir(prw, tmp_path):
    root, _ = prw
    _pretrain_run_dir(tmp_path / "pre", tiny_model_cfg())
    meta = _train(root, tmp_path / "run", str(tmp_path / "pre"), "full")
    assert meta["init_matched_fraction"] == 1.0
    report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert {"backbone", "box_head", "rpn", "embedding_head", "box_predictor"} <= set(report["modules"])


def test_train_refuses_to_overwrite(prw, tmp_path, capsys):
    root, _ = prw
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "model.safetensors").write_bytes(b"x")
    argv = ["train", "--dataset", "prw", "--root", str(root), "--config", str(TINY), "--init", "none",
            "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------- eval --results
def _oracle(protocol) -> SearchInputs:
    """Perfect outputs: every GT box detected exactly, one-hot identity features."""
    pids = sorted({p for g in protocol.gallery for p in g.pids if p >= 0} | {q.pid for q in protocol.queries})
    col = {p: i for i, p in enumerate(pids)}
    n_unl = sum(p < 0 for g in protocol.gallery for p in g.pids)
    dim, extra = len(pids) + n_unl, len(pids)
    gallery = {}
    for g in protocol.gallery:
        feats = np.zeros((len(g.boxes), dim), np.float32)
        for j, p in enumerate(g.pids):
            if p >= 0:
                feats[j, col[p]] = 1
            else:
                feats[j, extra] = 1
                extra += 1
        gallery[g.key] = Detections(np.asarray(g.boxes, np.float32).reshape(-1, 4),
                                    np.ones(len(g.boxes), np.float32), feats)
    queries = np.zeros((len(protocol.queries), dim), np.float32)
    for q in protocol.queries:
        queries[q.index, col[q.pid]] = 1
    return SearchInputs(gallery, queries)


def test_eval_results_file_with_perfect_outputs(prw, tmp_path, capsys):
    root, _ = prw
    protocol = load_protocol("prw", root)
    path = write_results(tmp_path / "oracle.npz", _oracle(protocol), "prw")
    argv = ["eval", "--dataset", "prw", "--root", str(root), "--results", str(path), "--out", str(tmp_path / "ev")]
    assert cli.main(argv) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["search"]["mAP"] == pytest.approx(1.0) and metrics["search"]["top1"] == 1.0
    assert metrics["detection"]["ap"] == pytest.approx(1.0) and metrics["detection"]["recall"] == 1.0
    table = capsys.readouterr().out
    assert "100.00" in table and "same camera included" in table

    broken = _oracle(protocol)
    del broken.gallery[protocol.gallery[0].key]
    write_results(tmp_path / "broken.npz", broken, "prw")
    argv[argv.index(str(path))] = str(tmp_path / "broken.npz")
    assert cli.main(argv) == 2
    assert "missing from the results" in capsys.readouterr().err


def test_eval_results_cuhk_gallery_sizes(cuhk, tmp_path):
    root, _ = cuhk
    for size in (50, -1):
        protocol = load_protocol("cuhk_sysu", root, size)
        path = write_results(tmp_path / f"oracle{size}.npz", _oracle(protocol), "cuhk_sysu")
        out = tmp_path / f"ev{size}"
        assert cli.main(["eval", "--dataset", "cuhk_sysu", "--root", str(root), "--results", str(path),
                         "--gallery-size", str(size), "--out", str(out), "eval.visualize=0"]) == 0
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["gallery_size"] == size
        # perfect features: a query misses only the recall lost to duplicated gallery names
        assert metrics["search"]["top1"] == 1.0 and metrics["search"]["mAP"] > 0.9


def test_eval_cuhk_iou_rule_and_query_subsets(cuhk, tmp_path, capsys):
    """The rule is in the table header and metrics.json; the occlusion and
    resolution subsets are scored from the release's subset files."""
    root, truth = cuhk
    protocol = load_protocol("cuhk_sysu", root, 100)
    inputs = _oracle(protocol)
    occluded = truth["query_subsets"]["occlusion"]
    inputs.query_feats[occluded] *= -1          # the occluded queries now rank their person last
    path = write_results(tmp_path / "r.npz", inputs, "cuhk_sysu")
    base = ["eval", "--dataset", "cuhk_sysu", "--root", str(root), "--results", str(path), "eval.visualize=0"]
    got = {}
    for rule in ("standard", "fixed"):
        out = tmp_path / rule
        assert cli.main(base + ["--out", str(out), "--iou-rule", rule]) == 0
        table = capsys.readouterr().out
        assert f"IoU rule {rule}" in table.splitlines()[[i for i, l in enumerate(table.splitlines())
                                                         if l.startswith("cuhk_sysu:")][0]]
        assert "query subsets" in table and "occlusion" in table and "not scored" not in table
        got[rule] = json.loads((out / "metrics.json").read_text())
        assert got[rule]["iou_rule"] == rule and got[rule]["settings"]["iou_rule"] == rule
        per_query = json.loads((out / "per_query.json").read_text())
        for name, idx in truth["query_subsets"].items():
            sub = got[rule]["query_subsets"][name]
            assert sub["n_queries"] == len(idx)
            assert sub["mAP"] == pytest.approx(np.mean([per_query[i]["ap"] for i in idx]))
    occ = got["standard"]["query_subsets"]["occlusion"]
    assert occ["top1"] == 0.0 < got["standard"]["search"]["top1"]
    # oracle boxes are exact: both rules agree here (the hand cases in test_evaluate show where they differ)
    assert got["fixed"]["search"]["mAP"] == pytest.approx(got["standard"]["search"]["mAP"])

    # without the subset files: one line says so, the full set is still scored
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(root, bare)
    shutil.rmtree(bare / "annotation/test/subset")
    assert cli.main(["eval", "--dataset", "cuhk_sysu", "--root", str(bare), "--results", str(path),
                     "eval.visualize=0", "--out", str(tmp_path / "bare_ev")]) == 0
    cap = capsys.readouterr()
    out = cap.out + cap.err                   # a note: logged (stderr), not part of the result table
    assert out.count("query subsets not scored") == 1 and "absent" in out
    assert json.loads((tmp_path / "bare_ev" / "metrics.json").read_text())["query_subsets"] == {}
    assert cli.main(base + ["eval.iou_rule=coco", "--out", str(tmp_path / "x")]) == 2
    assert "eval.iou_rule must be standard|fixed" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:                     # argparse's own exit 2 for a bad choice
        cli.main(base + ["--out", str(tmp_path / "x"), "--iou-rule", "coco"])
    assert e.value.code == 2


@pytest.mark.slow
def test_accelerate_launch_two_processes(prw, tmp_path):
    """A real ``accelerate launch`` with two CPU processes (gloo): the loader is
    sharded, only rank 0 writes the run."""
    import subprocess
    import sys

    root, _ = prw
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "hybridps.finetune", "train", "--dataset", "prw",
           "--root", str(root), "--config", str(TINY), "--init", "none", "--out", str(tmp_path / "run"),
           "--max-steps", "2", "--eval-every", "1", *FAST]       # rank 0 evaluates at step 1, rank 1 waits
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 process(es), DistributedType.MULTI_CPU" in proc.stderr      # the log: stderr
    records, _ = load_train_records("prw", root)
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    # each rank sees half the images: an epoch is ceil(n / 2 / batch) steps
    per_rank_steps = -(-(-(-len(records) // 2)) // 2)
    assert meta["steps"] == 2 and meta["epochs"] == pytest.approx(2 / per_rank_steps, abs=1e-3)
    assert [json.loads(ln)["step"] for ln in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()] == [1]
    assert (tmp_path / "run" / "eval_prw" / "metrics.json").is_file()


def test_inference_feeds_the_evaluator_with_cbgm_context(prw):
    from hybridps.finetune.engine import run_inference
    from hybridps.finetune.evaluate import SearchSettings, eval_search

    root, _ = prw
    protocol = load_protocol("prw", root)
    torch.manual_seed(0)
    model = build_search_model(tiny_model_cfg())
    inputs = run_inference(model, protocol, torch.device("cpu"), batch_size=4, cbgm=True, log=lambda _: None)
    assert set(inputs.gallery) == {g.key for g in protocol.gallery}
    assert inputs.query_feats.shape == (len(protocol.queries), model.cfg.emb_dim)
    np.testing.assert_allclose(np.linalg.norm(inputs.query_feats, axis=1), 1.0, rtol=1e-4)
    for q, ctx in zip(protocol.queries, inputs.query_context):
        np.testing.assert_array_equal(ctx.boxes[0], np.asarray(q.box, np.float32))
        np.testing.assert_array_equal(ctx.feats[0], inputs.query_feats[q.index])
        assert ctx.scores[0] == 1.0 and (np.diff(ctx.scores[1:]) <= 0).all()
    some = next(d for d in inputs.gallery.values() if len(d))
    # CWS: gallery features are unit embeddings scaled by the detection score
    np.testing.assert_allclose(np.linalg.norm(some.feats, axis=1), some.scores, rtol=1e-4)
    m = eval_search(protocol, inputs, SearchSettings(det_thresh=0.0, cbgm=True))
    assert len(m.per_query) == len(protocol.queries)


def test_eval_results_posetrack21_prw_style(tmp_path):
    from hybridps.data_prep.synth import posetrack21 as synth_pt21

    root = tmp_path / "posetrack21"
    truth = synth_pt21.write(root, seed=0, size="tiny")
    protocol = load_protocol("posetrack21", root)
    assert protocol.per_query_gallery is None
    assert len(protocol.queries) == len(truth["protocol"]["queries"])
    path = write_results(tmp_path / "oracle.npz", _oracle(protocol), "posetrack21")
    out = tmp_path / "ev"
    assert cli.main(["eval", "--dataset", "posetrack21", "--root", str(root), "--results", str(path),
                     "--out", str(out), "eval.visualize=0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    has_gt = metrics["search"]["n_queries"] - metrics["search"]["queries_without_gallery_gt"]
    # perfect outputs: every query with its person elsewhere in the gallery is found at rank 1
    assert metrics["search"]["top1"] == pytest.approx(has_gt / metrics["search"]["n_queries"])
    assert metrics["search"]["mAP"] == pytest.approx(has_gt / metrics["search"]["n_queries"])
    # no camera ids: the multi-view variant is refused with a clear message
    assert cli.main(["eval", "--dataset", "posetrack21", "--root", str(root), "--results", str(path),
                     "--out", str(out), "--cross-camera"]) == 2


def test_eval_cli_clear_errors(prw, tmp_path, capsys):
    root, _ = prw
    base = ["eval", "--dataset", "prw", "--out", str(tmp_path / "ev")]
    assert cli.main(base + ["--root", str(tmp_path / "nowhere"), "--results", "x.npz"]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert cli.main(base + ["--root", str(root), "--results", str(tmp_path / "absent.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(base + ["--root", str(root), "--results", "x.npz", "--gallery-size", "100"]) == 2
    assert "cuhk_sysu only" in capsys.readouterr().err
    assert cli.main(base + ["--root", str(root), "--results", "x.npz", "eval.gallery_size=7"]) == 2
    assert "gallery_size" in capsys.readouterr().err
