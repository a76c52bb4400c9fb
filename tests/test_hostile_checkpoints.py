"""Hostile files, faults and bad values against ``python -m checkpoints`` (issue 9).

Every input is made here for real: pickles written byte by byte, ``torch.save``
files whose metadata holds itself or nests 20000 deep, zip archives whose
members declare gigabytes, registry files naming ``../../x``, and a real
HTTP server on 127.0.0.1 (``http.server`` in a thread) that stalls, lies
about lengths and ranges, or answers HTML.
"""
from __future__ import annotations

import json
import os
import pickle
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch

from checkpoints import cli, registry
from checkpoints.safe_load import NotAStateDictError, UnsafeFileError, load_checkpoint
from test_hostile_data import deep_pickle, laughs_pickle, self_pickle


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ code execution / bounds
@pytest.mark.parametrize("kind", ["laughs", "self", "deep"])
def test_pkl_bounded(tmp_path, kind):
    path = tmp_path / "model.pkl"
    path.write_bytes({"laughs": laughs_pickle, "self": self_pickle, "deep": deep_pickle}[kind]())
    t0 = time.monotonic()
    with pytest.raises(NotAStateDictError, match="billion laughs|contains itself|levels deep"):
        load_checkpoint(path)
    assert time.monotonic() - t0 < 5


def _nested(depth: int) -> list:
    root: list = []
    cur = root
    for _ in range(depth):
        nxt: list = []
        cur.append(nxt)
        cur = nxt
    return root


@pytest.mark.parametrize("kind", ["laughs", "self", "deep"])
def test_pth_metadata_bounded(tmp_path, kind, capsys):
    if kind == "laughs":
        meta = pickle.loads(laughs_pickle(50))
    elif kind == "self":
        meta = []
        meta.append(meta)
    else:
        meta = _nested(20000)
    path = tmp_path / "model.pth"
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)      # only the writer recurses (pickle.dumps of a 20000-deep list)
    try:
        torch.save({"state_dict": {"conv1.weight": torch.zeros(2, 3, 1, 1)}, "meta": meta}, path)
    finally:
        sys.setrecursionlimit(old)
    t0 = time.monotonic()
    with pytest.raises(NotAStateDictError, match="billion laughs|contains itself|levels deep"):
        load_checkpoint(path)
    assert time.monotonic() - t0 < 10
    assert cli.main(["inspect", str(path)]) == 2
    one_line_error(capsys)


def test_pkl_reduce_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    for name in ("model.pkl", "model.pth"):
        path = tmp_path / name
        if name.endswith(".pkl"):
            path.write_bytes(pickle.dumps({"w": Boom()}, protocol=2))
        else:
            torch.save({"w": Boom()}, path)
        with pytest.raises(UnsafeFileError):
            load_checkpoint(path)
    assert not marker.exists()


def test_zip_members_declaring_gigabytes_refused_before_loading(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        # 300 MB of zeros deflate to ~300 KB: torch would materialise all of it
        with zf.open("archive/data/0", "w", force_zip64=True) as f:
            block = bytes(1 << 20)
            for _ in range(300):
                f.write(block)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(NotAStateDictError, match="declare"):
        load_checkpoint(path)


def test_truncated_pth_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "model.pth"
    torch.save({"conv1.weight": torch.zeros(8, 3, 7, 7)}, path)
    path.write_bytes(path.read_bytes()[:300])
    assert cli.main(["inspect", str(path)]) == 2
    one_line_error(capsys)


# ------------------------------------------------------------------ writes outside the cache
BAD_FILES = ["../../../../x.pth", "/tmp/abs.pth", "..", "a/../../b.pth", "~/x.pth", ""]


@pytest.mark.parametrize("bad", BAD_FILES)
def test_user_registry_file_escaping_cache_refused(tmp_path, monkeypatch, bad):
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"entries": [{
        "name": "evil", "source": {"type": "url", "url": "http://127.0.0.1:9/x.pth"}, "file": bad,
        "arch": "resnet50", "layout": "torchvision"}]}))
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(reg))
    with pytest.raises(registry.RegistryError, match="file must be"):
        registry.load_entries()


def test_hf_source_file_escaping_refused(tmp_path, monkeypatch, capsys):
    reg = tmp_path / "registry.json"
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(reg))
    assert cli.main(["add", "evil", "hf://owner/repo/../../../x.pth", "--arch", "resnet50",
                     "--layout", "torchvision"]) == 2
    assert "file must be" in one_line_error(capsys)
    assert not reg.exists()
    # a hub file in a folder of its repository is fine
    assert cli.main(["add", "ok", "hf://owner/repo/sub/x.pth", "--arch", "resnet50", "--layout", "torchvision"]) == 0


def test_add_url_ending_in_dotdot_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(tmp_path / "registry.json"))
    assert cli.main(["add", "evil", "http://127.0.0.1:9/a/..", "--arch", "resnet50", "--layout", "torchvision"]) == 2
    one_line_error(capsys)


def test_registry_not_an_object_entries(tmp_path, monkeypatch):
    reg = tmp_path / "registry.json"
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(reg))
    for text in ('{"entries": [1]}', '{"entries": [{"name": "x", "source": [], "file": "a.pth", '
                 '"arch": "resnet50", "layout": "torchvision"}]}', "[" * 100000, b"\xff\xfe".decode("latin1")):
        reg.write_text(text, encoding="latin1")
        with pytest.raises(registry.RegistryError):
            registry.load_entries()
