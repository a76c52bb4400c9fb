"""Export targets by name: layout, file container, expected style and the config line to use.

Each target says what the downstream codebase does with the file; the
``config`` templates are formatted with ``out``, ``arch``, ``depth``,
``style``, ``num_pids`` and ``cq_size``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from hybridps.registry import Registry

PYTORCH_NORM = "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)"
D2_PYTORCH = ("MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
              "MODEL.PIXEL_MEAN [123.675,116.280,103.530] MODEL.PIXEL_STD [58.395,57.120,57.375]")

# NAE4PS lib/model/faster_rcnn_norm_aware.py and SeqNet models/seqnet.py: 5 sizes x 3 ratios on C4
NAE_ANCHORS = (32, 64, 128, 256, 512)
NAE_RATIOS = (0.5, 1.0, 2.0)
# psvis' released file names (model_urls in psvis/models/backbones/{resnet,shufflenet_v1}.py)
PSVIS_MODULES = {"shufflenetv1": "psvis.models.backbones.shufflenet_v1"}
PSVIS_FILES = {"resnet50": "resnet50-ps12.pth", "resnet18": "resnet18-ps15.pth",
               "shufflenetv1": "shufflenetv1-ps19.pth"}


class ClientMismatchError(ValueError):
    """The file would load into the target's real code silently wrong (or not at all)."""


@dataclass(frozen=True)
class Target:
    name: str
    layout: str
    container: str          # safetensors | state_dict | mmcv | full_model | d2_pkl
    style: str | None       # style the codebase's shipped configs assume (None: configurable)
    suffix: str
    strict: bool            # the downstream loader is strict: every key must be written
    archs: tuple[str, ...]  # "resnet" and/or "shufflenetv1"
    config: str
    style_fix: str = ""
    description: str = ""
    # What the real client hard-wires (docs/clients.md sections 1-2): the backbones its model builds (empty: any),
    # the RPN anchors it generates (empty: no RPN carried), and whether it pins torch < 1.6 /
    # torchvision < 0.13 (legacy container + legacy RPN names by default).
    client_archs: tuple[str, ...] = ()
    anchor_sizes: tuple[int, ...] = ()
    aspect_ratios: tuple[float, ...] = ()
    legacy_torch: bool = False


#: export targets by name; another module adds one with ``TARGETS.add(t.name, t)``
TARGETS: Registry[Target] = Registry("export target")
for _t in (
    Target("hybridps", "hybridps", "safetensors", "pytorch", ".safetensors", False, ("resnet", "shufflenetv1"),
           'checkpoints.load_pretrained("{out}") -> canonical state_dict; '
           'checkpoints.report.load_into(model, sd)',
           description="our own layout: initialise hybridps pre-training or fine-tuning"),
    Target("torchvision", "torchvision", "state_dict", "pytorch", ".pth", True, ("resnet",),
           'torchvision.models.{arch}(weights=None).load_state_dict(torch.load("{out}"))  '
           '# needs --with-fc; without fc use strict=False',
           description="plain torchvision ResNet state_dict"),
    Target("timm", "torchvision", "safetensors", "pytorch", ".safetensors", True, ("resnet",),
           'timm.create_model("{arch}", pretrained=False, num_classes=0, checkpoint_path="{out}")  '
           '# with --with-fc: drop num_classes=0',
           description="timm ResNet (default stem), safetensors"),
    # psvis/__init__.py exports nothing: the constructors live in psvis.models.backbones
    Target("psvis", "psvis", "mmcv", "pytorch", ".pth", True, ("resnet", "shufflenetv1"),
           '{psvis_build}; model.load_state_dict(torch.load("{out}")["state_dict"]){psvis_hub}',
           description="psvis package (released PretrainPS backbone format)"),
    Target("mmdet", "mmdet", "mmcv", None, ".pth", False, ("resnet",),
           "model = dict(pretrained='{out}', backbone=dict(type='ResNet', depth={depth}, style='{style}'))",
           description="any mmdet 2.x ResNet via `pretrained=`"),
    Target("alignps", "mmdet", "mmcv", "caffe", ".pth", False, ("resnet",),
           "model = dict(pretrained='{out}', backbone=dict(style='pytorch')); " + PYTORCH_NORM,
           "model = dict(pretrained='<file>', backbone=dict(style='pytorch')) and " + PYTORCH_NORM
           + " (both the train and test pipelines)",
           description="AlignPS `pretrained=` (backbone incl. layer4)"),
    Target("roi_alignps", "roi_alignps", "mmcv", "caffe", ".pth", False, ("resnet",),
           "load_from = '{out}'; model = dict(backbone=dict(style='pytorch'), "
           "roi_head=dict(shared_head=dict(style='pytorch'))); " + PYTORCH_NORM,
           "model.backbone.style='pytorch' and model.roi_head.shared_head.style='pytorch', and "
           + PYTORCH_NORM + " (train and test pipelines)",
           description="ROI-AlignPS whole detector via `load_from=` (backbone, shared_head.layer4, RPN, heads)"),
    Target("psdiff", "detectron2", "d2_pkl", "pytorch", ".pkl", False, ("resnet",),
           "MODEL.WEIGHTS {out} " + D2_PYTORCH,
           description="PSDiff / DiffusionDet (detectron2, FPN: the ResNet only)"),
    Target("detectron2", "detectron2", "d2_pkl", None, ".pkl", False, ("resnet",),
           "MODEL.WEIGHTS {out} " + D2_PYTORCH + "  # for caffe-style weights: STRIDE_IN_1X1 True, BGR",
           description="any detectron2 ResNet model"),
    Target("nae", "nae", "full_model", "pytorch", ".pth", True, ("resnet",),
           'model.load_state_dict(torch.load("{out}")["model"])  # in NAE4PS scripts/train_NAE.py, '
           "right after the model is built (num_pids={num_pids}, cq_size={cq_size})",
           description="NAE4PS full model (torch 1.2 container, torchvision 0.4 names)",
           client_archs=("resnet50",), anchor_sizes=NAE_ANCHORS, aspect_ratios=NAE_RATIOS, legacy_torch=True),
    Target("seqnet", "seqnet", "full_model", "pytorch", ".pth", False, ("resnet",),
           'resume_from_ckpt("{out}", model)  # in SeqNet train.py right after model = SeqNet(cfg); '
           "or --eval --ckpt {out} (LUT {num_pids}, CQ {cq_size})",
           description="SeqNet full model (torch 1.2 container, torchvision 0.4 names)",
           client_archs=("resnet50",), anchor_sizes=NAE_ANCHORS, aspect_ratios=NAE_RATIOS, legacy_torch=True),
):
    TARGETS.add(_t.name, _t)


