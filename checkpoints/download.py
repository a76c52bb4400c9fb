"""Fetching registry weights: the Hugging Face hub via huggingface_hub, other URLs with a
small resumable HTTP client.

Caches: ``--cache DIR`` > ``$HYBRIDPS_CACHE`` > ``$XDG_CACHE_HOME/hybridps`` >
``~/.cache/hybridps``; hub files go to the hub cache (``$HF_HUB_CACHE`` or
``$HF_HOME/hub``) unless ``--cache`` is given.  Offline mode (``--offline``,
``HYBRIDPS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1``) only returns cached files.
A file whose checksum does not match is deleted, never left at its final path.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import logging
import os
import re
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from hybridps.runlog import Progress

from .registry import Entry

logger = logging.getLogger(__name__)
CHUNK = 1 << 20
TRUE = ("1", "true", "yes", "on")
# A server that trickles one byte every few seconds never trips a per-socket
# timeout; these bound the whole download (all attempts together).
DEADLINE_ENV = "HYBRIDPS_DOWNLOAD_DEADLINE"      # seconds, default 6 h
MIN_RATE_ENV = "HYBRIDPS_DOWNLOAD_MIN_RATE"      # average bytes/s, default 10 kB/s
DEFAULT_DEADLINE = 6 * 3600.0
DEFAULT_MIN_RATE = 10_000.0
RATE_GRACE = 30.0                                # seconds before the average rate is judged


class DownloadError(RuntimeError):
    """The file could not be fetched (network, HTTP status, offline without a cached copy)."""


class OfflineError(DownloadError):
    """Offline mode and the file is not cached."""


class ChecksumError(DownloadError):
    """The fetched bytes are not the expected ones; the file was deleted."""


class _Transient(Exception):
    """A cut connection or short body: worth resuming."""


class _Budget:
    """The overall deadline and minimum average rate of one download."""

    def __init__(self, deadline: float | None = None, min_rate: float | None = None):
        self.deadline = _env_float(DEADLINE_ENV, DEFAULT_DEADLINE) if deadline is None else float(deadline)
        self.min_rate = _env_float(MIN_RATE_ENV, DEFAULT_MIN_RATE) if min_rate is None else float(min_rate)
        if not (self.deadline > 0 and self.min_rate >= 0):      # also refuses NaN
            raise DownloadError(f"download deadline must be > 0 and minimum rate >= 0 (got "
                                f"{self.deadline}, {self.min_rate})")
        self.start = time.monotonic()
        self.got = 0

    def left(self) -> float:
        return self.deadline - (time.monotonic() - self.start)

    def socket_timeout(self, timeout: float) -> float:
        return max(0.05, min(timeout, self.left()))

    def check(self, url: str, nbytes: int = 0) -> None:
        self.got += nbytes
        spent = time.monotonic() - self.start
        if spent > self.deadline:
            raise DownloadError(f"{url}: not finished within the {self.deadline:g} s deadline ({self.got} bytes "
                                f"received; set {DEADLINE_ENV} to allow longer)")
        grace = min(RATE_GRACE, self.deadline / 2)
        if self.min_rate and spent > grace and self.got / spent < self.min_rate:
            raise DownloadError(f"{url}: too slow ({self.got / spent:.0f} B/s on average over {spent:.0f} s, below "
                                f"{self.min_rate:g} B/s; set {MIN_RATE_ENV} to accept it)")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise DownloadError(f"{name}={raw!r} is not a number") from None


# ----------------------------------------------------------------- locations
def cache_root(cache: str | Path | None = None) -> Path:
    """Cache for URL downloads."""
    if cache:
        return Path(cache).expanduser()
    if os.environ.get("HYBRIDPS_CACHE"):
        return Path(os.environ["HYBRIDPS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "hybridps"


def hub_cache(cache: str | Path | None = None) -> Path:
    """Cache for hub files (read from the environment at call time, not import time)."""
    if cache:
        return Path(cache).expanduser() / "hub"
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "huggingface" / "hub"


def is_offline(flag: bool | None = None) -> bool:
    if flag:
        return True
    return any(os.environ.get(v, "").strip().lower() in TRUE for v in ("HYBRIDPS_OFFLINE", "HF_HUB_OFFLINE"))


# ----------------------------------------------------------------- checksums
def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: Path, sha256: str | None, prefix: str | None, label: str) -> str:
    """Check ``path`` against a full hash or a hash prefix; delete it on mismatch."""
    actual = sha256_of(path)
    expected = (sha256 or "").lower() or None
    if (expected and actual != expected) or (not expected and prefix and not actual.startswith(prefix.lower())):
        path.unlink(missing_ok=True)
        want = expected or f"{prefix}..."
        raise ChecksumError(f"{label}: sha256 mismatch (expected {want}, got {actual}); the file was deleted")
    return actual


# ------------------------------------------------------------- HTTP (URLs)
def _total_from_content_range(value: str | None) -> int | None:
    m = re.match(r"bytes (\d+|\*)-?(\d*)/(\d+|\*)", value or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


def _fetch_once(url: str, part: Path, timeout: float, budget: _Budget | None = None) -> None:
    """One GET, resuming from ``part``'s size with a Range request when it exists."""
    budget = budget or _Budget()
    budget.check(url)
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "hybridps-checkpoints/0.1", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=budget.socket_timeout(timeout))
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:
            total = _total_from_content_range(exc.headers.get("Content-Range"))
            if total == have:
                return                        # the .part was already complete
            part.unlink()
            raise _Transient("server refused the resume range; restarting from zero") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}"
                            + (" (file not found)" if exc.code == 404 else "")) from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, (socket.timeout, TimeoutError)):
            budget.check(url)
            raise _Transient(f"timed out connecting ({exc.reason})") from None
        raise DownloadError(f"{url}: cannot reach the server ({exc.reason}); check the network, or use "
                            "--offline with a file already in the cache") from None
    except (socket.timeout, ConnectionError) as exc:
        budget.check(url)
        raise _Transient(str(exc)) from None
    with resp:
        _check_response(url, resp, part)
        if resp.status == 206:
            start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:
                part.unlink(missing_ok=True)
                raise _Transient(f"server answered range {resp.headers.get('Content-Range')!r} for a request from "
                                 f"byte {have}; restarting from zero")
            total = _total_from_content_range(resp.headers.get("Content-Range"))
            mode = "ab" if have else "wb"
        else:                                   # 200: server ignores ranges, start over
            have, mode = 0, "wb"
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.strip().isdigit() else None
        written = have
        with open(part, mode) as f, Progress(total, part.name[:-5], initial=have, bytes_=True, logger=logger) as bar:
            try:
                # read1: return what has arrived, so a trickling server is seen by the budget
                while block := resp.read1(CHUNK):
                    written += len(block)
                    if total is not None and written > total:
                        part.unlink(missing_ok=True)
                        raise DownloadError(f"{url}: the server sent more than the {total} bytes it announced; "
                                            "the partial file was deleted")
                    f.write(block)
                    bar.update(len(block))
                    budget.check(url, len(block))
            except (http.client.IncompleteRead, ConnectionError, socket.timeout) as exc:
                budget.check(url)
                raise _Transient(f"connection cut ({type(exc).__name__})") from None
    size = part.stat().st_size
    if total is not None and size != total:
        raise _Transient(f"got {size} of {total} bytes")


