"""Key layouts: one module each, each a pair ``to_canonical`` / ``from_canonical``.

A layout module defines ``NAME``, ``DESCRIPTION``, ``detect(keys) -> bool``,
``to_canonical(state_dict) -> Conversion`` and
``from_canonical(canonical, arch, **options) -> Conversion``.  Adding a layout
is adding a module and one line below.
"""
from __future__ import annotations

from types import ModuleType
from typing import Iterable

from . import canonical, detectron2, mmdet, nae, psvis, roi_alignps, seqnet, torchvision
from .base import Conversion

# Order matters for detection: the most specific markers first.
_ORDER: tuple[ModuleType, ...] = (detectron2, seqnet, nae, roi_alignps, canonical, psvis, torchvision, mmdet)
LAYOUTS: dict[str, ModuleType] = {m.NAME: m for m in _ORDER}
ALIASES = {"timm": "torchvision", "alignps": "mmdet", "psdiff": "detectron2", "d2": "detectron2",
           "canonical": "hybridps", "nae4ps": "nae"}


class UnknownLayoutError(ValueError):
    """Keys that match no known layout, or an unknown layout name."""


def get_layout(name: str) -> ModuleType:
    """The layout module called ``name`` (aliases such as ``timm`` or ``psdiff`` accepted)."""
    key = ALIASES.get(name, name)
    if key not in LAYOUTS:
        raise UnknownLayoutError(f"unknown layout {name!r}; known: {', '.join(sorted(set(LAYOUTS) | set(ALIASES)))}")
    return LAYOUTS[key]


def detect_layout(keys: Iterable[str]) -> str:
    """Name the layout a state_dict's keys are in."""
    keyset = set(keys)
    for module in _ORDER:
        if module.detect(keyset):
            return module.NAME
    sample = ", ".join(sorted(keyset)[:5])
    raise UnknownLayoutError(f"cannot recognise the key layout (first keys: {sample}); pass the layout explicitly "
                             f"(one of {', '.join(LAYOUTS)})")


__all__ = ["Conversion", "LAYOUTS", "ALIASES", "get_layout", "detect_layout", "UnknownLayoutError"]
