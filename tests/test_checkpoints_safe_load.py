"""Safe loading: weights in, code never executed."""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from hybridps.checkpoints.convert import convert
from hybridps.checkpoints.safe_load import NotAStateDictError, UnsafeFileError, load_checkpoint, load_pickle_arrays, \
    load_state_dict


class _Evil:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".pkl", ".bin"])
def test_malicious_raw_pickle_is_refused_and_does_not_run(tmp_path, suffix):
    marker = tmp_path / "pwned"
    bad = tmp_path / f"evil{suffix}"
    bad.write_bytes(pickle.dumps({"model": {"conv1.weight": _Evil(marker)}}, protocol=2))
    # sanity: a plain unpickle really would run it
    pickle.loads(pickle.dumps(_Evil(tmp_path / "control")))
    assert (tmp_path / "control").exists()
    with pytest.raises(UnsafeFileError, match="refus"):
        load_state_dict(bad)
    assert not marker.exists()


def test_malicious_torch_zip_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Evil(marker)}, bad)
    with pytest.raises(UnsafeFileError):
        load_state_dict(bad)
    assert not marker.exists()
    with pytest.raises(UnsafeFileError):
        convert(bad, "torchvision", tmp_path / "out.pth")
    assert not marker.exists() and not (tmp_path / "out.pth").exists()


def test_detectron2_pickle_of_arrays_loads(tmp_path):
    arrays = {"backbone.bottom_up.stem.conv1.weight": np.ones((4, 3, 1, 1), np.float32),
              "backbone.bottom_up.res2.0.conv1.norm.bias": np.arange(4, dtype=np.float32)}
    f = tmp_path / "m.pkl"
    f.write_bytes(pickle.dumps({"model": arrays, "__author__": "x", "matching_heuristics": True}, protocol=2))
    ck = load_checkpoint(f)
    assert ck.container == "detectron2-pkl" and ck.wrapped_in == "model"
    assert ck.metadata["__author__"] == "x" and ck.metadata["matching_heuristics"] is True
    assert torch.equal(ck.state_dict["backbone.bottom_up.res2.0.conv1.norm.bias"], torch.arange(4.0))
    # protocol 5 (numpy's out-of-band-capable path) goes through the same allowlist
    f.write_bytes(pickle.dumps({"model": arrays, "__author__": "x"}, protocol=5))
    assert load_state_dict(f)["backbone.bottom_up.stem.conv1.weight"].shape == (4, 3, 1, 1)


def test_unwrapping_and_prefix_stripping(tmp_path):
    w = torch.arange(6.0).reshape(2, 3)
    for i, obj in enumerate([{"state_dict": OrderedDict({"module.a.weight": w}), "meta": {"style": "caffe"}},
                             {"model": {"a.weight": w}, "epoch": 3},
                             {"module.a.weight": w}]):
        f = tmp_path / f"c{i}.pth"
        torch.save(obj, f)
        ck = load_checkpoint(f)
        assert list(ck.state_dict) == ["a.weight"] and torch.equal(ck.state_dict["a.weight"], w)
    assert load_checkpoint(tmp_path / "c0.pth").metadata["style"] == "caffe"
    assert load_checkpoint(tmp_path / "c1.pth").metadata["epoch"] == 3


def test_safetensors_metadata_round_trip(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "m.safetensors"
    save_file({"x": torch.ones(2)}, str(f), metadata={"style": "pytorch", "mean": "[1, 2, 3]"})
    ck = load_checkpoint(f)
    assert ck.metadata == {"style": "pytorch", "mean": [1, 2, 3]}


@pytest.mark.parametrize("payload,match", [
    ({"a": torch.zeros(1), "b": 3}, "tensors or numeric arrays"),
    ([torch.zeros(1)], "not a dict"),
    ({}, "no weights"),
])
def test_non_weight_content_is_a_clear_error(tmp_path, payload, match):
    f = tmp_path / "x.pth"
    torch.save(payload, f)
    with pytest.raises(NotAStateDictError, match=match):
        load_state_dict(f)


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "t.pth").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(NotAStateDictError, match="not a readable torch file"):
        load_state_dict(tmp_path / "t.pth")
    (tmp_path / "t.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(NotAStateDictError, match="safetensors"):
        load_state_dict(tmp_path / "t.safetensors")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(NotAStateDictError, match="unknown weight file type"):
        load_state_dict(tmp_path / "w.onnx")
    with pytest.raises(FileNotFoundError):
        load_state_dict(tmp_path / "absent.pth")
    with pytest.raises(UnsafeFileError):
        load_pickle_arrays(pickle.dumps(_Evil(tmp_path / "p")))
    assert not (tmp_path / "p").exists()
