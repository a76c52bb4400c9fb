"""Hostile files, faults and bad values against ``python -m hybridps.checkpoints`` (issue 9).

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

from hybridps.checkpoints import cli, registry
from hybridps.checkpoints.safe_load import NotAStateDictError, UnsafeFileError, load_checkpoint
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


# ------------------------------------------------------------------ downloads
import gzip
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from hybridps.checkpoints.download import DownloadError, download_url


def torch_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"conv1.weight": torch.randn(8, 3, 7, 7)}, buf)
    return buf.getvalue()


def safetensors_bytes() -> bytes:
    from safetensors.torch import save
    return save({"conv1.weight": torch.randn(8, 3, 7, 7)})


class _Hostile(BaseHTTPRequestHandler):
    """One behaviour per path; each is a way a real server or proxy has lied."""

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: C901 - a table of behaviours
        body = self.server.body
        kind = self.path.strip("/").split(".")[0]
        self.server.requests.append((self.path, self.headers.get("Range")))
        if kind == "stall":                       # 1 byte every 5 s: no per-socket timeout ever trips
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for b in body:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(5)
            return
        if kind == "trickle":                     # 1 byte every 0.2 s: alive, but hopeless
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for b in body:
                self.wfile.write(bytes([b]))
                self.wfile.flush()
                time.sleep(0.2)
            return
        if kind == "short_length":                # Content-Length smaller than the body it sends
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) // 2))
            self.end_headers()
            self.wfile.write(body)
            return
        if kind == "cut_nolength":                # no Content-Length, connection closed half-way
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        if kind == "html":
            page = b"<!DOCTYPE html><html><body>Please log in</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if kind == "html_octet":                  # an error page labelled as binary
            page = b"<html><head><title>502</title></head></html>"
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)
            return
        if kind == "badrange":                    # 206 with a range nobody asked for
            part = body[100:]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 100-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Length", str(len(part)))
            self.end_headers()
            self.wfile.write(part)
            return
        if kind == "gzip":
            packed = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(packed)))
            self.end_headers()
            self.wfile.write(packed)
            return
        self.send_response(200)                   # "ok": the honest answer
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def hostile_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
    srv.daemon_threads = True
    srv.body = torch_bytes()
    srv.requests = []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_stalling_server_hits_the_overall_deadline(hostile_server, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDPS_DOWNLOAD_DEADLINE", "2")
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="deadline"):
        download_url(hostile_server.url + "/stall.pth", tmp_path / "w.pth", log=lambda m: None)
    assert time.monotonic() - t0 < 4
    assert not (tmp_path / "w.pth").exists()


def test_trickling_server_is_below_the_minimum_rate(hostile_server, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match="too slow"):
        download_url(hostile_server.url + "/trickle.pth", tmp_path / "w.pth", deadline=3, min_rate=1000,
                     log=lambda m: None)
    assert time.monotonic() - t0 < 4


@pytest.mark.parametrize("kind", ["short_length", "cut_nolength", "html", "html_octet", "badrange", "gzip"])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_lying_servers_never_leave_a_downloaded_file(hostile_server, tmp_path, kind, suffix):
    hostile_server.body = torch_bytes() if suffix == ".pth" else safetensors_bytes()
    dest = tmp_path / f"w{suffix}"
    with pytest.raises(DownloadError) as err:
        download_url(f"{hostile_server.url}/{kind}{suffix}", dest, retries=1, log=lambda m: None)
    assert "\n" not in str(err.value)
    assert not dest.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".pkl"])
def test_honest_server_without_hash_still_works(hostile_server, tmp_path, suffix):
    hostile_server.body = {".pth": torch_bytes(), ".safetensors": safetensors_bytes(),
                           ".pkl": pickle.dumps({"w": [1.0, 2.0]}, protocol=2)}[suffix]
    dest = tmp_path / f"w{suffix}"
    download_url(f"{hostile_server.url}/ok{suffix}", dest, log=lambda m: None)
    assert dest.read_bytes() == hostile_server.body


def test_resume_answered_with_another_range_restarts(hostile_server, tmp_path):
    body = hostile_server.body
    dest = tmp_path / "w.pth"
    (tmp_path / "w.pth.part").write_bytes(body[:50])         # we ask for bytes=50-, it answers 100-
    with pytest.raises(DownloadError):
        download_url(hostile_server.url + "/badrange.pth", dest, retries=1, log=lambda m: None)
    assert not dest.exists()
    assert all(r is None or r == "bytes=50-" for _, r in hostile_server.requests)


# ------------------------------------------------------------------ silent wrong weights
def _r18() -> dict:
    from torchvision.models import resnet18
    torch.manual_seed(0)
    return resnet18().state_dict()


def test_every_tensor_3x3_is_mismatched_not_matched(tmp_path, capsys):
    sd = {k: torch.zeros(3, 3) if v.is_floating_point() else v for k, v in _r18().items()}
    src = tmp_path / "r18_3x3.pth"
    torch.save(sd, src)
    assert cli.main(["inspect", str(src), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["shape_mismatches"] > 50 and info["matched_fraction"] < 0.2
    out = tmp_path / "tv.pth"
    assert cli.main(["convert", str(src), "--to", "torchvision", "--out", str(out)]) == 2
    err = one_line_error(capsys)
    assert "matched" in err or "shape" in err
    assert not out.exists()


def test_nan_weights_refused_unless_force(tmp_path, capsys):
    sd = _r18()
    sd["conv1.weight"] = torch.full_like(sd["conv1.weight"], float("nan"))
    sd["layer1.0.bn1.running_var"][0] = float("inf")
    src = tmp_path / "r18_nan.pth"
    torch.save(sd, src)
    out = tmp_path / "tv.pth"
    assert cli.main(["convert", str(src), "--to", "torchvision", "--out", str(out)]) == 2
    assert "NaN/inf" in one_line_error(capsys) and not out.exists()
    assert cli.main(["convert", str(src), "--to", "torchvision", "--out", str(out), "--force"]) == 0
    assert "WARNING" in capsys.readouterr().err and out.exists()
    assert cli.main(["inspect", str(src)]) == 0
    assert "NaN/inf" in capsys.readouterr().err


def test_internal_error_is_exit_1_without_traceback(tmp_path, capsys, monkeypatch):
    """A bug (here: an unexpected exception type from a layout) is exit 1, one line, unless HYBRIDPS_DEBUG."""
    from hybridps.checkpoints import cli as ck
    monkeypatch.setattr(ck, "cmd_list", lambda args: (_ for _ in ()).throw(ZeroDivisionError("boom")))
    parser_main = ck.main
    # cmd_list was bound at parser build time: rebuild so the replacement is used
    assert parser_main(["list"]) == 1
    err = one_line_error(capsys)
    assert "internal error" in err and "HYBRIDPS_DEBUG" in err
    monkeypatch.setenv("HYBRIDPS_DEBUG", "1")
    with pytest.raises(ZeroDivisionError):
        parser_main(["list"])


def test_unwritable_out_is_permission_denied_exit_2(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    torch.save(_r18(), tmp_path / "r18.pth")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        assert cli.main(["convert", str(tmp_path / "r18.pth"), "--to", "torchvision", "--out", str(ro / "x.pth")]) == 2
        assert "permission denied" in one_line_error(capsys)
    finally:
        ro.chmod(0o700)
