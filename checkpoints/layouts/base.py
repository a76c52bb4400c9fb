"""Shared pieces of the key layouts: the conversion record and canonical-layout helpers.

Canonical layout (CONTRACTS section 4): our search model's state_dict --
``backbone.{conv1,bn1,layer1..3}.*``, ``rpn.head.*``,
``roi_heads.box_head.layer4.*``, ``roi_heads.box_predictor.bbox_pred.{0,1}.*``,
``roi_heads.embedding_head.*`` (and ``roi_heads.reid_loss.*``, which is never
carried).  A ShuffleNetV1 keeps psvis names: ``backbone.{conv1,layers.0,layers.1}.*``
and ``roi_heads.box_head.layers.2.*``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import torch

from .. import arch as archs
from ..report import Report

BACKBONE = "backbone."
BOX_HEAD = "roi_heads.box_head."
REID_LOSS = "roi_heads.reid_loss."
# torchvision < 0.13 named the RPN conv without the Sequential wrapping.
RPN_CONV_NEW = "rpn.head.conv.0.0."
RPN_CONV_OLD = "rpn.head.conv."


@dataclass
class Conversion:
    """Keys written by one conversion step, and where each came from."""

    layout: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    source_of: dict[str, str | None] = field(default_factory=dict)   # None: initialised here
    unused: list[str] = field(default_factory=list)     # input keys not carried over
    missing: list[str] = field(default_factory=list)    # wanted by the target, not written
    extras: dict[str, torch.Tensor] = field(default_factory=dict)    # passthrough (e.g. fc)
    notes: list[str] = field(default_factory=list)

    def put(self, key: str, value: torch.Tensor, source: str | None) -> None:
        self.state_dict[key] = value
        self.source_of[key] = source

    def report(self, title: str) -> Report:
        rep = Report(title, notes=list(self.notes))
        for key, src in self.source_of.items():
            rep.add("loaded" if src is not None else "initialised", key)
        for key in self.missing:
            rep.add("missing", key)
        for key in self.unused:
            rep.add("unexpected", key)
        return rep


def mark_unused(conv: Conversion, inputs: Iterable[str]) -> Conversion:
    """Record every input key that no output came from."""
    used = {s for s in conv.source_of.values() if s is not None}
    conv.unused.extend(k for k in inputs if k not in used and k not in conv.unused)
    return conv


# ------------------------------------------------------------- canonical views
def normalise_rpn(key: str) -> str:
    """Old torchvision RPN conv names -> the current ``conv.0.0`` names."""
    if key.startswith(RPN_CONV_OLD) and not key.startswith(RPN_CONV_NEW):
        return RPN_CONV_NEW + key[len(RPN_CONV_OLD):]
    return key


def backbone_view(canon: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Unprefixed backbone name -> canonical key (body from backbone.*, last stage from box_head)."""
    view: dict[str, str] = {}
    for key in canon:
        if key.startswith(BACKBONE):
            view[key[len(BACKBONE):]] = key
        elif key.startswith(BOX_HEAD):
            view[key[len(BOX_HEAD):]] = key
    return view


def canonical_name(backbone_key: str, arch: str) -> str:
    """Where an unprefixed backbone key lives in the canonical layout."""
    if backbone_key.startswith(archs.last_stage_prefix(arch)):
        return BOX_HEAD + backbone_key
    return BACKBONE + backbone_key


def detect_arch_canonical(canon: Mapping[str, torch.Tensor]) -> str:
    return archs.detect_arch(backbone_view(canon).keys())


def backbone_to_canonical(layout: str, sd: Mapping[str, torch.Tensor], names: Mapping[str, str] | None = None,
                          arch: str | None = None) -> Conversion:
    """Unprefixed backbone keys (``names``: unprefixed -> input key) into the canonical layout.

    ``fc.*`` goes to ``extras`` (a classifier has no place in the detector but
    a torchvision export may want it back).
    """
    names = dict(names) if names is not None else {k: k for k in sd}
    arch = arch or archs.detect_arch(names.keys())
    tmpl = archs.template(arch)
    conv = Conversion(layout)
    for name, src in names.items():
        if name in tmpl:
            conv.put(canonical_name(name, arch), sd[src], src)
        elif name.startswith("fc."):
            conv.extras[name] = sd[src]
    conv.missing = [canonical_name(k, arch) for k in tmpl if k not in names]
    mark_unused(conv, sd.keys())
    return conv


# --------------------------------------------------------------- initialisers
def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def normal(shape: tuple[int, ...], std: float, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std


def linear_default(shape: tuple[int, ...], gen: torch.Generator, fan_in: int) -> torch.Tensor:
    """torch.nn.Linear's default init (kaiming_uniform a=sqrt(5) == U(-1/sqrt(fan_in), ..))."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2 - 1) * bound


def bn_entry(entry: str, n: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """A fresh BatchNorm buffer/parameter of width ``n``."""
    if entry == "num_batches_tracked":
        return torch.tensor(0, dtype=torch.int64)
    if entry == "weight":
        return weight if weight is not None else torch.ones(n)
    if entry == "running_var":
        return torch.ones(n)
    return torch.zeros(n)


def fill_value(key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """Only ``num_batches_tracked`` can be made up without changing what a network computes."""
    if key.endswith("num_batches_tracked"):
        return torch.zeros(shape, dtype=dtype)
    return None