def _check_response(url: str, resp, part: Path) -> None:
    """Refuse what can never be the weight file, before writing a byte of it."""
    encoding = (resp.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise DownloadError(f"{url}: the server sent a {encoding}-encoded body although identity was asked for; "
                            "refusing to store encoded bytes as the file")
    ctype = (resp.headers.get("Content-Type") or "").lower()
    if ctype.startswith(("text/html", "application/xhtml")):
        raise DownloadError(f"{url}: the server answered an HTML page ({ctype.split(';')[0]}), not the weight file "
                            "(a login, error or redirect page?)")


def check_format(path: Path, name: str) -> None:
    """Does ``path`` parse as what ``name``'s suffix says?  A cut connection
    without a Content-Length, or an error page, leaves a file that does not."""
    suffix = Path(name).suffix.lower()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
        f.seek(max(0, size - 1))
        tail = f.read(1)
    low = head.lstrip().lower()
    if low.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        raise ValueError("it is an HTML/XML page")
    if suffix == ".safetensors":
        import json as _json
        import struct

        if size < 8:
            raise ValueError("too short for a safetensors header")
        n = struct.unpack("<Q", head[:8])[0]
        if n > size - 8 or n > 100 << 20:
            raise ValueError(f"safetensors header of {n} bytes in a {size}-byte file")
        with open(path, "rb") as f:
            f.seek(8)
            header = _json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError("safetensors header is not a JSON object")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"safetensors data should end at byte {8 + n + end}, the file has {size}")
    elif suffix in (".pth", ".pt", ".bin", ".ckpt", ".tar", ".pkl"):
        import zipfile

        if head.startswith(b"PK"):
            if not zipfile.is_zipfile(path):
                raise ValueError("damaged zip archive (truncated?)")
            with zipfile.ZipFile(path) as zf:
                zf.infolist()
        elif head[:1] == b"\x80" and 2 <= head[1] <= 5:
            if suffix == ".pkl" and tail != b".":
                raise ValueError("pickle without its STOP opcode (truncated)")
        else:
            raise ValueError("neither a torch zip archive nor a pickle")


