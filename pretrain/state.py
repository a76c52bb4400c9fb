"""Resume state of a pre-training run: written and read without pickle.

A checkpoint folder ``RUN/checkpoints/checkpoint_<n>`` holds

``model.safetensors``           the whole HybridModel state (OIM LUT/queue included)
``optimizer.safetensors/.json`` optimizer tensors / param groups and scalar state
``scheduler.json``              the LR scheduler's state_dict (plain numbers)
``state.json``                  step, loader position, accelerator step, the
                                resume-relevant config (compared on ``--resume``)
``rng_<rank>.safetensors/.json`` torch / CUDA generator states, Python and NumPy RNG
``COMPLETE.json``               size and sha256 of every file above, written last

Why not ``accelerator.save_state``: its ``custom_checkpoint_*.pkl`` files are
read back with ``torch.load(weights_only=False)`` (accelerate 1.x
``load_custom_state``), so a pickle planted in a run folder runs code on
``--resume``; and its ``total_limit`` deletes the old folder *before* the new
one is written, so a kill in between leaves nothing to resume from.  Here a
checkpoint is written into ``.checkpoint_<n>.partial``, read back and hashed,
marked complete, renamed into place, and only then are old ones removed;
``--resume`` takes the newest folder whose files match ``COMPLETE.json``.
Nothing here calls ``pickle`` or ``torch.load``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from hybridps.data_prep.build.files import fsync_dir
from hybridps.pretrain.loop import flatten

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE.json"
FORMAT = 1
_NAME_RE = re.compile(r"checkpoint_(\d+)")
# Every file a checkpoint may hold; anything else in the folder was not
# written by this trainer and the folder is refused (nothing reads it anyway).
_FILE_RE = re.compile(r"(model\.safetensors|optimizer\.safetensors|optimizer\.json|scheduler\.json|state\.json"
                      r"|rng_\d+\.safetensors|rng_\d+\.json)")
# Test hook: ``HYBRIDPS_FAULT=<point>@<step>`` SIGKILLs this process at a named
# point of save_checkpoint (see tests/test_hostile_pretrain.py), so the
# crash-safety claims are tested with a real kill of a real run.
FAULT_ENV = "HYBRIDPS_FAULT"

# Settings that make a resumed run a different run (tensor shapes, data order,
# the method): model.* and hybrid.* as a whole, plus these.
RESUME_KEYS = ("data.batch_size", "data.weights", "data.splits", "data.remainder",
               "train.seed", "train.grad_accum")


class CheckpointError(RuntimeError):
    """A checkpoint folder that cannot be resumed from (the message says why)."""


# --------------------------------------------------------------------------- small helpers
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, allow_nan=False)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path.name}: unreadable {what} ({e})") from None


def _fault(point: str, step: int) -> None:
    if os.environ.get(FAULT_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared or non-contiguous storage; clone() gives each its own
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(path))


def checkpoint_dirs(out: Path) -> list[Path]:
    """``checkpoint_<n>`` folders of a run, oldest first (complete or not)."""
    root = Path(out) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME_RE.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def _number(path: Path) -> int:
    return int(path.name.split("_")[1])


def next_checkpoint_number(out: Path) -> int:
    """Numbers only grow, so a new checkpoint never replaces an older folder."""
    found = checkpoint_dirs(out)
    return _number(found[-1]) + 1 if found else 0


# --------------------------------------------------------------------------- resume-relevant config
def resume_config(cfg, world_size: int, manifest_sha256: str) -> dict[str, Any]:
    """The settings a resumed run must share with the saved one (dotted keys)."""
    from hybridps.pretrain.config import to_dict

    flat = flatten(to_dict(cfg))
    keep = {k: v for k, v in flat.items()
            if k.startswith(("model.", "hybrid.", *(r + "." for r in RESUME_KEYS))) or k in RESUME_KEYS}
    # dict-valued settings (data.weights, data.splits) flatten to their items, or vanish when empty
    for key in RESUME_KEYS:
        if not any(k.startswith(key + ".") for k in keep):
            keep.setdefault(key, None)
    keep["world_size"] = world_size
    keep["manifest_sha256"] = manifest_sha256
    return keep


def compare_resume_config(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every differing key present on both sides,
    plus keys that only one side has among dict-valued settings."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        in_s, in_c = key in saved, key in current
        if in_s and in_c:
            if saved[key] != current[key] and not (_isnan(saved[key]) and _isnan(current[key])):
                diffs.append(f"{key}: {saved[key]!r} -> {current[key]!r}")
        elif key.startswith(("data.weights.", "data.splits.")):
            # a dataset added to / removed from the mix changes the data order
            diffs.append(f"{key}: {saved.get(key, '(absent)')!r} -> {current.get(key, '(absent)')!r}")
        # other one-sided keys: a config field added or removed by a newer version
    return diffs


def _isnan(v: Any) -> bool:
    return isinstance(v, float) and math.isnan(v)


# --------------------------------------------------------------------------- optimizer / RNG <-> plain files
def _json_safe(value: Any, where: str) -> Any:
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, where) for v in value]
    raise TypeError(f"{where}: {type(value).__name__} value cannot be checkpointed as JSON")


def _unjson_float(value: Any) -> Any:
    if value in ("nan", "inf", "-inf"):
        return float(value)
    if isinstance(value, list):
        return [_unjson_float(v) for v in value]
    return value


def optimizer_files(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors, JSON): tensors keyed ``<param id>.<name>``."""
    tensors, scalars = {}, {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = _json_safe(value, f"optimizer state {name}")
    groups = [{k: _json_safe(v, f"optimizer param group {k}") for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + [(k, _unjson_float(v)) for k, v in meta["scalars"].items()]:
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [{k: _unjson_float(v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_files() -> tuple[dict[str, torch.Tensor], dict]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    meta = {"python": [version, list(internal), gauss],
            "numpy": [kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def set_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    version, internal, gauss = meta["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors) - 1) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


# --------------------------------------------------------------------------- verify / pick
def verify(path: Path) -> dict:
    """Check a checkpoint folder against its ``COMPLETE.json``; returns that record."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory")
    marker = path / COMPLETE
    if not marker.is_file():
        if any(path.glob("*.pkl")) or (path / "optimizer.bin").exists():
            raise CheckpointError(f"{path}: an accelerate save_state folder (pickle files); --resume does not "
                                  "unpickle (a planted pickle would run code)")
        raise CheckpointError(f"{path}: incomplete (no {COMPLETE}; the run stopped while writing it)")
    record = _read_json(marker, "completion record")
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{path}: {COMPLETE} is not a format-{FORMAT} completion record")
    files = record.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: {COMPLETE} lists no files")
    for f in sorted(path.iterdir()):
        if f.name != COMPLETE and not (_FILE_RE.fullmatch(f.name) and f.name in files):
            raise CheckpointError(f"{path}: unexpected file {f.name!r} (not written by this trainer; "
                                  "remove it if you trust the folder)")
    for name, want in files.items():
        f = path / name
        if not _FILE_RE.fullmatch(name) or not isinstance(want, dict):
            raise CheckpointError(f"{path}: {COMPLETE} has a bad entry {name!r}")
        if not f.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if f.stat().st_size != want.get("size"):
            raise CheckpointError(f"{path}: {name} is {f.stat().st_size} bytes, {COMPLETE} says {want.get('size')} "
                                  "(truncated or replaced)")
        if _sha256(f) != want.get("sha256"):
            raise CheckpointError(f"{path}: {name} does not match its sha256 in {COMPLETE} (modified)")
    return record


def pick_resume(out: Path, resume: str) -> Path:
    """``"latest"``: the newest checkpoint of ``out`` that verifies (older
    ones are the fall-back, with a warning per skipped one); else the given path."""
    if resume != "latest":
        path = Path(resume)
        verify(path)
        return path
    found = checkpoint_dirs(out)
    if not found:
        raise CheckpointError(f"--resume: no checkpoints under {Path(out) / 'checkpoints'}")
    reasons = []
    for path in reversed(found):
        try:
            verify(path)
        except CheckpointError as e:
            log.warning("skipping %s", e)
            reasons.append(str(e))
            continue
        return path
    raise CheckpointError("--resume: no complete checkpoint: " + "; ".join(reasons))


def complete_checkpoints(out: Path) -> list[Path]:
    """Folders that carry a completion record (not re-hashed: cheap listing)."""
    return [p for p in checkpoint_dirs(out) if (p / COMPLETE).is_file()]


# --------------------------------------------------------------------------- save / load
def save_checkpoint(accelerator, out: Path, number: int, model, optimizer, scheduler, loader,
                    step: int, resume_cfg: dict, total_limit: int) -> Path:
    """Write ``checkpoint_<number>`` crash-safely (every rank calls this)."""
    root = Path(out) / "checkpoints"
    final = root / f"checkpoint_{number}"
    tmp = root / f".checkpoint_{number}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    rank = accelerator.process_index
    tensors, meta = rng_files()
    _save_tensors(tensors, tmp / f"rng_{rank}.safetensors")
    _write_json(tmp / f"rng_{rank}.json", meta)
    if accelerator.is_main_process:
        _save_tensors(accelerator.unwrap_model(model).state_dict(), tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_files(optimizer.state_dict())
        _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        _write_json(tmp / "optimizer.json", opt_meta)
        _write_json(tmp / "scheduler.json", _json_safe_dict(scheduler.state_dict(), "scheduler"))
        extra = {}
        if accelerator.scaler is not None:
            extra["scaler"] = _json_safe_dict(accelerator.scaler.state_dict(), "grad scaler")
        _write_json(tmp / "state.json", {"step": step, "loader": loader.state_dict(), "accelerator_step":
                                         accelerator.step, "resume_config": resume_cfg, **extra})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fault("checkpoint_written", step)
        # read back what landed on disk: the hashes describe the bytes a resume will see
        files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        _write_json(tmp / COMPLETE, {"format": FORMAT, "step": step, "files": files})
        fsync_dir(tmp)
        if final.exists():        # an incomplete leftover of the same number (numbers only grow)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        _fault("checkpoint_renamed", step)
        _prune(out, final, total_limit)
    accelerator.wait_for_everyone()
    return final


def _json_safe_dict(sd: dict, what: str) -> dict:
    return {k: _json_safe(v, f"{what} {k}") for k, v in sd.items()}


def _prune(out: Path, newest: Path, total_limit: int) -> None:
    """Drop complete checkpoints beyond ``total_limit`` and stale ``.partial``
    folders -- only now that ``newest`` is complete and in place."""
    root = Path(out) / "checkpoints"
    for p in root.glob(".checkpoint_*.partial"):
        shutil.rmtree(p, ignore_errors=True)
    if total_limit and total_limit > 0:
        complete = [p for p in complete_checkpoints(out) if p != newest]
        for p in complete[: max(0, len(complete) - (total_limit - 1))]:
            shutil.rmtree(p, ignore_errors=True)


def read_state(path: Path) -> dict:
    state = _read_json(Path(path) / "state.json", "state")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not isinstance(state.get("loader"), dict):
        raise CheckpointError(f"{path}: state.json lacks step/loader")
    return state


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler, loader) -> int:
    """Restore a verified checkpoint into the prepared objects; returns the step."""
    path = Path(path)
    state = read_state(path)
    try:
        accelerator.unwrap_model(model).load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
        meta = _read_json(path / "optimizer.json", "optimizer state")
        optimizer.load_state_dict(optimizer_state(load_file(str(path / "optimizer.safetensors")), meta))
        scheduler.load_state_dict({k: _unjson_float(v) for k, v in
                                   _read_json(path / "scheduler.json", "scheduler state").items()})
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        rank = accelerator.process_index
        set_rng(load_file(str(path / f"rng_{rank}.safetensors")), _read_json(path / f"rng_{rank}.json", "RNG state"))
    except (RuntimeError, KeyError, ValueError, TypeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: does not fit this model/optimizer ({first})") from None
    loader.load_state_dict(state["loader"])
    accelerator.step = int(state.get("accelerator_step", 0))
    return int(state["step"])


def check_resumable(path: Path, out: Path, current: dict[str, Any]) -> None:
    """Refuse a resume whose settings differ from the saved run's (a changed
    batch size, mix, backbone or embedding size is a different run, and a
    changed shape would only fail later with a size-mismatch traceback)."""
    saved = read_state(path).get("resume_config")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: state.json lacks the saved run settings")
    diffs = compare_resume_config(saved, current)
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise CheckpointError(f"--resume {path}: this run's settings differ from the saved run's ({shown}); "
                              "resume with the saved settings or start a new --out")
    meta = Path(out) / "meta.json"
    if meta.exists():
        record = _read_json(meta, "run record")
        if not isinstance(record, dict):
            raise CheckpointError(f"{meta}: expected a JSON object, got {type(record).__name__} "
                                  "(not a run directory written by python -m hybridps.pretrain)")
