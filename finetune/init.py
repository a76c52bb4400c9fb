"""Where fine-tuning starts: INIT resolution and scoped loading.

INIT is one of

* ``none`` -- random initialisation (the model's own init);
* a registry name (``python -m hybridps.checkpoints list``: released PretrainPS,
  torchvision ImageNet, ...) -- fetched and converted by the checkpoints package;
* a pre-training run directory (``model.safetensors`` / ``backbone.safetensors``
  + ``meta.json``, CONTRACTS section 5);
* a weight file in any layout the checkpoints package knows.

Everything is converted to the canonical layout (``checkpoints.convert``,
``to_canonical``) and then loaded with a *scope*:

* ``backbone``: the trunk (``backbone.*``) and the RoI head's last stage
  (``roi_heads.box_head.*``, layer4) only;
* ``full``: also the RPN, the box regressor and the norm-aware embedding head
  -- PretrainPS Fig. 5: pre-training the whole model transfers better.

The OIM LUT/queue are dataset-specific and never loaded.  A per-module
report is printed, and a load that matched less than ``min_fraction`` of the
scope's keys is refused instead of silently training from scratch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from hybridps.checkpoints.convert import Pretrained, load_pretrained
from hybridps.checkpoints.registry import RegistryError, check_normalization
from hybridps.checkpoints.report import DEFAULT_MIN_FRACTION, InsufficientMatchError, Report, compare, module_of

SCOPES: dict[str, tuple[str, ...]] = {
    "backbone": ("backbone.", "roi_heads.box_head."),
    "full": ("backbone.", "roi_heads.box_head.", "rpn.head.", "roi_heads.box_predictor.",
             "roi_heads.embedding_head.", "roi_heads.pam."),
}
# checkpoints' arch names -> ModelConfig.backbone names
ARCH_TO_BACKBONE = {"shufflenetv1": "shufflenet"}


class InitError(ValueError):
    """An INIT that cannot be used, with the reason."""


@dataclass
class InitWeights:
    """Canonical weights plus what they say about the model they fit."""

    source: str
    state_dict: dict[str, torch.Tensor]
    backbone: str
    normalization: dict | None
    style: str | None
    conversion_report: Report


def resolve_init(init: str, offline: bool | None = None) -> InitWeights | None:
    """``none`` -> None; anything else -> canonical weights (raises InitError)."""
    if init is None or str(init).lower() == "none":
        return None
    try:
        pre: Pretrained = load_pretrained(init, offline=offline)
    except InsufficientMatchError as e:
        raise InitError(f"--init {init}: {e}") from None
    except (FileNotFoundError, KeyError, ValueError, RuntimeError) as e:
        raise InitError(f"--init {init}: {e}") from None
    backbone = ARCH_TO_BACKBONE.get(pre.arch, pre.arch)
    return InitWeights(str(init), pre.state_dict, backbone, pre.normalization, pre.style, pre.report)


def model_changes_for_init(weights: "InitWeights", backbone: str, log) -> dict:
    """Model-config changes an INIT implies: its backbone (when it is not ``backbone``) and its
    input normalisation (when it records one)."""
    changes: dict = {}
    if weights.backbone != backbone:
        log(f"note: INIT is a {weights.backbone}; building that instead of {backbone}")
        changes["backbone"] = weights.backbone
    norm = normalization_for_model(weights.normalization)
    if norm is not None:
        changes["image_mean"], changes["image_std"] = norm
    return changes


def normalization_for_model(norm: dict | None) -> tuple[list[float], list[float]] | None:
    """Registry/run normalisation -> ModelConfig image_mean/std (0-1 scale, RGB).
    None when unknown (keep the config's) or when it is BGR (our model reads RGB)."""
    if not norm:
        return None
    try:
        check_normalization(norm, "normalization of the --init weights")
    except RegistryError as e:
        raise InitError(str(e)) from None
    if norm.get("channels", "RGB") != "RGB":
        return None
    mean, std = [float(v) for v in norm["mean"]], [float(v) for v in norm["std"]]
    if max(mean) > 1.5:  # 0-255 statistics
        mean, std = [v / 255.0 for v in mean], [v / 255.0 for v in std]
    return mean, std


def load_scoped(model: torch.nn.Module, weights: InitWeights, scope: str,
                min_fraction: float = DEFAULT_MIN_FRACTION, log: Callable[[str], None] = print,
                scopes: dict[str, tuple[str, ...]] = SCOPES) -> Report:
    """Load the ``scope`` part of ``weights`` into ``model``; print and return the report.

    The report covers the scope's keys only: what loaded, what the source
    lacked (kept at fresh init), what did not fit (shape).  Source keys
    outside the scope are listed as a note, not loaded.
    """
    if scope not in scopes:
        raise InitError(f"--init-scope must be one of {tuple(scopes)}, got {scope!r}")
    prefixes = scopes[scope]
    own = model.state_dict()
    expected = {k: tuple(v.shape) for k, v in own.items() if k.startswith(prefixes)}
    provided = {k: v for k, v in weights.state_dict.items() if k.startswith(prefixes)}
    outside = sorted({module_of(k) for k in weights.state_dict if not k.startswith(prefixes)})
    rep = compare(f"init {weights.source} -> fine-tuning model (scope: {scope})", expected, provided)
    if outside:
        rep.notes.append(f"not loaded (outside scope '{scope}'): {', '.join(outside)}")
    log(rep.text())
    try:
        rep.check(min_fraction)
    except InsufficientMatchError as e:
        raise InitError(str(e)) from None
    usable = {k: v for k, v in provided.items() if k in expected and tuple(v.shape) == expected[k]}
    model.load_state_dict(usable, strict=False)
    return rep
