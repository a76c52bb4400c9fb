"""Pre-training configuration: plain YAML that maps one-to-one onto dataclasses.

``PretrainConfig`` composes ``ModelConfig`` (the search model,
pretrain/model/config.py), ``HybridConfig`` (losses and alignment modules,
pretrain/hybrid.py), ``DataConfig`` (the loader, pretrain/data/config.py) and
``TrainConfig`` (below).  Every YAML key is a dataclass field;
unknown keys are an error that names the closest known key.

Include mechanism: a YAML file may start with ``include: base.yaml`` (or a list
of files).  Included files are loaded first (paths relative to the including
file), then the including file's keys are merged over them recursively, so an
ablation config only lists what it changes.  Command-line ``key=value``
overrides (dotted paths, values parsed as YAML) are applied last.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hybridps.pretrain.data import DataConfig
from hybridps.pretrain.hybrid import HybridConfig
from hybridps.pretrain.model.config import ModelConfig


class ConfigError(ValueError):
    """A configuration file or override that does not fit the dataclasses."""


@dataclass
class TrainConfig:
    """Optimisation, checkpointing and logging (see pretrain/train.py)."""

    output_dir: str = "runs/pretrain"
    max_steps: int = 1000               # optimizer steps
    seed: int = 0
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 500
    warmup_factor: float = 0.001
    schedule: str = "step"              # "step" | "cosine" | "constant"
    milestones: list[int] = field(default_factory=lambda: [700])
    gamma: float = 0.1
    grad_clip: float = 10.0             # max grad norm; 0 disables clipping
    grad_accum: int = 1
    mixed_precision: str = "no"         # "no" | "fp16" | "bf16"
    sync_bn: bool = False               # convert BatchNorm to SyncBatchNorm when world > 1
    log_with: str | None = "tensorboard"
    log_every: int = 10                 # tracker logging period (history.jsonl gets every step)
    save_every: int = 500               # checkpoint period in steps; 0 = only at the end
    total_limit: int = 2                # checkpoints kept
    progress: bool = True               # bar on a terminal; false: plain lines there too (as when piped)


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------- YAML <-> dataclass
class _YAMLLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e6`` (no dot) is a *string*; read it
    as the number YAML 1.2 and every user means (``lr: 1e-3`` included)."""


_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))


def _yaml_load(text):
    return yaml.load(text, Loader=_YAMLLoader)


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key_error(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {where}{key!r}{hint} (known: {', '.join(known)})")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert a YAML value against a type annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, prefix=f"{where}.")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        kt, vt = (typing.get_args(tp) + (Any, Any))[:2]
        return {_coerce(k, kt, where): _coerce(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2 ** 63:
            value = int(value)          # max_steps: 1e5
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (possibly partial) mapping; unknown keys raise."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key_error(prefix, key, names)
        kwargs[key] = _coerce(value, hints[key], f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:   # the dataclass's own validation (e.g. ModelConfig)
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def to_dict(obj) -> Any:
    """Dataclass -> plain YAML-able structure (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


# --------------------------------------------------------------------------- files and overrides
def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml_with_includes(path: str | Path, _seen: tuple = ()) -> dict:
    """Read a YAML config, resolving ``include:`` (a path or list of paths)."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"include cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = _yaml_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, load_yaml_with_includes(path.parent / inc, _seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(assignment: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in assignment:
        raise ConfigError(f"override {assignment!r} must look like key.path=value")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"override {assignment!r} has an empty key")
    try:
        value = _yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {assignment!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_override(data: dict, assignment: str, root_cls: Any = None) -> dict:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a raw
    mapping, checking each key against the dataclass tree of ``root_cls``
    (default :class:`PretrainConfig`) so a typo names the closest known key."""
    parts, value = parse_override(assignment)
    cls: Any = PretrainConfig if root_cls is None else root_cls
    node = data
    for i, part in enumerate(parts):
        if cls is not None and dataclasses.is_dataclass(cls):
            names = [f.name for f in dataclasses.fields(cls)]
            if part not in names:
                raise _unknown_key_error(".".join(parts[:i]) + ("." if i else ""), part, names)
            tp = _hints(cls)[part]
            cls = tp if dataclasses.is_dataclass(tp) else None
        if i == len(parts) - 1:
            node[part] = value
        else:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
    return data


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> PretrainConfig:
    """Config file (with includes) + dotted overrides -> validated :class:`PretrainConfig`."""
    data = load_yaml_with_includes(path) if path else {}
    for ov in overrides:
        data = apply_override(data, ov)
    _raise_problems(data)
    cfg = from_dict(PretrainConfig, data)
    validate(cfg)
    return cfg


def validate(cfg: PretrainConfig) -> None:
    """Range of every field (pretrain/validate.py), then cross-field checks."""
    _raise_problems(to_dict(cfg))
    d, t = cfg.data, cfg.train
    choices = {
        "data.remainder": (d.remainder, ("drop", "pad")),
        "data.reid_canvas": (d.reid_canvas, ("expand_resize", "random_paste")),
        "train.schedule": (t.schedule, ("step", "cosine", "constant")),
        "train.mixed_precision": (t.mixed_precision, ("no", "fp16", "bf16")),
    }
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {allowed}, got {value!r}")
    if t.log_with not in (None, "tensorboard"):
        raise ConfigError(f"train.log_with must be null or 'tensorboard', got {t.log_with!r}")
    m = cfg.model
    if m.ugas_sfm or m.ugas_distill or m.ugas_uncertainty:
        raise ConfigError("model.ugas_* are fine-tuning options: the hybrid objective's re-ID path "
                          "(deferred OIM, two-view positive, L_con) is defined on the deep embedding only")
    positive = {"data.batch_size": d.batch_size, "train.max_steps": t.max_steps,
                "train.grad_accum": t.grad_accum}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if len(d.crop_scale) != 2 or not 0 < d.crop_scale[0] <= d.crop_scale[1] <= 1:
        raise ConfigError(f"data.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {d.crop_scale}")
    pairs = (d.canvas_size, d.canvas_ratio, d.paste_scale)
    if any(len(v) != 2 for v in pairs) or len(d.color_jitter) != 4:
        raise ConfigError("data.canvas_size, canvas_ratio and paste_scale take 2 values, data.color_jitter 4")
    if d.weights is not None and any(w < 0 for w in d.weights.values()):
        raise ConfigError(f"data.weights must be >= 0, got {d.weights}")
    if d.urls is not None and d.manifest is None:
        raise ConfigError("data.urls needs data.manifest (the build's manifest.json)")


def _raise_problems(data: dict) -> None:
    """Every bad field at once, on one line (the CLI prints it as its error)."""
    from hybridps.pretrain.validate import check_tree

    problems = check_tree(PretrainConfig, data)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} bad config values: " + "; ".join(problems))


def dump_config(cfg: PretrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML that :func:`load_config` reads back unchanged."""
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
