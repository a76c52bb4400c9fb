"""Stop a diverging run before it writes anything.

The logged step means leave NaN values out (a monitor can be undefined for a
batch, see ``loop.reduce_means``), so a NaN *loss* would vanish from the
log; these checks count non-finite loss terms per micro-batch instead and
agree across ranks (one all-reduce), so every rank stops at the same step and
no collective is left waiting.
"""
from __future__ import annotations

import math

import torch


def nonfinite_losses(accelerator, window: dict[str, list[float]]) -> list[str]:
    """Names of the loss terms (``loss*``) that were NaN/inf in any
    micro-batch of the window on any rank."""
    names = sorted(n for n in window if n.startswith("loss"))
    counts = torch.tensor([sum(1 for v in window[n] if not math.isfinite(v)) for n in names],
                          dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        counts = accelerator.reduce(counts, reduction="sum")
    return [n for n, c in zip(names, counts.tolist()) if c > 0]


def nonfinite_parameters(model: torch.nn.Module) -> list[str]:
    """Parameters and buffers holding NaN/inf (checked before every save/export)."""
    bad = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
    return bad


def end_distributed(accelerator) -> None:
    """End a run: free the prepared objects while the process group lives, then end it.

    A DDP wrapper whose process group was destroyed first can abort its process when it
    is finally collected ("terminate called without an active exception", SIGABRT at
    interpreter exit), turning a finished run into a failed exit code under a launcher.
    So: sync, drop accelerate's references to models/optimizers/loaders, collect, and
    only then destroy the group.  Callers drop their own references before calling.
    """
    import gc

    accelerator.wait_for_everyone()
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
