"""One run folder -> every downstream layout its architecture fits, in one folder.

``python -m hybridps.checkpoints export RUN --out DIR`` writes, with the same checks as
``convert`` (one process, the source read once per target):

* ``torchvision_<arch>.pth``, ``timm_<arch>.safetensors``, ``mmdet_<arch>.pth``,
  ``detectron2_<arch>.pkl`` -- the backbone (ResNets);
* ``psvis_<arch>.pth`` -- the backbone (ShuffleNetV1, the only layout it has);
* ``nae_resnet50.pth``, ``seqnet_resnet50.pth`` -- the whole detector and
  embedding head, for ResNet-50 sources only: NAE4PS and SeqNet build a
  ResNet-50 themselves.  A source RPN trained for other anchors than theirs is
  left to their own init (``--fresh-rpn``) rather than copied wrong;
* ``EXPORTS.txt`` -- every file with the line that loads it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import arch as archs
from .convert import Result, canonicalize, convert, read_source
from .layouts.base import detect_arch_canonical
from .targets import NAE_ANCHORS, NAE_RATIOS, get_target, source_anchors

BACKBONE_TARGETS = ("torchvision", "timm", "mmdet", "detectron2")
FULL_TARGETS = ("nae", "seqnet")


@dataclass
class Bundle:
    arch: str
    results: list[Result] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    index: Path | None = None


def default_targets(arch: str) -> tuple[list[str], list[str]]:
    """(targets to write, lines saying what was left out and why) for a source ``arch``."""
    if not archs.is_resnet(arch):
        return ["psvis"], [f"{', '.join(BACKBONE_TARGETS + FULL_TARGETS)}: skipped -- they build ResNets, "
                           f"this source is a {arch}"]
    if arch == "resnet50":
        return list(BACKBONE_TARGETS + FULL_TARGETS), []
    return list(BACKBONE_TARGETS), [f"nae/seqnet: skipped -- NAE4PS and SeqNet build a ResNet-50, this source is a "
                                    f"{arch} (pre-train with model.backbone=resnet50 to export the whole detector "
                                    "to them)"]


def export_bundle(source: str | Path, out: str | Path, targets: list[str] | None = None, *,
                  overwrite: bool = False, num_pids: int = 5532, cq_size: int = 5000,
                  offline: bool | None = None, log: Callable[[str], None] = print) -> Bundle:
    """Convert ``source`` to each of ``targets`` (default: :func:`default_targets`) under ``out``."""
    out = Path(out)
    src = read_source(source, offline=offline)
    arch = detect_arch_canonical(canonicalize(src.state_dict, src.layout).state_dict)
    chosen, skipped = default_targets(arch) if not targets else (list(targets), [])
    for name in chosen:
        get_target(name)                                  # unknown names fail before anything is written
    anchors = source_anchors(src.metadata, source)
    nae_anchors = {"anchor_sizes": tuple(float(a) for a in NAE_ANCHORS),
                   "aspect_ratios": tuple(float(r) for r in NAE_RATIOS)}
    same_anchors = bool(anchors) and all(tuple(float(x) for x in anchors.get(k, ())) == v
                                         for k, v in nae_anchors.items())
    out.mkdir(parents=True, exist_ok=True)
    bundle = Bundle(arch, skipped=skipped)
    for name in chosen:
        target = get_target(name)
        suffix = ".safetensors" if name == "timm" else target.suffix
        fresh = bool(target.anchor_sizes) and not same_anchors
        res = convert(source, name, out / f"{name}_{arch}{suffix}", overwrite=overwrite, num_pids=num_pids,
                      cq_size=cq_size, offline=offline, fresh_rpn=fresh)
        bundle.results.append(res)
        warn = [n for n in res.report.notes if n.startswith("WARNING")]
        log(f"wrote {res.out} ({name}{', RPN left to the client (other anchors)' if fresh else ''})"
            + "".join(f"\n    {w}" for w in warn))
    for line in skipped:
        log(line)
    lines = []
    for res in bundle.results:
        lines += [f"{res.out.name}  ({res.target}, {res.arch})", f"    {res.config}", ""]
    lines += skipped
    index = out / "EXPORTS.txt"
    tmp = index.with_name(".EXPORTS.txt.partial")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    os.replace(tmp, index)
    bundle.index = index
    return bundle
