"""Load weight files without ever running code from them.

Weight files from the internet are pickles more often than not, and a pickle
can run arbitrary code on load.  Everything here goes through loaders that
can only rebuild tensors / numpy arrays and plain containers:

* ``.safetensors``            -- no code path at all;
* ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` -- ``torch.load(weights_only=True)``;
* ``.pkl`` (detectron2 model zoo) -- a restricted unpickler that resolves only
  numpy array reconstruction and ``collections.OrderedDict``.

The result is always a flat ``{name: torch.Tensor}`` on the CPU; containers
(``state_dict`` / ``model``) are unwrapped and a ``module.`` prefix (from
DataParallel) is stripped.
"""
from __future__ import annotations

import importlib
import io
import json
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from hybridps.bounded import BoundError, check_tree, node_budget

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
# torch.save stores zip members uncompressed, so the bytes the members declare
# add up to about the archive's size.  A member declaring gigabytes inside a
# 2 MB archive (deflated zeros, or a forged header) would be materialised by
# torch.load before any error: refuse it from the central directory first.
ZIP_EXPANSION_SLACK = 64 << 20
# Keys under which training frameworks nest the weights, most specific first.
CONTAINER_KEYS = ("state_dict", "model", "module")


class UnsafeFileError(ValueError):
    """The file holds something other than weights (possibly code); it was not executed."""


class NotAStateDictError(ValueError):
    """The file loaded safely but is not a mapping of names to tensors/arrays."""


@dataclass
class LoadedCheckpoint:
    """A state_dict plus what the container said about it."""

    state_dict: dict[str, torch.Tensor]
    container: str                      # "safetensors" | "torch" | "detectron2-pkl"
    wrapped_in: str | None = None       # the container key the weights were under
    metadata: dict[str, Any] = field(default_factory=dict)  # plain data only


# --------------------------------------------------------------------------- pkl
# numpy moved its internals from numpy.core to numpy._core in 2.0; files written
# by either version name one or the other.
_NUMPY_ALLOWED = {
    ("multiarray", "_reconstruct"),
    ("multiarray", "scalar"),
    ("numeric", "_frombuffer"),
}
_TOP_ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict")}


def _resolve_numpy(module: str, name: str) -> Any:
    tail = module.split(".")[-1]
    for base in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{base}.{tail}"), name)
        except (ImportError, AttributeError):
            continue
    raise UnsafeFileError(f"cannot resolve {module}.{name}")


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafeFileError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode(encoding)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and dicts and nothing else."""

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        if module in ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric",
                      "numpy._core.numeric") and (module.split(".")[-1], name) in _NUMPY_ALLOWED:
            return _resolve_numpy(module, name)
        if (module, name) in _TOP_ALLOWED:
            return getattr(importlib.import_module(module), name)
        if (module, name) == ("_codecs", "encode"):
            # protocol-2 pickles store raw bytes as _codecs.encode(text, "latin1"): pure data
            return _latin1_encode
        raise UnsafeFileError(
            f"refusing to unpickle {module}.{name}: a detectron2 .pkl may only hold numpy arrays "
            "and plain containers")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError("refusing a pickle with persistent ids (not a detectron2 .pkl)")


def _load_pkl(path: Path) -> Any:
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(0)
        if head.startswith(b"PK"):
            # a torch zip archive that happens to be called .pkl
            return None
        try:
            obj = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        except UnsafeFileError:
            raise
        except Exception as exc:  # truncated or garbage bytes
            raise NotAStateDictError(f"{path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
    _check_bounded(obj, path)
    return obj


def _check_bounded(obj: Any, path: Path) -> None:
    """Refuse self-referencing, too deep or exploding containers before any walk of them."""
    try:
        check_tree(obj, str(path), max_nodes=node_budget(path.stat().st_size))
    except BoundError as exc:
        raise NotAStateDictError(str(exc)) from None


def _check_zip_sizes(path: Path) -> None:
    """Refuse a torch zip whose members declare more bytes than the archive can hold."""
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as zf:
            declared = sum(max(0, i.file_size) for i in zf.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise NotAStateDictError(f"{path}: not a readable torch file (damaged zip archive: {exc})") from None
    if declared > size + ZIP_EXPANSION_SLACK:
        raise NotAStateDictError(
            f"{path}: its zip members declare {declared} bytes in a {size}-byte file (torch.save never "
            "compresses); refusing to expand it")


# ------------------------------------------------------------------------- torch
def _load_torch(path: Path) -> Any:
    with open(path, "rb") as f:
        is_zip = f.read(4).startswith(b"PK")
    if is_zip:
        _check_zip_sizes(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln for ln in first if "Unsupported global" in ln or "GLOBAL" in ln), first[0] if first else "")
        raise UnsafeFileError(
            f"{path}: refusing to load: the pickle references objects other than tensors and plain "
            f"containers ({detail.strip()}). Nothing from it was executed. If you trust the file, "
            "re-save its weights with torch.save(state_dict) in a trusted session.") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError, IndexError,
            MemoryError, RecursionError, OverflowError) as exc:
        raise NotAStateDictError(f"{path}: not a readable torch file ({type(exc).__name__}: "
                                 f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
    _check_bounded(obj, path)
    return obj


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise NotAStateDictError(f"{path}: not a readable safetensors file ({exc})") from None
    return tensors, _decode_metadata(meta)


def _decode_metadata(meta: Mapping[str, str]) -> dict[str, Any]:
    """safetensors metadata is str->str; values we wrote as JSON come back as data."""
    out: dict[str, Any] = {}
    for key, value in meta.items():
        try:
            decoded = json.loads(value)
            check_tree(decoded, f"metadata {key!r}")
            out[key] = decoded
        except (TypeError, ValueError, RecursionError):
            # not JSON, or JSON nested past any sane depth (json.loads recurses): keep the text
            out[key] = value
    return out


# ------------------------------------------------------------------------ unwrap
def _is_weights_mapping(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(v, (torch.Tensor, np.ndarray)) for v in obj.values())


def _unwrap(obj: Any, path: Path) -> tuple[Mapping[str, Any], str | None, dict[str, Any]]:
    """Find the weights mapping inside a container; return it, its key and the rest as metadata."""
    if not isinstance(obj, Mapping):
        raise NotAStateDictError(f"{path}: holds a {type(obj).__name__}, not a dict of weights")
    for key in CONTAINER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner:
            rest = {k: v for k, v in obj.items() if k != key}
            return inner, key, _plain_metadata(rest)
    return obj, None, {}


def _plain_metadata(rest: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only JSON-like values of a container (meta, epoch, __author__ ...)."""
    def plain(v: Any) -> bool:
        if isinstance(v, (str, int, float, bool)) or v is None:
            return True
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, Mapping):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return False

    out: dict[str, Any] = {}
    for k, v in rest.items():
        if isinstance(k, str) and plain(v):
            out[k] = v
    meta = out.pop("meta", None)
    if isinstance(meta, Mapping):
        for k, v in meta.items():
            out.setdefault(k, v)
    return out


