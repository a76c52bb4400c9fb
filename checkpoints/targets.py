"""Export targets by name: layout, file container, expected style and the config line to use.

Each target says what the downstream codebase does with the file; the
``config`` templates are formatted with ``out``, ``arch``, ``depth``,
``style``, ``num_pids`` and ``cq_size``.
"""
from __future__ import annotations

from dataclasses import dataclass

PYTORCH_NORM = "img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)"
D2_PYTORCH = ("MODEL.RESNETS.STRIDE_IN_1X1 False INPUT.FORMAT RGB "
              "MODEL.PIXEL_MEAN [123.675,116.280,103.530] MODEL.PIXEL_STD [58.395,57.120,57.375]")


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


TARGETS: dict[str, Target] = {t.name: t for t in (
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
    Target("psvis", "psvis", "mmcv", "pytorch", ".pth", True, ("resnet", "shufflenetv1"),
           'model = psvis.{arch}(pretrained=False); model.load_state_dict(torch.load("{out}")["state_dict"])',
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
           description="PSDiff / DiffusionDet (detectron2, FPN: bottom_up only)"),
    Target("detectron2", "detectron2", "d2_pkl", None, ".pkl", False, ("resnet",),
           "MODEL.WEIGHTS {out} " + D2_PYTORCH + "  # for caffe-style weights: STRIDE_IN_1X1 True, BGR",
           description="any detectron2 ResNet model"),
    Target("nae", "nae", "full_model", "pytorch", ".pth", True, ("resnet",),
           'model.load_state_dict(torch.load("{out}")["model"])  # in NAE4PS scripts/train_NAE.py, '
           "right after the model is built (num_pids={num_pids}, cq_size={cq_size})",
           description="NAE4PS full model"),
    Target("seqnet", "seqnet", "full_model", "pytorch", ".pth", False, ("resnet",),
           'resume_from_ckpt("{out}", model)  # in SeqNet train.py right after model = SeqNet(cfg); '
           "or --eval --ckpt {out} (LUT {num_pids}, CQ {cq_size})",
           description="SeqNet full model"),
)}


def get_target(name: str) -> Target:
    """The export target called ``name``."""
    if name not in TARGETS:
        raise KeyError(f"unknown target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


def config_line(target: Target, out: str, arch: str, style: str | None, num_pids: int, cq_size: int) -> str:
    depth = "".join(ch for ch in arch if ch.isdigit()) or "50"
    return target.config.format(out=out, arch=arch, depth=depth, style=style or "pytorch",
                                num_pids=num_pids, cq_size=cq_size)
