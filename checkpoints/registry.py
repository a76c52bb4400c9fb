"""Where released and user-trained weights come from (data in registry.json, not code).

The built-in ``registry.json`` lists the released PretrainPS backbones and the
usual ImageNet baselines.  A user registry (``$HYBRIDPS_REGISTRY``, else
``$XDG_CONFIG_HOME/hybridps/registry.json``, else
``~/.config/hybridps/registry.json``) adds entries for the user's own runs;
``python -m hybridps.checkpoints add`` writes it.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BUILTIN = Path(__file__).with_name("registry.json")
SOURCE_TYPES = ("hf", "url", "local")


class RegistryError(ValueError):
    """A malformed registry file or an unknown / duplicate entry."""


@dataclass
class Entry:
    """One named set of weights."""

    name: str
    source: dict[str, Any]               # {"type": "hf", repo, file, revision} | {"type": "url", url} | {"type": "local", path}
    file: str
    arch: str
    layout: str
    style: str | None = None             # pytorch | caffe | None (unknown / not a ResNet)
    normalization: dict[str, Any] | None = None   # {"channels", "mean", "std"} in 0-255 units
    sha256: str | None = None
    sha256_prefix: str | None = None     # what torchvision-style file names carry
    size_bytes: int | None = None
    notes: str = ""
    origin: str = field(default="builtin", compare=False)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("origin")
        return {k: v for k, v in data.items() if v is not None and v != ""}


def user_registry_path() -> Path:
    """The user registry file (it need not exist yet)."""
    if os.environ.get("HYBRIDPS_REGISTRY"):
        return Path(os.environ["HYBRIDPS_REGISTRY"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hybridps" / "registry.json"


def _parse(path: Path, origin: str) -> list[Entry]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise RegistryError(f"{path}: not valid JSON ({type(exc).__name__}: {exc})") from None
    raw = data.get("entries") if isinstance(data, dict) else None
    if not isinstance(raw, list):
        raise RegistryError(f"{path}: expected {{\"entries\": [...]}}")
    entries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise RegistryError(f"{path}: entry {i}: expected an object, got {type(item).__name__}")
        try:
            entry = Entry(**item, origin=origin)
        except TypeError as exc:
            raise RegistryError(f"{path}: entry {i}: {exc}") from None
        _validate(entry, f"{path}: entry {entry.name!r}")
        entries.append(entry)
    return entries


def _check_file_name(name: Any, where: str, folders: bool = False) -> None:
    """``file`` becomes a path under the download cache: it must stay there.

    A hub file may sit in a folder of its repository (``folders``), but no part
    of it may climb out (``..``) or start at the root."""
    parts = name.replace("\\", "/").split("/") if isinstance(name, str) else []
    if not isinstance(name, str) or not name or "\0" in name or name.startswith(("/", "\\", "~")) \
            or Path(name).is_absolute() or any(p in ("", ".", "..") for p in parts) \
            or (len(parts) > 1 and not folders):
        kind = "a relative path inside the repository" if folders else "a plain file name"
        raise RegistryError(f"{where}: file must be {kind} (no '..', no absolute path), got {name!r}")


def check_normalization(norm: Any, where: str) -> dict[str, Any] | None:
    """``{"channels": RGB|BGR, "mean": [3 numbers], "std": [3 numbers > 0]}`` or
    None; anything else (``mean: 5``, NaN, a list for the whole thing) is a
    clear error instead of a TypeError deep in model construction."""
    import math

    if norm is None:
        return None
    if not isinstance(norm, dict):
        raise RegistryError(f"{where}: normalization must be an object, got {type(norm).__name__}")
    if norm.get("channels", "RGB") not in ("RGB", "BGR"):
        raise RegistryError(f"{where}: normalization channels must be RGB or BGR, got {norm.get('channels')!r}")
    for key in ("mean", "std"):
        v = norm.get(key)
        if not (isinstance(v, (list, tuple)) and len(v) == 3
                and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise RegistryError(f"{where}: normalization {key} must be 3 finite numbers, got {v!r:.80}")
        if key == "std" and min(v) <= 0:
            raise RegistryError(f"{where}: normalization std must be > 0, got {v!r}")
    return norm


def _validate(entry: Entry, where: str) -> None:
    check_normalization(entry.normalization, where)
    if not isinstance(entry.name, str) or not entry.name:
        raise RegistryError(f"{where}: name must be a non-empty string")
    if not isinstance(entry.source, dict):
        raise RegistryError(f"{where}: source must be an object")
    hub = entry.source.get("type") == "hf"
    _check_file_name(entry.file, where, folders=hub)
    if hub and entry.source.get("file") is not None:
        _check_file_name(entry.source["file"], f"{where}: source", folders=True)
    kind = entry.source.get("type")
    needs = {"hf": ("repo", "file"), "url": ("url",), "local": ("path",)}
    if kind not in needs:
        raise RegistryError(f"{where}: source type must be one of {SOURCE_TYPES}, got {kind!r}")
    absent = [k for k in needs[kind] if not entry.source.get(k)]
    if absent:
        raise RegistryError(f"{where}: {kind} source needs {', '.join(absent)}")
    if entry.style not in (None, "pytorch", "caffe"):
        raise RegistryError(f"{where}: style must be pytorch, caffe or null")
    if entry.sha256 is not None and (len(entry.sha256) != 64 or any(c not in "0123456789abcdef" for c in entry.sha256)):
        raise RegistryError(f"{where}: sha256 must be 64 lowercase hex digits")


def load_entries() -> dict[str, Entry]:
    """Built-in entries, then the user's (a user entry may not silently shadow a built-in)."""
    entries = {e.name: e for e in _parse(BUILTIN, "builtin")}
    user = user_registry_path()
    if user.is_file():
        for e in _parse(user, "user"):
            if e.name in entries and entries[e.name].origin == "builtin":
                raise RegistryError(f"{user}: entry {e.name!r} shadows a built-in entry; rename it")
            entries[e.name] = e
    return entries


def get(name: str) -> Entry:
    """The entry called ``name``."""
    entries = load_entries()
    if name not in entries:
        raise RegistryError(f"no registry entry {name!r}; known: {', '.join(sorted(entries))}")
    return entries[name]


def add(entry: Entry, replace: bool = False) -> Path:
    """Append (or with ``replace`` overwrite) an entry in the user registry; returns its path."""
    _validate(entry, f"entry {entry.name!r}")
    builtin = {e.name for e in _parse(BUILTIN, "builtin")}
    if entry.name in builtin:
        raise RegistryError(f"{entry.name!r} is a built-in entry; choose another name")
    path = user_registry_path()
    current = [e for e in _parse(path, "user")] if path.is_file() else []
    if any(e.name == entry.name for e in current) and not replace:
        raise RegistryError(f"{path} already has {entry.name!r}; pass --replace to overwrite it")
    current = [e for e in current if e.name != entry.name] + [entry]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"version": 1, "entries": [e.to_json() for e in current]}, indent=2) + "\n")
    os.replace(tmp, path)
    return path
