"""The optimizer and learning-rate schedule pieces shared by pre-training and fine-tuning:
parameter groups with the weight-decay exemptions, NAE-style SGD, linear warm-up, step decay."""
from __future__ import annotations

import torch
from torch import nn

NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def param_groups(model: nn.Module, weight_decay: float, decay_bias: bool = False,
                 decay_norm: bool = False) -> list[dict]:
    """Trainable parameters split into a decayed and a non-decayed group.

    Biases and the affine parameters of normalisation layers get no weight decay unless asked
    for: decaying a BatchNorm scale shrinks the features it normalises towards zero without
    any regularising effect (the usual practice of torchvision's reference scripts and timm).
    Each parameter is counted once, even when shared between modules.
    """
    norm_params = {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        exempt = (name.endswith(".bias") and not decay_bias) or (id(p) in norm_params and not decay_norm)
        (no_decay if exempt else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float, decay_bias: bool = False,
        decay_norm: bool = False) -> torch.optim.SGD:
    """SGD with momentum over :func:`param_groups` (NAE4PS / SeqNet's optimizer)."""
    return torch.optim.SGD(param_groups(model, weight_decay, decay_bias, decay_norm), lr=lr, momentum=momentum)


def linear_warmup(step: int, steps: int, start: float) -> float:
    """Multiplier rising linearly from ``start`` at step 0 to 1 at ``steps``, then 1
    (torchvision's and NAE4PS's warm-up)."""
    if step >= steps:
        return 1.0
    alpha = step / max(1, steps)
    return start * (1 - alpha) + alpha


def step_decay(position: float, milestones, gamma: float) -> float:
    """``gamma`` to the number of milestones reached by ``position`` (a step or an epoch)."""
    return gamma ** sum(position >= m for m in milestones)
