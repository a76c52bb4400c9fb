"""Run-directory outputs of a pre-training run (CONTRACTS section 5).

``model.safetensors``     the SearchModel state_dict without the OIM tables
                          (``roi_heads.reid_loss.*``: training state, sized by
                          the pre-training identity space, useless downstream)
``backbone.safetensors``  trunk stages + the RoI head's last stage in the
                          backbone's own layout (torchvision/timm ResNet keys
                          with ``layer4.*`` and no ``fc``; psvis keys for shufflenet)
``config.yaml``           the resolved config (num_pids/num_domains filled in)
``meta.json``             backbone, style, normalisation, manifest sha256, steps,
                          world size, final losses, where the loss history is
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from hybridps.checkpoints.writers import save_safetensors
from hybridps.runlog import dumps
from hybridps.pretrain.config import PretrainConfig, dump_config
from hybridps.pretrain.history import HISTORY_NAME

OIM_PREFIX = "roi_heads.reid_loss."


def _plain(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors wants contiguous CPU tensors that share no storage."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


def search_model_state(search_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """SearchModel weights without the OIM lookup table and queue."""
    return {k: v for k, v in search_model.state_dict().items() if not k.startswith(OIM_PREFIX)}


def backbone_state(search_model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Backbone-only weights in the backbone's own key layout."""
    state = dict(search_model.backbone_state_dict())
    if any(k.startswith("fc.") for k in state):
        raise ValueError("backbone export must not contain a classifier (fc.*)")
    return state


def export_run(hybrid: torch.nn.Module, cfg: PretrainConfig, source, out: Path, steps: int,
               final_losses: dict[str, float], world_size: int, distributed_type: str) -> None:
    """Write model/backbone safetensors, the resolved config and meta.json into ``out``."""
    out = Path(out)
    search_model = hybrid.search_model
    # style and input normalisation travel inside the files too (JSON values,
    # as the checkpoints package reads them), so a file copied out of the run
    # directory still says how it must be fed.
    provenance = {"style": "pytorch", "channels": "RGB", "arch": json.dumps(cfg.model.backbone),
                  "mean": json.dumps(list(cfg.model.image_mean)), "std": json.dumps(list(cfg.model.image_std)),
                  # the RPN's anchors: checkpoints refuses to hand it to a client that generates others
                  "anchor_sizes": json.dumps(list(cfg.model.anchor_sizes)),
                  "aspect_ratios": json.dumps(list(cfg.model.aspect_ratios))}
    # each file appears whole or not at all (a kill mid-export leaves no half-written
    # weights for finetune to pick up); meta.json, written last, marks a finished export
    _atomic(out / "model.safetensors", lambda p: save_safetensors(
        _plain(search_model_state(search_model)), p, {"format": "pt", "layout": "hybridps-nae", **provenance}))
    _atomic(out / "backbone.safetensors", lambda p: save_safetensors(
        _plain(backbone_state(search_model)), p, {"format": "pt", "backbone": cfg.model.backbone, **provenance}))
    _atomic(out / "config.yaml", lambda p: dump_config(cfg, p))
    meta = {
        "backbone": cfg.model.backbone,
        "style": "pytorch",
        "mean": list(cfg.model.image_mean),
        "std": list(cfg.model.image_std),
        "input": "RGB float in [0, 1], normalised by mean/std inside the model",
        "manifest_sha256": source.manifest_sha256,
        "num_ids": source.num_ids,
        "domains": source.domains,
        "steps": steps,
        "world_size": world_size,
        "distributed_type": distributed_type,
        "final_losses": final_losses,
        "loss_history": HISTORY_NAME,
    }
    _atomic(out / "meta.json", lambda p: p.write_text(dumps(meta, indent=1)))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
