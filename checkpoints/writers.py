"""File containers for exported weights; every write is atomic (temp file + rename)."""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

META_AUTHOR = "hybridps (PretrainPS-style hybrid pre-training)"


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _plain(meta: Mapping[str, Any]) -> dict[str, Any]:
    """Round-trip through JSON: torch>=2.6 weights_only loads refuse anything richer."""
    return json.loads(json.dumps(dict(meta)))


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with the metadata in sorted order, so that the same
    tensors and metadata always give the same bytes (safetensors writes its metadata map in
    a random order per call, so file hashes of identical runs would otherwise differ)."""
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata=None if metadata is None else dict(metadata))
    if metadata and len(metadata) > 1:
        _sort_metadata(Path(path))


def _sort_metadata(path: Path) -> None:
    """Rewrite the header in place with ``__metadata__`` sorted: the same length, the
    tensor entries and offsets untouched (the format pads its header with spaces)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:           # never: the same items in another order; keep the library's header
            return
        f.seek(8)
        f.write(new + b" " * (n - len(new)))


def write_safetensors(sd: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, Any]) -> Path:
    # safetensors refuses aliased storage (e.g. a layer4 copy), so every tensor gets its own
    seen: set[int] = set()
    tensors: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        v = v.detach().contiguous()
        if v.untyped_storage().data_ptr() in seen and v.numel():
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        tensors[k] = v
    text_meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in _plain(meta).items()}
    return _atomic(path, lambda p: save_safetensors(tensors, p, text_meta))


def write_torch(obj: Any, path: Path, legacy_format: bool = False) -> Path:
    # torch 1.2-era codebases (SeqNet's pin) cannot read the zip format torch>=1.6 writes
    return _atomic(path, lambda p: torch.save(obj, p, _use_new_zipfile_serialization=not legacy_format))


def write_pkl(obj: Any, path: Path) -> Path:
    def dump(p: Path) -> None:
        with open(p, "wb") as f:
            pickle.dump(obj, f, protocol=4)
    return _atomic(path, dump)


def _cpu(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in sd.items()}


def write(container: str, sd: Mapping[str, torch.Tensor], path: Path, meta: Mapping[str, Any],
          legacy_format: bool = False) -> Path:
    """Write ``sd`` in ``container`` (safetensors | state_dict | mmcv | full_model | d2_pkl)."""
    path = Path(path)
    if container == "safetensors" or path.suffix == ".safetensors":
        return write_safetensors(sd, path, meta)
    if container == "state_dict":
        return write_torch(_cpu(sd), path, legacy_format)   # plain dict: strict loaders want nothing else
    if container == "mmcv":
        return write_torch({"state_dict": _cpu(sd), "meta": _plain(meta)}, path, legacy_format)
    if container == "full_model":
        return write_torch({"model": _cpu(sd), "epoch": 0, "meta": _plain(meta)}, path, legacy_format)
    if container == "d2_pkl":
        arrays = {k: v.detach().cpu().float().numpy() for k, v in sd.items()}
        return write_pkl({"model": arrays, "__author__": META_AUTHOR, "matching_heuristics": True,
                          "meta": _plain(meta)}, path)
    raise ValueError(f"unknown container {container!r}")
