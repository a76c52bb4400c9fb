"""Hostile files and bad values against ``python -m hybridps.finetune`` (issue 9).

Real results files written by ``write_results`` and then poisoned (NaN
features, inf boxes, a ``meta`` that is a list), ``.npz`` archives written
member by member with ``zipfile`` (an object array carrying a ``__reduce__``
payload, a header that lies about its shape, 300 MB of zeros deflated to
300 KB), run directories whose ``meta.json`` is a list, and a real training
run with a learning rate that diverges.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridps.data_prep.synth import prw as synth_prw
from hybridps.finetune import cli
from hybridps.finetune.datasets import load_protocol
from hybridps.finetune.evaluate import Detections, SearchInputs
from hybridps.finetune.results_io import ResultsFileError, read_results, write_results
from test_finetune import FAST, TINY, _oracle


@pytest.fixture(scope="module")
def prw(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "prw"
    synth_prw.write(root, seed=0, size="tiny")
    return root, load_protocol("prw", root)


def one_line_error(capsys) -> str:
    """The one error line; the run's log lines ("python -m hybridps.finetune: ...") may precede it."""
    err = capsys.readouterr().err.strip()
    lines = [ln for ln in err.splitlines() if not ln.startswith("hybridps finetune: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def eval_argv(root, results, out, *extra):
    return ["eval", "--dataset", "prw", "--root", str(root), "--results", str(results), "--out", str(out), *extra]


def _poison(inputs: SearchInputs, what: str) -> SearchInputs:
    g = {}
    for k, d in inputs.gallery.items():
        boxes, scores, feats = d.boxes.copy(), d.scores.copy(), d.feats.copy()
        if what == "feats":
            feats[:] = np.nan
        elif what == "boxes" and len(boxes):
            boxes[0, 2] = np.inf
        elif what == "scores" and len(scores):
            scores[0] = np.nan
        g[k] = Detections(boxes, scores, feats)
    q = inputs.query_feats.copy()
    if what == "query":
        q[:] = np.nan
    return SearchInputs(g, q, inputs.query_context)


@pytest.mark.parametrize("what", ["feats", "boxes", "scores", "query"])
def test_non_finite_results_refused(prw, tmp_path, capsys, what):
    root, protocol = prw
    path = write_results(tmp_path / "r.npz", _poison(_oracle(protocol), what), "prw")
    assert cli.main(eval_argv(root, path, tmp_path / "ev")) == 2
    assert "NaN/inf" in one_line_error(capsys)
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_non_finite_model_outputs_refused_by_the_evaluator(prw):
    """The same check sits in the evaluator, so a model's NaN outputs never score either."""
    from hybridps.finetune.evaluate import EvaluationError, SearchSettings, eval_search
    _, protocol = prw
    with pytest.raises(EvaluationError, match="NaN/inf"):
        eval_search(protocol, _poison(_oracle(protocol), "feats"), SearchSettings())
    with pytest.raises(EvaluationError, match="det_thresh"):
        eval_search(protocol, _oracle(protocol), SearchSettings(det_thresh=float("nan")))


@pytest.mark.parametrize("thresh", ["nan", "inf", "-0.1", "1.5"])
def test_det_thresh_out_of_range_refused(prw, tmp_path, capsys, thresh):
    root, protocol = prw
    path = write_results(tmp_path / "r.npz", _oracle(protocol), "prw")
    assert cli.main(eval_argv(root, path, tmp_path / "ev", "--det-thresh", thresh)) == 2
    assert "--det-thresh" in one_line_error(capsys)


def _rewrite(path: Path, replace: dict[str, bytes] | None = None, add: dict[str, bytes] | None = None) -> None:
    """Rewrite an .npz with some members' raw .npy bytes replaced or added."""
    with zipfile.ZipFile(path) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    members.update({f"{k}.npy": v for k, v in (replace or {}).items()})
    members.update({f"{k}.npy": v for k, v in (add or {}).items()})
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def _npy(arr: np.ndarray, allow_pickle=False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.mark.parametrize("meta", [[1, 2], "just text", 5, None])
def test_meta_not_an_object(prw, tmp_path, capsys, meta):
    root, protocol = prw
    path = write_results(tmp_path / "r.npz", _oracle(protocol), "prw")
    _rewrite(path, {"meta": _npy(np.asarray(json.dumps(meta)))})
    assert cli.main(eval_argv(root, path, tmp_path / "ev")) == 2
    assert "'meta'" in one_line_error(capsys)


def test_object_array_never_unpickled(prw, tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _, protocol = prw
    path = write_results(tmp_path / "r.npz", _oracle(protocol), "prw")
    arr = np.empty(1, dtype=object)
    arr[0] = Boom()
    _rewrite(path, {"query_feats": _npy(arr, allow_pickle=True)})
    with pytest.raises(ResultsFileError, match="object array"):
        read_results(path)
    assert not marker.exists()


def _zeros_member(zf: zipfile.ZipFile, name: str, shape: tuple, dtype=np.float32) -> None:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                                  "shape": shape})
    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
        f.write(header.getvalue())
        block = bytes(1 << 20)
        left = int(np.prod(shape)) * np.dtype(dtype).itemsize
        while left:
            f.write(block[:min(left, len(block))])
            left -= min(left, len(block))


def test_unused_huge_member_is_never_read(prw, tmp_path):
    _, protocol = prw
    path = write_results(tmp_path / "r.npz", _oracle(protocol), "prw")
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        _zeros_member(zf, "padding", (75_000_000,))          # 300 MB of zeros in ~300 KB
    assert path.stat().st_size < 2_000_000
    t0 = time.monotonic()
    inputs, meta = read_results(path)
    assert time.monotonic() - t0 < 2 and meta["dataset"] == "prw"


def test_needed_member_inflating_past_the_archive_refused(prw, tmp_path):
    _, protocol = prw
    path = write_results(tmp_path / "r.npz", _oracle(protocol), "prw")
    with zipfile.ZipFile(path) as zf:
        keep = {i.filename: zf.read(i) for i in zf.infolist() if i.filename != "query_feats.npy"}
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in keep.items():
            zf.writestr(name, data)
        _zeros_member(zf, "query_feats", (len(protocol.queries), 75_000_000 // len(protocol.queries)))
    with pytest.raises(ResultsFileError, match="refusing to inflate"):
        read_results(path)


def test_npy_header_lying_about_its_shape_refused(prw, tmp_path):
    _, protocol = prw
    path = write_results(tmp_path / "r.npz", _oracle(protocol), "prw")
    real = _npy(np.zeros((len(protocol.queries), 4), np.float32))
    lie = real.replace(f"({len(protocol.queries)}, 4)".encode(), f"({len(protocol.queries)}, 9)".encode())
    _rewrite(path, {"query_feats": lie})
    with pytest.raises(ResultsFileError, match="declares"):
        read_results(path)


@pytest.mark.parametrize("meta", [[{"kind": "x"}], "str"])
def test_run_dir_meta_json_not_an_object(prw, tmp_path, capsys, meta):
    root, _ = prw
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"\0" * 16)
    (run / "meta.json").write_text(json.dumps(meta))
    assert cli.main(["eval", "--dataset", "prw", "--root", str(root), "--checkpoint", str(run),
                     "--out", str(tmp_path / "ev")]) == 2
    assert "meta.json" in one_line_error(capsys)


@pytest.mark.parametrize("mean", [5, [1, 2], ["a", "b", "c"], [float("nan"), 0, 0]])
def test_checkpoint_normalization_metadata_checked(tmp_path, capsys, mean):
    from torchvision.models import resnet18
    from hybridps.checkpoints import cli as ck_cli
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": resnet18().state_dict(), "meta": {"mean": mean, "std": [1, 1, 1]}}, path)
    assert ck_cli.main(["inspect", str(path)]) == 2
    assert "normalization mean" in one_line_error(capsys)


def test_diverging_training_exits_2_one_line(prw, tmp_path, capsys):
    root, _ = prw
    argv = ["train", "--dataset", "prw", "--root", str(root), "--config", str(TINY), "--init", "none",
            "--out", str(tmp_path / "run"), *FAST, "train.lr=1e30", "train.max_steps=4", "train.grad_clip=0"]
    assert cli.main(argv) == 2
    assert "non-finite loss" in one_line_error(capsys)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize("exc, code, words", [(KeyboardInterrupt(), 130, "interrupted"),
                                              (ZeroDivisionError("boom"), 1, "internal error"),
                                              (OSError(28, "No space left on device", "/x/metrics.json"), 2,
                                               "disk full"),
                                              (PermissionError(13, "Permission denied", "/x"), 2,
                                               "permission denied")])
def test_finetune_exit_contract(monkeypatch, capsys, exc, code, words):
    def boom(args):
        raise exc
    monkeypatch.setattr(cli, "cmd_compare", boom)
    assert cli.main(["compare", "x"]) == code
    assert words in one_line_error(capsys)


def test_finetune_image_reader_refuses_bombs_and_scales_16_bit(tmp_path):
    from PIL import Image

    from hybridps.data_prep.record import ImageRef
    from hybridps.finetune.datasets import DatasetError, read_image
    from test_hostile_data import png_with_size
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_with_size(60000, 60000))
    with pytest.raises(DatasetError, match="too_large_image"):
        read_image(ImageRef("file", str(bomb)))
    deep = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 32768, np.uint16)).save(deep)
    img = read_image(ImageRef("file", str(deep)))
    assert 0.45 < float(img.mean()) < 0.55          # 32768/65535, not clipped to white
