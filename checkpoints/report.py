"""What a conversion or a load actually moved: loaded / missing / unexpected keys per module.

Non-strict loaders (mmcv, SeqNet, detectron2) accept a file that matches
nothing and only log a warning; every path in this package therefore builds a
:class:`Report` and calls :meth:`Report.check`, which raises when nothing, or
too small a fraction, of the weights found a home.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

DEFAULT_MIN_FRACTION = 0.5
# Modules whose contents are never transferred (dataset-specific), so they do
# not count when judging how much of a target was matched.
FRESH_MODULES = ("reid_loss",)


class InsufficientMatchError(RuntimeError):
    """Nothing, or too little, of the source matched the target."""


_MODULE_RULES: tuple[tuple[str, str], ...] = (
    (r"(^|\.)(reid_loss|loss_oim)\.|lookup_table|matching_layer", "reid_loss"),
    (r"(^|\.)embedding_head\.", "embedding_head"),
    (r"faster_rcnn_predictor\.", "faster_rcnn_predictor"),
    (r"box_predictor\.|bbox_head\.fc_(reg|cls)\.", "box_predictor"),
    (r"(^|\.)reid_head\.", "reid_head"),
    (r"^rpn\.|^rpn_head\.|proposal_generator\.", "rpn"),
    (r"roi_heads?\.(box_head|shared_head|res5)\.", "box_head"),
    (r"^fc\.|\.fc\.", "fc"),
    (r"^backbone\.(bottom_up\.)?(stem|res[2-5]|conv1|bn1|layer[1-4]|layers)\.", "backbone"),
    (r"^backbone\.fpn|^neck\.", "neck"),
    (r"^(stem|res[2-5]|conv1|bn1|layer[1-4]|layers)\.", "backbone"),
    (r"^head\.|^bbox_head\.", "other_heads"),
)


def module_of(key: str) -> str:
    """Name the model part a key belongs to, in any of the layouts we know."""
    for pattern, name in _MODULE_RULES:
        if re.search(pattern, key):
            return name
    return key.split(".")[0] or "other"


@dataclass
class ModuleCounts:
    """Keys of one module, by what happened to them."""

    loaded: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)   # absent in the source, filled fresh
    missing: list[str] = field(default_factory=list)       # absent in the source, not written
    unexpected: list[str] = field(default_factory=list)    # in the source, not carried over
    mismatched: list[str] = field(default_factory=list)    # name matched, shape did not


@dataclass
class Report:
    """Per-module account of a conversion or a load."""

    title: str
    modules: dict[str, ModuleCounts] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def _mod(self, key: str, module: str | None = None) -> ModuleCounts:
        return self.modules.setdefault(module or module_of(key), ModuleCounts())

    def add(self, kind: str, key: str, module: str | None = None) -> None:
        getattr(self._mod(key, module), kind).append(key)

    def total(self, kind: str, skip_fresh: bool = False) -> int:
        return sum(len(getattr(c, kind)) for m, c in self.modules.items()
                   if not (skip_fresh and m in FRESH_MODULES))

    @property
    def matched_fraction(self) -> float:
        """Loaded keys over all keys the target holds or wants (dataset-specific buffers aside)."""
        loaded = self.total("loaded", True)
        wanted = loaded + sum(self.total(k, True) for k in ("initialised", "missing", "mismatched"))
        return loaded / wanted if wanted else 0.0

    def check(self, min_fraction: float = DEFAULT_MIN_FRACTION) -> "Report":
        """Raise :class:`InsufficientMatchError` when nothing or too little matched."""
        loaded = self.total("loaded", True)
        if loaded == 0:
            raise InsufficientMatchError(
                f"{self.title}: 0 keys matched -- refusing a silent no-op load.\n{self.text()}")
        if self.matched_fraction < min_fraction:
            raise InsufficientMatchError(
                f"{self.title}: only {self.matched_fraction:.1%} of the target's keys were matched "
                f"(threshold {min_fraction:.0%}; change it with --min-fraction).\n{self.text()}")
        return self

    def as_dict(self) -> dict:
        """JSON-ready form (full key lists)."""
        return {"title": self.title, "matched_fraction": round(self.matched_fraction, 4),
                "notes": list(self.notes),
                "modules": {m: {k: list(v) for k, v in vars(c).items()} for m, c in self.modules.items()}}

    def text(self, show: int = 3) -> str:
        """Human table: counts per module, a few example keys for anything not loaded."""
        lines = [f"{self.title}",
                 f"  {'module':<22}{'loaded':>8}{'initialised':>13}{'missing':>9}{'unexpected':>12}{'shape!=':>9}"]
        for name in sorted(self.modules):
            c = self.modules[name]
            lines.append(f"  {name:<22}{len(c.loaded):>8}{len(c.initialised):>13}{len(c.missing):>9}"
                         f"{len(c.unexpected):>12}{len(c.mismatched):>9}")
        for name in sorted(self.modules):
            c = self.modules[name]
            for kind in ("initialised", "missing", "unexpected", "mismatched"):
                keys = getattr(c, kind)
                if keys:
                    more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
                    lines.append(f"    {name} {kind}: {', '.join(keys[:show])}{more}")
        lines.append(f"  matched {self.matched_fraction:.1%} of the target's keys")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


def compare(title: str, expected: Mapping[str, tuple[int, ...]], provided: Mapping[str, torch.Tensor],
            module: Callable[[str], str] = module_of) -> Report:
    """Report how ``provided`` tensors fit a set of ``expected`` key shapes."""
    rep = Report(title)
    for key, shape in expected.items():
        if key not in provided:
            rep.add("missing", key, module(key))
        elif tuple(provided[key].shape) != tuple(shape):
            rep.add("mismatched", key, module(key))
        else:
            rep.add("loaded", key, module(key))
    for key in provided:
        if key not in expected:
            rep.add("unexpected", key, module(key))
    return rep


def load_into(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
              min_fraction: float = DEFAULT_MIN_FRACTION, title: str | None = None) -> Report:
    """Load what fits into ``model`` (non-strict, shape-checked) and return the checked report.

    Shape-mismatched entries are left at the model's own values instead of
    raising inside torch, and the call raises if too little matched.
    """
    own = model.state_dict()
    rep = compare(title or f"load into {type(model).__name__}",
                  {k: tuple(v.shape) for k, v in own.items()}, state_dict)
    rep.check(min_fraction)
    usable = {k: v for k, v in state_dict.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    model.load_state_dict(usable, strict=False)
    return rep


def group_counts(keys: list[str]) -> dict[str, int]:
    """How many keys each module holds (for ``inspect``)."""
    counts: dict[str, int] = defaultdict(int)
    for k in keys:
        counts[module_of(k)] += 1
    return dict(counts)
