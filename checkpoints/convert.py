"""Source -> canonical -> target: reading any source, checking it, writing any target.

A *source* is a registry name, a weight file, a pre-training run directory
(``model.safetensors`` / ``backbone.safetensors`` + ``meta.json``, CONTRACTS 5)
or a run published to the hub (``hf://OWNER/NAME[@REV]``, :mod:`checkpoints.hub`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from hybridps.runlog import read_json_object

from . import arch as archs
from . import registry
from .registry import check_normalization
from .download import fetch
from .layouts import Conversion, detect_layout, get_layout
from .layouts.base import detect_arch_canonical
from .report import DEFAULT_MIN_FRACTION, Report
from .safe_load import load_checkpoint
from .style import STYLES, check_style
from .targets import Target, client_checks, config_line, container_note, container_options, get_target, \
    source_anchors
from .writers import write

RUN_DIR_FILES = ("model.safetensors", "backbone.safetensors")


class ConversionError(ValueError):
    """A conversion that would produce a file the target cannot use."""


@dataclass
class SourceWeights:
    """A loaded source and everything known about it."""

    state_dict: dict[str, torch.Tensor]
    layout: str
    description: str
    style: str | None = None
    normalization: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pretrained:
    """Canonical weights ready for our model, with what is known about how they were trained."""

    state_dict: dict[str, torch.Tensor]
    arch: str
    style: str | None
    normalization: dict[str, Any] | None
    report: Report


@dataclass
class Result:
    out: Path
    target: str
    arch: str
    report: Report
    config: str


# ------------------------------------------------------------------ reading
def _style_from(meta: Mapping[str, Any]) -> str | None:
    style = meta.get("style")
    return style if style in STYLES else None


def _norm_from(meta: Mapping[str, Any], where: str = "metadata") -> dict[str, Any] | None:
    if "mean" in meta and "std" in meta:
        return check_normalization({"channels": meta.get("channels", "RGB"), "mean": meta["mean"],
                                    "std": meta["std"]}, where)
    return None


def _read_file(path: Path, layout: str | None, description: str) -> SourceWeights:
    ck = load_checkpoint(path)
    name = layout or ck.metadata.get("hybridps_layout") or detect_layout(ck.state_dict)
    return SourceWeights(ck.state_dict, get_layout(name).NAME, description, _style_from(ck.metadata),
                         _norm_from(ck.metadata, f"{path}: metadata"), ck.metadata)


def _read_run_dir(path: Path, layout: str | None) -> SourceWeights:
    files = [path / f for f in RUN_DIR_FILES if (path / f).is_file()]
    if not files:
        raise FileNotFoundError(f"{path} is a directory without {' or '.join(RUN_DIR_FILES)}; "
                                "is it a pre-training run directory?")
    own = "hybridps" if files[0].name == "model.safetensors" else None   # CONTRACTS 5: our layout
    src = _read_file(files[0], layout or own, f"run {path} ({files[0].name})")
    meta_file = path / "meta.json"
    if meta_file.is_file():
        meta = read_json_object(meta_file)
        src.style = src.style or _style_from(meta)
        src.normalization = src.normalization or _norm_from(meta, str(meta_file))
        src.metadata = {**meta, **src.metadata}
    return src


def read_source(source: str | Path, *, layout: str | None = None, cache: str | Path | None = None,
                offline: bool | None = None) -> SourceWeights:
    """Load a registry name, weight file, run directory or ``hf://`` address,
    never executing pickled code."""
    if isinstance(source, str) and source.startswith("hf://"):
        from .hub import fetch_hf

        local = fetch_hf(source, cache=cache, offline=offline)
        src = _read_run_dir(local, layout) if local.is_dir() else _read_file(local, layout, source)
        src.description = f"{source} ({src.description})"
        return src
    path = Path(source).expanduser()
    if path.is_dir():
        return _read_run_dir(path, layout)
    if path.is_file():
        return _read_file(path, layout, str(path))
    if isinstance(source, str) and not any(sep in source for sep in "/\\"):
        entry = registry.get(source)
        local = fetch(entry, cache=cache, offline=offline)
        src = _read_run_dir(local, layout or entry.layout) if local.is_dir() else \
            _read_file(local, layout or entry.layout, f"registry:{entry.name}")
        src.style = src.style or entry.style
        src.normalization = src.normalization or entry.normalization
        return src
    raise FileNotFoundError(f"{source}: neither a file, a run directory nor a registry name")


# ---------------------------------------------------------------- checks
def shape_mismatches(canon: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Canonical backbone keys whose shape is not the architecture's:
    ``{key: (have, want)}``.  Key names alone say nothing about shapes -- a
    file with every tensor reshaped to 3x3 has all the right names."""
    from .layouts.base import backbone_view

    view = backbone_view(canon)
    try:
        arch = archs.detect_arch(view.keys())
        want = archs.template(arch, with_fc=True)
    except archs.UnknownArchError:
        return {}
    return {ckey: (tuple(canon[ckey].shape), tuple(want[ukey][0])) for ukey, ckey in view.items()
            if ukey in want and tuple(canon[ckey].shape) != tuple(want[ukey][0])}