def _strip_module_prefix(sd: Mapping[str, Any]) -> dict[str, Any]:
    if sd and all(isinstance(k, str) and k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return dict(sd)


def _as_tensors(sd: Mapping[str, Any], path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    bad: list[str] = []
    for key, value in sd.items():
        if not isinstance(key, str):
            bad.append(repr(key))
        elif isinstance(value, torch.Tensor):
            out[key] = value
        elif isinstance(value, np.ndarray) and value.dtype != object:
            out[key] = torch.from_numpy(np.ascontiguousarray(value))
        else:
            bad.append(f"{key} ({type(value).__name__})")
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NotAStateDictError(f"{path}: values must all be tensors or numeric arrays; got {shown}")
    if not out:
        raise NotAStateDictError(f"{path}: contains no weights")
    return out


# -------------------------------------------------------------------------- API
def load_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Safely load a weight file and return its flat state_dict plus container metadata."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such weight file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        tensors, meta = _load_safetensors(path)
        return LoadedCheckpoint(_as_tensors(_strip_module_prefix(tensors), path), "safetensors", None, meta)
    if suffix == ".pkl":
        obj = _load_pkl(path)
        if obj is not None:
            inner, key, meta = _unwrap(obj, path)
            return LoadedCheckpoint(_as_tensors(_strip_module_prefix(inner), path), "detectron2-pkl", key, meta)
        obj = _load_torch(path)
    elif suffix in TORCH_SUFFIXES:
        obj = _load_torch(path)
    else:
        raise NotAStateDictError(
            f"{path}: unknown weight file type {suffix!r}; expected .safetensors, .pth/.pt/.bin/.ckpt or .pkl")
    inner, key, meta = _unwrap(obj, path)
    return LoadedCheckpoint(_as_tensors(_strip_module_prefix(inner), path), "torch", key, meta)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Safely load a weight file as a flat ``{name: Tensor}`` dict on the CPU."""
    return load_checkpoint(path).state_dict


def load_pickle_arrays(data: bytes) -> Any:
    """Unpickle bytes with the arrays-only unpickler (used by tests and ``inspect``)."""
    return _ArraysOnlyUnpickler(io.BytesIO(data), encoding="latin1").load()