def download_url(url: str, dest: Path, *, sha256: str | None = None, sha256_prefix: str | None = None,
                 offline: bool | None = None, retries: int = 3, timeout: float = 30.0,
                 deadline: float | None = None, min_rate: float | None = None,
                 log: Callable[[str], None] = logger.info) -> Path:
    """Fetch ``url`` to ``dest`` (resumable via ``dest.part``), verify it, then rename atomically."""
    dest = Path(dest)
    if dest.exists():
        if sha256 or sha256_prefix:
            try:
                _verify(dest, sha256, sha256_prefix, str(dest))
            except ChecksumError as exc:
                log(f"cached copy rejected: {exc}")
        if dest.exists():
            return dest
    if is_offline(offline):
        raise OfflineError(f"offline mode and {dest} is not cached; download it once without --offline "
                           f"(or place the file there)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _locked(dest.with_name(dest.name + ".lock")):
        if dest.exists():                    # another process finished it while we waited
            return dest
        return _download_locked(url, dest, sha256, sha256_prefix, retries, timeout, log,
                                _Budget(deadline, min_rate))


@contextlib.contextmanager
def _locked(lock_path: Path):
    """Two processes resuming the same .part would interleave bytes: serialise them."""
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _download_locked(url: str, dest: Path, sha256: str | None, sha256_prefix: str | None, retries: int,
                     timeout: float, log: Callable[[str], None], budget: _Budget | None = None) -> Path:
    part = dest.with_name(dest.name + ".part")
    budget = budget or _Budget()
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, part, timeout, budget)
            break
        except _Transient as exc:
            if attempt == retries:
                raise DownloadError(f"{url}: download incomplete after {retries + 1} attempts ({exc}); "
                                    f"the partial file {part} is kept and the next run resumes it") from None
            log(f"{url}: {exc}; resuming (attempt {attempt + 2}/{retries + 1})")
            time.sleep(min(0.2 * (attempt + 1), 2.0))
    actual = _verify(part, sha256, sha256_prefix, url)
    try:
        if not (sha256 or sha256_prefix):    # a matching pinned hash says more than any format check
            check_format(part, dest.name)
    except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
        part.unlink(missing_ok=True)
        raise DownloadError(f"{url}: the download is not a valid {dest.suffix or 'weight'} file ({exc}); "
                            "it was deleted") from None
    os.replace(part, dest)
    if not sha256:
        log(f"{dest.name}: sha256 {actual} (no published hash to check against; pin it with --sha256)")
    return dest


# --------------------------------------------------------------------- hub
def hf_download(repo: str, filename: str, *, revision: str = "main", cache: str | Path | None = None,
                offline: bool | None = None, sha256: str | None = None,
                log: Callable[[str], None] = logger.info) -> Path:
    """Fetch a hub file with huggingface_hub (HF_ENDPOINT / HF_HOME honoured at call time)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub import errors as hf_errors

    label = f"hf://{repo}/{filename}@{revision}"
    try:
        path = Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision,
                                    cache_dir=str(hub_cache(cache)), endpoint=os.environ.get("HF_ENDPOINT") or None,
                                    local_files_only=is_offline(offline)))
    except hf_errors.LocalEntryNotFoundError as exc:
        why = "offline mode" if is_offline(offline) else "the hub could not be reached"
        raise OfflineError(f"{label}: {why} and the file is not in the hub cache {hub_cache(cache)} "
                           f"({str(exc).splitlines()[0]})") from None
    except hf_errors.RepositoryNotFoundError:
        raise DownloadError(f"{label}: repository not found (or private)") from None
    except hf_errors.RevisionNotFoundError:
        raise DownloadError(f"{label}: revision {revision!r} not found") from None
    except hf_errors.RemoteEntryNotFoundError:
        raise DownloadError(f"{label}: file not found in the repository (HTTP 404)") from None
    except (hf_errors.HfHubHTTPError, OSError) as exc:
        raise DownloadError(f"{label}: {str(exc).splitlines()[0]}") from None
    if sha256:
        blob = path.resolve()
        try:
            _verify(blob, sha256, None, label)
        except ChecksumError:
            path.unlink(missing_ok=True)       # the snapshot link must not point at nothing
            raise
    else:
        log(f"{filename}: sha256 {sha256_of(path)} (no published hash to check against; pin it with --sha256)")
    return path


def _url_cache_path(url: str, cache: str | Path | None, filename: str) -> Path:
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = cache_root(cache) / "url" / digest
    # the registry refuses such names already; this guards entries built in code
    if not filename or Path(filename).name != filename or filename in (".", ".."):
        raise DownloadError(f"{filename!r}: refusing a download file name that is not a plain name "
                            f"inside the cache {folder}")
    return folder / filename


def fetch(entry: Entry, *, cache: str | Path | None = None, offline: bool | None = None,
          sha256: str | None = None, **kw) -> Path:
    """Make a registry entry's file available locally and return its path."""
    sha = (sha256 or entry.sha256 or "").lower() or None
    kind = entry.source["type"]
    if kind != "url":                 # the hub client has its own timeouts
        kw.pop("deadline", None)
        kw.pop("min_rate", None)
    if kind == "local":
        path = Path(entry.source["path"]).expanduser()
        if not path.exists():
            raise DownloadError(f"{entry.name}: local file {path} does not exist")
        if sha and path.is_file() and sha256_of(path) != sha:
            raise ChecksumError(f"{entry.name}: {path} does not match its recorded sha256 {sha} "
                                "(the file changed since it was added)")
        return path
    if kind == "url":
        return download_url(entry.source["url"], _url_cache_path(entry.source["url"], cache, entry.file),
                            sha256=sha, sha256_prefix=entry.sha256_prefix, offline=offline, **kw)
    return hf_download(entry.source["repo"], entry.source["file"], revision=entry.source.get("revision", "main"),
                       cache=cache, offline=offline, sha256=sha)
