"""detectron2 / DiffusionDet / PSDiff: ``.pkl`` with detectron2's relative ResNet names.

Written names are relative (``stem.*``, ``res2.*``..``res5.*``), as detectron2's own
``tools/convert-torchvision-to-d2.py`` writes them: ``DetectionCheckpointer`` matches a
file key to every model key that *ends* with it, so relative names land in C4 models
(``backbone.stem``, ``backbone.res2-4``, ``roi_heads.res5``) and FPN models
(``backbone.bottom_up.*``, DiffusionDet/PSDiff) alike.  A ``backbone.bottom_up.`` prefix
would only ever match FPN models: a C4 model got 0 weights and one warning.

Rename rule (detectron2 ``tools/convert-torchvision-to-d2.py``): ``stem.`` for
the stem, ``layer{t}`` -> ``res{t+1}``, ``bn{t}`` -> ``conv{t}.norm``,
``downsample.{0,1}`` -> ``shortcut[.norm]``.  detectron2 uses FrozenBN, which has
no ``num_batches_tracked``, so those are not written.  Only the bottom-up ResNet
transfers: the FPN and the diffusion head of a DiffusionDet/PSDiff model stay
at their own initialisation.
"""
from __future__ import annotations

import re
from typing import Mapping

import torch

from .. import arch as archs
from .base import Conversion, backbone_to_canonical, backbone_view, mark_unused

NAME = "detectron2"
ORDER = 10          # auto-detection tries layouts in this order: the most specific markers first
DESCRIPTION = ("detectron2/DiffusionDet/PSDiff .pkl {'model': {stem.*, res2-5.*: ndarray}, '__author__', "
               "'matching_heuristics'}")
PREFIX = "backbone.bottom_up."     # FPN models' prefix (read, never written)
UNINITIALISED_NOTE = ("only the ResNet (stem, res2-res5) transfers: detectron2 matches these relative names into "
                      "backbone.bottom_up.* (FPN, DiffusionDet/PSDiff) or backbone.* + roi_heads.res5.* (C4); "
                      "an FPN's fpn_lateral/fpn_output, the RPN, the box head and a diffusion head (head.*) "
                      "stay UNINITIALISED by this file and keep the target's own random init")


def detect(keys: set[str]) -> bool:
    return any("bottom_up." in k or k.startswith(("stem.conv1", "res2.", "backbone.res2.", "backbone.stem."))
               for k in keys)


def to_d2(name: str) -> str:
    """torchvision ResNet name -> detectron2 ResNet name (relative to bottom_up)."""
    m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", name)
    if not m:
        return "stem." + name.replace("bn1.", "conv1.norm.")
    stage, block, rest = int(m.group(1)) + 1, m.group(2), m.group(3)
    rest = re.sub(r"^bn(\d)\.", r"conv\1.norm.", rest)
    rest = rest.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")
    return f"res{stage}.{block}.{rest}"


def from_d2(name: str) -> str | None:
    """detectron2 relative ResNet name -> torchvision name (None for anything else)."""
    if name.startswith("stem."):
        rest = name[len("stem."):]
        if rest.startswith("conv1.norm."):
            return "bn1." + rest[len("conv1.norm."):]
        return rest if rest.startswith("conv1.") else None
    m = re.match(r"^res([2-5])\.(\d+)\.(.*)$", name)
    if not m:
        return None
    rest = m.group(3)
    rest = re.sub(r"^conv(\d)\.norm\.", r"bn\1.", rest)
    rest = rest.replace("shortcut.norm.", "downsample.1.").replace("shortcut.", "downsample.0.")
    return f"layer{int(m.group(1)) - 1}.{m.group(2)}.{rest}"


def _relative(key: str) -> str:
    for prefix in (PREFIX, "backbone.", "roi_heads."):
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def to_canonical(sd: Mapping[str, torch.Tensor]) -> Conversion:
    """detectron2 names (FPN ``bottom_up``, C4 ``backbone.``/``roi_heads.res5`` or relative) -> canonical."""
    names: dict[str, str] = {}
    for key in sd:
        tv = from_d2(_relative(key))
        if tv is not None and not tv.startswith("fc."):
            names[tv] = key
    conv = backbone_to_canonical(NAME, sd, names)
    filled = [k for k in conv.missing if k.endswith("num_batches_tracked")]
    for key in filled:
        conv.put(key, torch.tensor(0, dtype=torch.int64), None)
    conv.missing = [k for k in conv.missing if k not in filled]
    if filled:
        conv.notes.append(f"{len(filled)} num_batches_tracked set to 0 (detectron2 FrozenBN has none)")
    return conv


def from_canonical(canon: Mapping[str, torch.Tensor], arch: str, **_: object) -> Conversion:
    """Canonical -> relative ``stem.*`` / ``res{2..5}.*`` (one copy of each weight, no num_batches_tracked)."""
    if not archs.is_resnet(arch):
        raise ValueError(f"detectron2 targets need a ResNet backbone, not {arch}")
    view = backbone_view(canon)
    conv = Conversion(NAME)
    for key in archs.template(arch):
        if key.endswith("num_batches_tracked"):
            continue
        if key in view:
            conv.put(to_d2(key), canon[view[key]], view[key])
        else:
            conv.missing.append(to_d2(key))
    conv.notes.append(UNINITIALISED_NOTE)
    conv.notes.append("num_batches_tracked not written: detectron2's FrozenBN has no such buffer")
    # deliberately dropped, and said so above: not reported as unexpected
    return mark_unused(conv, [k for k in canon if not k.endswith("num_batches_tracked")])