def mark_mismatches(rep: Report, bad: Mapping[str, Any], source_of: Mapping[str, str | None] | None = None) -> Report:
    """Move keys that came from a wrongly shaped canonical tensor from
    ``loaded`` to ``mismatched``, so the matched fraction (and its threshold)
    sees them."""
    if not bad:
        return rep
    for counts in rep.modules.values():
        moved = [k for k in counts.loaded if k in bad or (source_of is not None and source_of.get(k) in bad)]
        for k in moved:
            counts.loaded.remove(k)
            counts.mismatched.append(k)
    example = next(iter(bad.items()))
    rep.notes.append(f"{len(bad)} tensor(s) do not have the architecture's shape, e.g. {example[0]} "
                     f"{list(example[1][0])} (expected {list(example[1][1])})")
    return rep


def non_finite_tensors(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Floating tensors holding NaN or inf: a diverged run's weights load and
    export without complaint, and every downstream number is then NaN."""
    return [k for k, v in sd.items() if v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())]


def check_finite(sd: Mapping[str, torch.Tensor], what: str, force: bool = False,
                 warn=lambda m: print(m, file=__import__("sys").stderr)) -> list[str]:
    bad = non_finite_tensors(sd)
    if bad:
        msg = (f"{what}: {len(bad)} of {len(sd)} tensors hold NaN/inf values (e.g. {', '.join(bad[:3])}); "
               "the weights come from a diverged or damaged run")
        if not force:
            raise ConversionError(msg + "; refusing them (--force writes them anyway)")
        warn(f"WARNING: {msg}; writing them anyway because of --force")
    return bad


# ---------------------------------------------------------------- canonical
def canonicalize(state_dict: Mapping[str, torch.Tensor], layout: str | None = None) -> Conversion:
    """Any known layout -> canonical, with the bookkeeping for a report."""
    name = layout or detect_layout(state_dict)
    return get_layout(name).to_canonical(state_dict)


def to_canonical(state_dict: Mapping[str, torch.Tensor], layout: str | None = None) -> dict[str, torch.Tensor]:
    """Convert a state_dict in any known layout (auto-detected when ``layout`` is None) to ours."""
    return canonicalize(state_dict, layout).state_dict


def load_pretrained(source: str | Path, *, layout: str | None = None, min_fraction: float = DEFAULT_MIN_FRACTION,
                    cache: str | Path | None = None, offline: bool | None = None) -> Pretrained:
    """Registry name / file / run dir -> canonical weights for our pre-training or fine-tuning."""
    src = read_source(source, layout=layout, cache=cache, offline=offline)
    conv = canonicalize(src.state_dict, src.layout)
    rep = mark_mismatches(conv.report(f"{src.description} [{src.layout}] -> hybridps"),
                          shape_mismatches(conv.state_dict)).check(min_fraction)
    check_finite(conv.state_dict, src.description)
    return Pretrained(conv.state_dict, detect_arch_canonical(conv.state_dict), src.style, src.normalization, rep)


# ------------------------------------------------------------------- export
def _arch_kind(arch: str) -> str:
    return "resnet" if archs.is_resnet(arch) else arch


def export(canon: Conversion, target: Target, arch: str, **options: Any) -> Conversion:
    """Canonical -> target keys (no file written)."""
    if _arch_kind(arch) not in target.archs:
        raise ConversionError(f"target {target.name} takes {'/'.join(target.archs)} backbones, not {arch}")
    return get_layout(target.layout).from_canonical(canon.state_dict, arch, extras=canon.extras, **options)


def _combined_report(src: SourceWeights, canon: Conversion, out: Conversion, target: Target) -> Report:
    rep = out.report(f"{src.description} [{src.layout}] -> {target.name} [{target.layout}]")
    used = {s for s in out.source_of.values() if s is not None}
    for key in canon.unused:
        if key not in used:
            rep.add("unexpected", key)
    rep.notes = canon.notes + rep.notes
    return rep


def convert(source: str | Path, target_name: str, out: str | Path, *, force: bool = False,
            overwrite: bool = False, min_fraction: float = DEFAULT_MIN_FRACTION, num_pids: int = 5532,
            cq_size: int = 5000, with_fc: bool = False, source_style: str | None = None,
            legacy_rpn: bool | None = None, legacy_format: bool | None = None, seed: int = 0,
            layout: str | None = None, cache: str | Path | None = None, offline: bool | None = None,
            fresh_rpn: bool = False) -> Result:
    """Convert ``source`` into ``target_name``'s file at ``out``; raises before writing anything bad.

    ``legacy_rpn`` / ``legacy_format`` None: what the target's real client reads (nae/seqnet:
    both legacy).  ``fresh_rpn``: leave the RPN at the target's own init.
    """
    target = get_target(target_name)
    legacy_rpn, legacy_format = container_options(target, legacy_rpn, legacy_format)
    out = Path(out)
    _check_suffix(target, out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if num_pids <= 0 or cq_size <= 0:
        raise ValueError("--num-pids and --cq-size must be positive")
    src = read_source(source, layout=layout, cache=cache, offline=offline)
    style = source_style or src.style
    canon = canonicalize(src.state_dict, src.layout)
    if not canon.state_dict:
        raise ConversionError(f"{src.description}: 0 keys could be read as {src.layout} -- refusing to write "
                              f"an empty file.\n{canon.report(src.description).text()}")
    arch = detect_arch_canonical(canon.state_dict)
    notes = check_style(style, target.style, target.name, target.style_fix, force) if archs.is_resnet(arch) else []
    # what the target's real code would reject or misuse (docs/clients.md section 2): refused unless --force
    notes += client_checks(target, arch, canon.state_dict, source_anchors(src.metadata, source),
                           force=force, fresh_rpn=fresh_rpn)
    if fresh_rpn and target.anchor_sizes:
        dropped = [k for k in canon.state_dict if k.startswith("rpn.")]
        canon.state_dict = {k: v for k, v in canon.state_dict.items() if k not in dropped}
        canon.unused.extend(canon.source_of.get(k) or k for k in dropped)
    conv = export(canon, target, arch, num_pids=num_pids, cq_size=cq_size, with_fc=with_fc,
                  legacy_rpn=legacy_rpn, seed=seed)
    rep = mark_mismatches(_combined_report(src, canon, conv, target), shape_mismatches(canon.state_dict),
                          conv.source_of)
    rep.notes.extend(notes)
    if target.strict and conv.missing:
        raise ConversionError(f"{target.name} loads strictly but the source lacks {len(conv.missing)} of its "
                              f"weights (e.g. {', '.join(conv.missing[:3])}); refusing to write a file it "
                              f"cannot load.\n{rep.text()}")
    rep.check(min_fraction)
    if check_finite(canon.state_dict, src.description, force):
        rep.notes.append("NaN/inf weights written because of --force")
    meta = _meta(src, target, arch, style)
    if target.container == "state_dict" and out.suffix != ".safetensors":
        rep.notes.append("a plain .pth state_dict has no room for metadata (style is recorded only in "
                         ".safetensors / mmcv 'meta' / full-model 'meta'); use --out *.safetensors to keep it")
    if (note := container_note(target, legacy_rpn, legacy_format)) is not None:
        rep.notes.append(note)
    write(target.container, conv.state_dict, out, meta, legacy_format=legacy_format)
    return Result(out, target.name, arch, rep, config_line(target, str(out), arch, style, num_pids, cq_size))


def _check_suffix(target: Target, out: Path) -> None:
    """Downstream loaders pick their reader by extension (detectron2: .pkl, timm: .safetensors)."""
    allowed = {target.suffix}
    if target.suffix == ".pth":
        allowed |= {".pt", ".bin"}
    if target.layout == "torchvision":
        allowed |= {".pth", ".pt", ".safetensors"}
    if out.suffix not in allowed:
        raise ValueError(f"--out {out}: target {target.name} needs a file ending in {' or '.join(sorted(allowed))} "
                         "(its loader picks the reader by extension)")


def _meta(src: SourceWeights, target: Target, arch: str, style: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"hybridps_layout": target.layout, "target": target.name, "arch": arch,
                            "source": src.description, "source_layout": src.layout}
    if style:
        meta["style"] = style
    norm = src.normalization          # only what is known: never guessed from the style
    if norm:
        meta.update({"channels": norm.get("channels"), "mean": list(norm["mean"]), "std": list(norm["std"])})
    return meta
