"""Assembling a full NAE-family state_dict (NAE4PS, SeqNet) from the canonical layout."""
from __future__ import annotations

from typing import Mapping

import torch

from .. import arch as archs
from .base import BACKBONE, BOX_HEAD, RPN_CONV_NEW, RPN_CONV_OLD, Conversion, generator, mark_unused, \
    normalise_rpn
from .canonical import HeadSpec, make_value

# A plan row: output key, canonical key it is copied from (or None), shape, dtype, fresh init
# (None = cannot be made up: a backbone weight).
PlanRow = tuple[str, str | None, tuple[int, ...], torch.dtype, str | None]


def backbone_rows(arch: str, stage_prefix: str, out_prefix: str, canon_prefix: str) -> list[PlanRow]:
    """Rows copying the template keys under ``stage_prefix`` selection into ``out_prefix``."""
    rows: list[PlanRow] = []
    last = archs.last_stage_prefix(arch)
    for key, (shape, dtype) in archs.template(arch).items():
        in_last = key.startswith(last)
        if (stage_prefix == last) != in_last:
            continue
        init = "nbt" if key.endswith("num_batches_tracked") else None
        rows.append((out_prefix + key, canon_prefix + key, shape, dtype, init))
    return rows


def body_rows(arch: str) -> list[PlanRow]:
    return backbone_rows(arch, "body", BACKBONE, BACKBONE)


def layer4_rows(arch: str, out_prefix: str) -> list[PlanRow]:
    return backbone_rows(arch, archs.last_stage_prefix(arch), out_prefix, BOX_HEAD)


def head_rows(specs: list[HeadSpec], copy_from_canonical: bool = True) -> list[PlanRow]:
    rows: list[PlanRow] = []
    for key, shape, init in specs:
        dtype = torch.int64 if key.endswith("num_batches_tracked") else torch.float32
        rows.append((key, key if copy_from_canonical else None, shape, dtype, init))
    return rows


def rename_rpn(rows: list[PlanRow], legacy: bool) -> list[PlanRow]:
    """torchvision < 0.13 (SeqNet/NAE pins) names the RPN conv ``rpn.head.conv.*``."""
    if not legacy:
        return rows
    return [(RPN_CONV_OLD + k[len(RPN_CONV_NEW):] if k.startswith(RPN_CONV_NEW) else k, s, sh, dt, i)
            for k, s, sh, dt, i in rows]


def assemble(layout: str, canon: Mapping[str, torch.Tensor], plan: list[PlanRow], seed: int) -> Conversion:
    """Fill every plan row from ``canon`` when present with the right shape, else freshly."""
    canon = {normalise_rpn(k): v for k, v in canon.items()}
    gen = generator(seed)
    conv = Conversion(layout)
    wrong_shape: list[str] = []
    for key, src, shape, dtype, init in plan:
        value = canon.get(src) if src is not None else None
        if value is not None and tuple(value.shape) == tuple(shape):
            conv.put(key, value, src)
            continue
        if value is not None:
            wrong_shape.append(f"{src} {tuple(value.shape)} != {tuple(shape)}")
        if init == "nbt":
            conv.put(key, torch.zeros(shape, dtype=dtype), None)
        elif init is not None:
            conv.put(key, make_value(init, shape, gen).to(dtype), None)
        else:
            conv.missing.append(key)
    if wrong_shape:
        conv.notes.append("shape differs from the target, initialised fresh instead: " + "; ".join(wrong_shape[:5]))
    mark_unused(conv, canon.keys())
    return conv


def canonical_from_nae(layout: str, sd: Mapping[str, torch.Tensor], drop: tuple[str, ...]) -> Conversion:
    """NAE-family keys -> canonical: everything our model has; ``drop`` prefixes reported unused."""
    from .canonical import OWN_PREFIXES

    conv = Conversion(layout)
    for key, value in sd.items():
        new = normalise_rpn(key)
        if new.startswith(OWN_PREFIXES) and not key.startswith(drop):
            conv.put(new, value, key)
    conv.notes.append("roi_heads.reid_loss.{lut,cq} are never carried: OIM memories are dataset-specific")
    return mark_unused(conv, sd.keys())
