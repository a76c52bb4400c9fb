"""The Python API (finetune/api.py) and ``python -m hybridps.finetune search``.

The API's ranking is checked against the evaluator's own feature path
(finetune.engine.run_inference + finetune.evaluate.eval_search) on a tiny
fine-tuned model: same model loader result, same boxes, same order, same
scores.  A 2-step model ranks nothing correctly; consistency is the claim.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from hybridps.data_prep.synth import prw as synth_prw
from hybridps.finetune import cli
from hybridps.finetune.api import APIError, PersonSearchModel, create_model, rank
from hybridps.finetune.api import search as api_search
from hybridps.finetune.config import load_config
from hybridps.finetune.datasets import load_protocol
from hybridps.finetune.engine import run_inference
from hybridps.finetune.evaluate import SearchSettings, eval_search

TINY = Path(__file__).resolve().parents[1] / "finetune" / "configs" / "tiny.yaml"
FAST = ["model.min_size=96", "model.max_size=176", "model.roi_batch_size=8", "model.rpn_post_nms_train=32",
        "model.rpn_post_nms_test=12", "model.rpn_pre_nms_test=100", "model.detections_per_img=8",
        "eval.visualize=0"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Synthetic PRW + a 2-step fine-tuning run on it."""
    base = tmp_path_factory.mktemp("api")
    root = base / "prw"
    synth_prw.write(root, seed=0, size="tiny")
    run = base / "run"
    argv = ["train", "--dataset", "prw", "--root", str(root), "--config", str(TINY), "--init", "none",
            "--out", str(run), "--max-steps", "2", "--seed", "0", *FAST]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # 2 shared cores: one thread is faster for these sizes
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return root, run


def test_search_ranks_exactly_as_the_evaluator(world, one_thread):
    root, run = world
    model = create_model("nae_resnet18", weights=run)
    assert isinstance(model, PersonSearchModel) and not model.training
    assert model.det_thresh == 0.2                                   # the run's eval.det_thresh
    # the evaluator's own loader gives the same weights
    cfg = load_config(run / "config.yaml")
    ev_model, _ = cli.load_model_for_eval(str(run), cfg, log=lambda _m: None)
    ours = model.state_dict()
    assert all(torch.equal(v, ours[k]) for k, v in ev_model.state_dict().items())
    protocol = load_protocol("prw", root)
    protocol.queries = protocol.queries[:2]
    inputs = run_inference(ev_model.eval(), protocol, torch.device("cpu"), batch_size=1, log=lambda _m: None)
    k = 6
    metrics = eval_search(protocol, inputs, SearchSettings(det_thresh=0.0, keep_top=k))
    for q in protocol.queries:
        gallery = [g for g in protocol.gallery if g.key != q.image_key]   # PRW: every frame but the query's
        hits = model.search(q.image, q.box, [g.image for g in gallery], topk=k, det_thresh=0.0)
        top = metrics.per_query[q.index].top
        assert len(hits) == len(top) == k                              # not vacuous: k detections ranked
        assert [gallery[h.gallery].key for h in hits] == [t.image_key for t in top]
        np.testing.assert_allclose([h.box for h in hits], [t.box for t in top], rtol=0, atol=1e-4)
        np.testing.assert_allclose([h.score for h in hits], [t.score for t in top], rtol=1e-5, atol=1e-6)
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))
    # the module-level function works on the evaluator's plain SearchModel and agrees
    assert api_search(ev_model, q.image, q.box, [g.image for g in gallery], topk=k, det_thresh=0.0) == hits


def test_image_inputs_agree_and_bad_arguments_are_clear(world, one_thread):
    root, run = world
    model = create_model(None, weights=str(run))
    protocol = load_protocol("prw", root)
    q, g = protocol.queries[0], protocol.gallery[:3]
    path = q.image.path
    pil = Image.open(path).convert("RGB")
    as_path = model.embed_query(path, q.box)
    np.testing.assert_array_equal(as_path, model.embed_query(pil, q.box))
    np.testing.assert_array_equal(as_path, model.embed_query(np.asarray(pil), q.box))
    assert np.isclose(np.linalg.norm(as_path), 1.0, atol=1e-4)
    with pytest.raises(APIError, match="query_box"):
        model.search(path, [5, 5, 2, 2], [x.image for x in g])
    with pytest.raises(APIError, match="outside"):
        model.search(path, [5000, 5000, 6000, 6000], [x.image for x in g])
    with pytest.raises(APIError, match="non-empty list"):
        model.search(path, q.box, [])
    with pytest.raises(APIError, match="no such image"):
        model.search(path, q.box, ["/nonexistent.jpg"])
    with pytest.raises(APIError, match="det_thresh"):
        model.search(path, q.box, [x.image for x in g], det_thresh=float("nan"))


def test_rank_ties_and_threshold():
    q = np.array([1.0, 0.0], np.float32)
    g0 = {"boxes": np.array([[0, 0, 1, 1], [1, 1, 2, 2]], np.float32), "scores": np.array([0.9, 0.3], np.float32),
          "feats": np.array([[0.5, 0], [0.9, 0]], np.float32)}
    g1 = {"boxes": np.array([[2, 2, 3, 3]], np.float32), "scores": np.array([0.8], np.float32),
          "feats": np.array([[0.5, 0]], np.float32)}
    assert [(h.gallery, h.box[0]) for h in rank(q, [g0, g1], 0.0, 10)] == [(0, 1.0), (0, 0.0), (1, 2.0)]
    assert [(h.gallery, h.box[0]) for h in rank(q, [g1, g0], 0.5, 10)] == [(0, 2.0), (1, 0.0)]
    assert rank(q, [g0], 0.95, 10) == []