def get_target(name: str) -> Target:
    """The export target called ``name``."""
    return TARGETS.get(name)


def config_line(target: Target, out: str, arch: str, style: str | None, num_pids: int, cq_size: int) -> str:
    depth = "".join(ch for ch in arch if ch.isdigit()) or "50"
    return target.config.format(out=out, arch=arch, depth=depth, style=style or "pytorch",
                                num_pids=num_pids, cq_size=cq_size, **_psvis_fields(arch, depth))


def _psvis_fields(arch: str, depth: str) -> dict[str, str]:
    if arch in PSVIS_FILES:
        module = PSVIS_MODULES.get(arch, "psvis.models.backbones")
        return {"psvis_build": f"from {module} import {arch}; model = {arch}(pretrained=False)",
                "psvis_hub": f"  # or copy the file to $TORCH_HOME/hub/checkpoints/{PSVIS_FILES[arch]} "
                             f"and call {arch}(pretrained=True)"}
    # no released weights and no constructor for this depth: the class itself
    return {"psvis_build": f"from psvis.models.backbones import ResNet; model = ResNet({depth})", "psvis_hub": ""}


# ------------------------------------------------------------ client checks
def container_options(target: Target, legacy_rpn: bool | None, legacy_format: bool | None) -> tuple[bool, bool]:
    """``(legacy_rpn, legacy_format)`` for ``target``: its client's default, or what was asked.

    NAE4PS and SeqNet pin torch 1.2 / torchvision 0.4: the legacy container (which current
    torch reads too) with ``rpn.head.conv.*`` names (which current torchvision remaps) loads
    everywhere.  The legacy container with the new ``rpn.head.conv.0.0.*`` names is refused:
    only a torch < 1.6 reader needs that container, its torchvision 0.4 does not know those
    names, and SeqNet's ``strict=False`` would leave the RPN conv random without a word.
    """
    if not target.legacy_torch:
        if legacy_rpn:
            raise ClientMismatchError(f"--legacy-rpn only applies to nae/seqnet, not {target.name}")
        return False, bool(legacy_format)
    rpn = True if legacy_rpn is None else legacy_rpn
    fmt = rpn if legacy_format is None else legacy_format
    if fmt and not rpn:
        raise ClientMismatchError(
            f"{target.name}: the legacy (torch < 1.6) container with torchvision >= 0.13 RPN names "
            "(rpn.head.conv.0.0.*) is what a torch 1.2 / torchvision 0.4 client cannot use: it does not "
            "know those names, and SeqNet's resume (strict=False) would leave the RPN conv random without "
            "a word. Keep the default (legacy container + rpn.head.conv.*, read by torch 1.2 and current "
            "torch alike), or pass --no-legacy-format as well for a current-torch-only file")
    return rpn, fmt


