"""Downloads against real HTTP servers on 127.0.0.1: resume after a cut, checksums, hub emulation."""
from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from hybridps.checkpoints import cli, registry
from hybridps.checkpoints.download import ChecksumError, DownloadError, OfflineError, download_url, fetch, hf_download

PAYLOAD = bytes(range(256)) * 4096          # 1 MiB, every byte position distinguishable
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    """Static files with Range support, a one-shot truncation, and the two hub endpoints."""

    def log_message(self, *args):  # keep test output clean
        pass

    def _file(self) -> tuple[str, bytes | None]:
        path = self.path.split("?")[0]
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:                                       # hub: /<owner>/<repo>/resolve/<rev>/<file>
            repo, rev, name = m.groups()
            if repo not in self.server.repos:
                return "no-repo", None
            return "hub", self.server.repos[repo].get(name)
        return "plain", self.server.files.get(path)

    def _send_headers(self, kind: str, body: bytes, status: int, extra: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if kind == "hub":
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", '"' + hashlib.sha256(body if status == 200 else b"").hexdigest() + '"')
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()

    def _not_found(self, kind: str) -> None:
        self.send_response(404)
        if kind == "hub":
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("X-Error-Code", "EntryNotFound")
        elif kind == "no-repo":
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_HEAD(self):
        kind, data = self._file()
        self.server.log.append(("HEAD", self.path, self.headers.get("Range")))
        if data is None:
            return self._not_found(kind)
        self._send_headers(kind, data, 200, {})

    def do_GET(self):
        kind, data = self._file()
        rng = self.headers.get("Range")
        self.server.log.append(("GET", self.path, rng))
        if data is None:
            return self._not_found(kind)
        start = 0
        if rng and self.server.ranges:
            start = int(re.match(r"bytes=(\d+)-", rng).group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            body = data[start:]
            self._send_headers(kind, body, 206, {"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        else:
            body = data
            self._send_headers(kind, body, 200, {})
        if self.path in self.server.cut_next:
            self.server.cut_next.discard(self.path)
            self.wfile.write(body[: len(body) // 3])   # promise everything, send a third, hang up
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files, srv.repos, srv.log, srv.cut_next, srv.ranges = {}, {}, [], set(), True
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    for var in ("HYBRIDPS_OFFLINE", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HYBRIDPS_CACHE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HYBRIDPS_REGISTRY", str(tmp_path / "user_registry.json"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# ----------------------------------------------------------------- plain URLs
def test_resume_after_a_cut_connection(server, tmp_path):
    server.files["/w.pth"] = PAYLOAD
    server.cut_next.add("/w.pth")
    dest = tmp_path / "cache" / "w.pth"
    assert download_url(server.url + "/w.pth", dest, sha256=SHA) == dest
    assert dest.read_bytes() == PAYLOAD and not dest.with_name("w.pth.part").exists()
    gets = [(m, r) for m, p, r in server.log if m == "GET"]
    assert gets == [("GET", None), ("GET", f"bytes={len(PAYLOAD) // 3}-")]


def test_partial_file_survives_and_the_next_run_resumes(server, tmp_path):
    server.files["/w.pth"] = PAYLOAD
    server.cut_next.add("/w.pth")
    dest = tmp_path / "w.pth"
    with pytest.raises(DownloadError, match="partial file .* is kept"):
        download_url(server.url + "/w.pth", dest, sha256=SHA, retries=0)
    part = tmp_path / "w.pth.part"
    assert part.stat().st_size == len(PAYLOAD) // 3 and not dest.exists()
    download_url(server.url + "/w.pth", dest, sha256=SHA)
    assert dest.read_bytes() == PAYLOAD
    assert server.log[-1] == ("GET", "/w.pth", f"bytes={len(PAYLOAD) // 3}-")


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.files["/w.pth"] = PAYLOAD
    server.ranges = False
    (tmp_path / "w.pth.part").write_bytes(b"stale bytes from an older file")
    download_url(server.url + "/w.pth", tmp_path / "w.pth", sha256=SHA)
    assert (tmp_path / "w.pth").read_bytes() == PAYLOAD


def test_wrong_checksum_is_rejected_and_not_kept(server, tmp_path):
    server.files["/w.pth"] = PAYLOAD
    dest = tmp_path / "w.pth"
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        download_url(server.url + "/w.pth", dest, sha256="0" * 64)
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth.lock"]
    with pytest.raises(ChecksumError):
        download_url(server.url + "/w.pth", dest, sha256_prefix="deadbeef")
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth.lock"]
    download_url(server.url + "/w.pth", dest, sha256_prefix=SHA[:8])
    assert dest.read_bytes() == PAYLOAD


def test_corrupted_cached_copy_is_replaced(server, tmp_path):
    server.files["/w.pth"] = PAYLOAD
    dest = tmp_path / "w.pth"
    dest.write_bytes(b"corrupted")
    download_url(server.url + "/w.pth", dest, sha256=SHA)
    assert dest.read_bytes() == PAYLOAD


def test_http_errors_and_no_network_are_clear(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404.*not found"):
        download_url(server.url + "/missing.pth", tmp_path / "m.pth")
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                                   # nothing listens there any more
    with pytest.raises(DownloadError, match="cannot reach the server"):
        download_url(f"http://127.0.0.1:{port}/w.pth", tmp_path / "w.pth")
    assert not (tmp_path / "w.pth").exists() and not (tmp_path / "w.pth.part").exists()


def test_offline_mode_uses_only_the_cache(server, tmp_path, monkeypatch):
    server.files["/w.pth"] = PAYLOAD
    dest = tmp_path / "w.pth"
    with pytest.raises(OfflineError, match="not cached"):
        download_url(server.url + "/w.pth", dest, offline=True)
    assert server.log == []
    download_url(server.url + "/w.pth", dest, sha256_prefix=SHA[:8])
    monkeypatch.setenv("HYBRIDPS_OFFLINE", "1")
    n = len(server.log)
    assert download_url(server.url + "/w.pth", dest) == dest and len(server.log) == n


# ------------------------------------------------------------------------ hub
def test_hf_hub_download_through_huggingface_hub(server, tmp_path, monkeypatch):
    server.repos["Alice10/psvision"] = {"tiny.pth": PAYLOAD}
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    path = hf_download("Alice10/psvision", "tiny.pth", sha256=SHA)
    assert path.read_bytes() == PAYLOAD
    assert str(path).startswith(str(tmp_path / "hf_home" / "hub"))          # HF_HOME honoured
    # huggingface_hub may also GET /api/agent-harnesses (user-agent detection); a 404 there is harmless
    hub = [(m, p) for m, p, _ in server.log if not p.startswith("/api/")]
    assert hub == [("HEAD", "/Alice10/psvision/resolve/main/tiny.pth"),
                   ("GET", "/Alice10/psvision/resolve/main/tiny.pth")], server.log
    # cached: offline mode answers without the server
    server.shutdown()
    assert hf_download("Alice10/psvision", "tiny.pth", offline=True).read_bytes() == PAYLOAD


def test_hf_errors_and_checksum(server, tmp_path, monkeypatch):
    server.repos["Alice10/psvision"] = {"tiny.pth": PAYLOAD}
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    with pytest.raises(DownloadError, match="file not found"):
        hf_download("Alice10/psvision", "nope.pth")
    with pytest.raises(DownloadError, match="repository not found"):
        hf_download("someone/else", "tiny.pth")
    with pytest.raises(ChecksumError):
        hf_download("Alice10/psvision", "tiny.pth", sha256="1" * 64, cache=tmp_path / "c")
    leftovers = [p for p in (tmp_path / "c").rglob("*") if p.is_file() and p.stat().st_size == len(PAYLOAD)]
    assert leftovers == [] and not list((tmp_path / "c").rglob("tiny.pth"))
    with pytest.raises(OfflineError, match="offline mode"):
        hf_download("Alice10/psvision", "other.pth", offline=True)


# --------------------------------------------------- registry + CLI end to end
def _weights_file(tmp_path: Path) -> bytes:
    import torchvision

    f = tmp_path / "src.pth"
    torch.save({"state_dict": {k: v for k, v in torchvision.models.resnet18(weights=None).state_dict().items()
                               if not k.startswith("fc.")}}, f)
    return f.read_bytes()


def test_cli_add_download_convert_from_a_url_entry(server, tmp_path, capsys):
    data = _weights_file(tmp_path)
    server.files["/r18-ps.pth"] = data
    url = server.url + "/r18-ps.pth"
    assert cli.main(["add", "my-r18", url, "--arch", "resnet18", "--layout", "psvis", "--style", "pytorch"]) == 0
    entry = registry.get("my-r18")
    assert entry.origin == "user" and entry.source == {"type": "url", "url": url}
    assert cli.main(["add", "my-r18", url, "--arch", "resnet18", "--layout", "psvis"]) == 2
    assert "already has" in capsys.readouterr().err
    assert cli.main(["download", "my-r18", "--cache", str(tmp_path / "c"), "--sha256", hashlib.sha256(data).hexdigest()]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.read_bytes() == data
    out = tmp_path / "r18.pkl"
    assert cli.main(["convert", "my-r18", "--to", "psdiff", "--out", str(out), "--cache", str(tmp_path / "c"),
                     "--offline"]) == 0
    text = capsys.readouterr().out
    assert "UNINITIALISED" in text and "MODEL.WEIGHTS" in text and out.exists()


def test_cli_hub_entry_via_fetch(server, tmp_path, monkeypatch):
    data = _weights_file(tmp_path)
    server.repos["me/weights"] = {"r18.pth": data}
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    assert cli.main(["add", "hub-r18", "hf://me/weights/r18.pth", "--arch", "resnet18", "--layout", "psvis"]) == 0
    path = fetch(registry.get("hub-r18"))
    assert path.read_bytes() == data
    reg = json.loads((tmp_path / "user_registry.json").read_text())
    assert reg["entries"][0]["source"] == {"type": "hf", "repo": "me/weights", "file": "r18.pth", "revision": "main"}


def test_cli_download_prints_byte_lines_when_piped(server, tmp_path, capsys, monkeypatch):
    """Not a terminal: plain progress lines (bytes, rate) instead of a bar (hybridps/runlog.py's rule)."""
    monkeypatch.setenv("HYBRIDPS_LOG_INTERVAL", "0")
    server.files["/w.pth"] = PAYLOAD * 3
    assert cli.main(["add", "three-mib", server.url + "/w.pth", "--arch", "resnet18", "--layout", "psvis"]) == 0
    capsys.readouterr()
    sha = hashlib.sha256(PAYLOAD * 3).hexdigest()       # pinned: the bytes are not a real .pth
    assert cli.main(["download", "three-mib", "--cache", str(tmp_path / "c"), "--sha256", sha]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("hybridps ckpt download: w.pth ")]
    assert len(lines) >= 2 and all("/3.0 MiB (" in ln and "B/s | elapsed" in ln for ln in lines)
    assert lines[-1].startswith("hybridps ckpt download: w.pth 3.0 MiB/3.0 MiB (100%) | ")
