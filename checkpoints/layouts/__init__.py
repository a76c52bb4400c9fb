"""Key layouts: one module each, each a pair ``to_canonical`` / ``from_canonical``.

A layout module defines ``NAME``, ``DESCRIPTION``, ``detect(keys) -> bool``,
``to_canonical(state_dict) -> Conversion`` and
``from_canonical(canonical, arch, **options) -> Conversion``, and ``ORDER``: auto-detection
tries the layouts in this order (the most specific markers first).  Adding a layout is adding
a module here (found by :class:`hybridps.registry.Registry`).
"""
from __future__ import annotations

from types import ModuleType
from typing import Iterable

from hybridps.registry import Registry

from .base import Conversion

LAYOUTS: Registry[ModuleType] = Registry("layout", package=__name__,
                                         requires=("detect", "to_canonical", "from_canonical"))
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
    for module in LAYOUTS.values():
        if module.detect(keyset):
            return module.NAME
    sample = ", ".join(sorted(keyset)[:5])
    raise UnknownLayoutError(f"cannot recognise the key layout (first keys: {sample}); pass the layout explicitly "
                             f"(one of {', '.join(LAYOUTS)})")


__all__ = ["Conversion", "LAYOUTS", "ALIASES", "get_layout", "detect_layout", "UnknownLayoutError"]