def container_note(target: Target, legacy_rpn: bool, legacy_format: bool) -> str | None:
    """Which torch / torchvision read the file a full-model target gets."""
    if not target.legacy_torch:
        return None
    if legacy_format:
        return ("legacy torch container with rpn.head.conv.* names: loads on torch 1.2 / torchvision 0.4 "
                "(the client's pin) and on current torch (torchvision >= 0.13 remaps the RPN names)")
    names = "rpn.head.conv.*" if legacy_rpn else "rpn.head.conv.0.0.*"
    return (f"zip container with {names} names: readable by torch >= 1.6 only; the torch 1.2 the client "
            "pins refuses it ('is a zip archive')")


def client_checks(target: Target, arch: str, canon: Mapping[str, object],
                  anchors: Mapping[str, tuple] | None, *, force: bool = False,
                  fresh_rpn: bool = False) -> list[str]:
    """Refuse (unless ``force``) what the target's real code would reject or misuse; return notes.

    ``anchors``: ``{"anchor_sizes": ..., "aspect_ratios": ...}`` the source's RPN was trained
    with, when known.
    """
    notes: list[str] = []
    if target.client_archs and arch not in target.client_archs:
        msg = (f"{target.name} hard-wires {'/'.join(target.client_archs)} (its model builds "
               f"torchvision {target.client_archs[0]} itself); a {arch} file fails its load on shape "
               "mismatches")
        if not force:
            raise ClientMismatchError(msg + "; pass --force only if you patched the client to build " + arch)
        notes.append("WARNING (--force): " + msg)
    if fresh_rpn and not target.anchor_sizes:
        raise ClientMismatchError(f"--fresh-rpn only applies to nae/seqnet, not {target.name}")
    has_rpn = any(str(k).startswith("rpn.head.") for k in canon)
    if not target.anchor_sizes or not has_rpn or fresh_rpn:
        if target.anchor_sizes and has_rpn and fresh_rpn:
            notes.append("--fresh-rpn: the source RPN was not copied; the target's RPN gets its own init")
        return notes
    want = {"anchor_sizes": tuple(target.anchor_sizes), "aspect_ratios": tuple(target.aspect_ratios)}
    if not anchors:
        notes.append(f"WARNING: the source's RPN anchors are unknown (no run config.yaml or anchor "
                     f"metadata); {target.name} generates sizes {want['anchor_sizes']} x ratios "
                     f"{want['aspect_ratios']}; if they differ, re-export with --fresh-rpn")
        return notes
    got = {k: tuple(float(x) for x in anchors[k]) for k in want if anchors.get(k) is not None}
    diff = [f"{k} {tuple(_num(x) for x in got[k])} vs {target.name}'s {want[k]}" for k in got
            if got[k] != tuple(float(x) for x in want[k])]
    if not diff:
        notes.append(f"source RPN anchors match {target.name}'s ({'; '.join(f'{k} {want[k]}' for k in got)})")
        return notes
    msg = ("the source RPN was trained for other anchors than the target generates (" + "; ".join(diff)
           + "): its cls_logits/bbox_pred rows would score and regress the wrong boxes")
    if not force:
        raise ClientMismatchError(msg + ". Pass --fresh-rpn to leave the RPN at the target's own init, "
                                        "or --force to copy it anyway")
    notes.append("WARNING (--force): " + msg)
    return notes


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else x


def source_anchors(metadata: Mapping[str, object], source: str | Path) -> dict[str, tuple] | None:
    """The anchors the source's RPN was trained with: file metadata, else the run's config.yaml."""
    found: dict[str, tuple] = {}
    for key in ("anchor_sizes", "aspect_ratios"):
        value = metadata.get(key)
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if isinstance(value, (list, tuple)) and value:
            found[key] = tuple(value)
    path = Path(source).expanduser()
    if not found and path.is_dir() and (path / "config.yaml").is_file():
        import yaml

        model = (yaml.safe_load((path / "config.yaml").read_text()) or {}).get("model") or {}
        for key in ("anchor_sizes", "aspect_ratios"):
            if isinstance(model.get(key), (list, tuple)) and model[key]:
                found[key] = tuple(model[key])
    return found or None