def test_create_model_from_the_other_weight_kinds(world, tmp_path, monkeypatch, one_thread):
    import torchvision

    from hybridps.checkpoints import cli as ckpt_cli

    _, run = world
    state = load_file(str(run / "model.safetensors"))
    # a pre-training-style run folder (no OIM table): scope full
    pre = tmp_path / "pre"
    pre.mkdir()
    from safetensors.torch import save_file

    no_oim = {k: v for k, v in state.items() if not k.startswith("roi_heads.reid_loss.")}
    save_file(no_oim, str(pre / "model.safetensors"))
    (pre / "meta.json").write_text(json.dumps({"backbone": "resnet18", "style": "pytorch"}))
    (pre / "config.yaml").write_text((run / "config.yaml").read_text())
    m = create_model("nae_resnet18", weights=pre)
    got = m.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("roi_heads.reid_loss."))
    # one safetensors file (the fine-tuned model's, OIM table and all; the table is not loaded)
    m1 = create_model("nae_resnet18", weights=run / "model.safetensors")
    assert torch.equal(m1.state_dict()["roi_heads.embedding_head.projectors.feat_res5.0.weight"],
                       state["roi_heads.embedding_head.projectors.feat_res5.0.weight"])
    assert m1.det_thresh == 0.5                     # no run config next to a bare file: the evaluator's default
    # the same folder as a registry name
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(tmp_path / "registry.json"))
    assert ckpt_cli.main(["add", "my-tiny-run", str(pre)]) == 0
    m2 = create_model("nae_resnet18", weights="my-tiny-run")
    assert torch.equal(m2.state_dict()["rpn.head.cls_logits.weight"], state["rpn.head.cls_logits.weight"])
    # a file of another model, a backbone-only file, a hostile pickle
    with pytest.raises(APIError, match="use 'nae_resnet18'"):
        create_model("nae_resnet50", weights=run)
    with pytest.raises(APIError, match="unknown model"):
        create_model("resnet18", weights=run)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(APIError, match="scope='backbone'"):
        create_model("nae_resnet18", weights=tmp_path / "r18.pth")
    assert create_model("nae_resnet18", weights=tmp_path / "r18.pth", scope="backbone").training is False

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(APIError):
        create_model("nae_resnet18", weights=tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_create_model_from_a_published_run(world, tmp_path, monkeypatch, one_thread):
    from hybridps.checkpoints import cli as ckpt_cli
    from hub_emulation import start_hub

    _, run = world
    hub = start_hub(tokens=("tok",))
    try:
        for var in ("HF_HUB_OFFLINE", "HYBRIDPS_OFFLINE", "HF_HUB_CACHE", "http_proxy", "HTTP_PROXY"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        assert ckpt_cli.main(["push", str(run), "--repo", "me/tiny-prw", "--token", "tok"]) == 0
        card = hub.repos["me/tiny-prw"]["README.md"].decode()
        assert "fine-tuned on prw for 2 steps" in card and "PRW: research use only" in card
        m = create_model("nae_resnet18", weights="hf://me/tiny-prw")
        local = create_model("nae_resnet18", weights=run)
        assert m.det_thresh == local.det_thresh
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in local.state_dict().items())
        # fine-tuning's --init takes the same address (checkpoints.read_source)
        from hybridps.finetune.init import resolve_init

        init = resolve_init("hf://me/tiny-prw")
        assert init.backbone == "resnet18" and torch.equal(
            init.state_dict["rpn.head.cls_logits.weight"], local.state_dict()["rpn.head.cls_logits.weight"])
    finally:
        hub.shutdown()
        hub.server_close()


def test_search_cli_writes_the_png(world, tmp_path, capsys, one_thread):
    root, run = world
    protocol = load_protocol("prw", root)
    q = protocol.queries[0]
    gallery = [g.image.path for g in protocol.gallery if g.key != q.image_key][:4]
    out = tmp_path / "fig" / "hits.png"
    argv = ["search", "--weights", str(run), "--query", q.image.path, "--box", *map(str, q.box),
            "--gallery", *gallery, "--topk", "3", "--det-thresh", "0", "--out", str(out),
            "--json", str(tmp_path / "hits.json"), "--device", "cpu"]
    assert cli.main(argv) == 0
    hits = json.loads((tmp_path / "hits.json").read_text())
    assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["score"] >= hits[-1]["score"]
    with Image.open(out) as im:
        assert im.format == "PNG"
        assert im.size == (4 + 4 * (200 + 4), 240 + 14 + 2 * 4)        # query tile + 3 hits
    # a folder as the gallery; errors are one line, exit 2
    folder = tmp_path / "gal"
    folder.mkdir()
    for p in gallery[:2]:
        (folder / Path(p).name).write_bytes(Path(p).read_bytes())
    argv2 = argv[:argv.index("--gallery") + 1] + [str(folder), "--topk", "10", "--det-thresh", "0",
                                                  "--out", str(tmp_path / "h2.png")]
    assert cli.main(argv2) == 0
    capsys.readouterr()
    for bad, msg in ((["--box", "5", "5", "1", "1"], "query_box"), (["--gallery", str(tmp_path / "none")], "no such"),
                     (["--weights", str(tmp_path / "nothing")], "nothing")):
        a = list(argv)
        i = a.index(bad[0])
        a[i:i + len(bad)] = bad
        if bad[0] == "--gallery":
            a = a[:i + 2] + a[i + 2 + len(gallery) - 1:]
        assert cli.main(a) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
