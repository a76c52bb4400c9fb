"""PSDiff configuration: ``model`` (:class:`PSDiffModelConfig`), ``train`` (the fine-tuning
schedule of :class:`finetune.config.FinetuneTrainConfig` plus the optimizer choice) and
``eval``; plain YAML in ``finetune/configs/psdiff_<dataset>.yaml``.

Paper values (seed V-A3): AdamW, lr 2.5e-5, weight decay 1e-4, batch 32, 90k iterations with
x0.1 at 70k and 84k, 1333x800 input, N_train = N_test = 300, s1 = 2.0, s2 = 3.0, lambda_reid
5, lambda_cls 2, lambda_L1 5, lambda_GIoU 2, DDIM with 8 steps, cosine schedule, Xavier init.
Everything else below is DiffusionDet's default or our choice (marked in the YAML files).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybridps.finetune import config as ftconfig
from hybridps.finetune.config import FinetuneEvalConfig, FinetuneTrainConfig
from hybridps.finetune.config import validate as validate_finetune
from hybridps.pretrain.config import ConfigError, to_dict

OPTIMIZERS = ("adamw", "sgd")


@dataclass
class PSDiffModelConfig:
    backbone: str = "resnet50"            # resnet50 | resnet18 (torchvision layer1..layer4 stages)
    pretrained: bool | str = False
    norm_layer: str = "frozen_bn"         # DiffusionDet: FrozenBN in the backbone
    freeze_stem: bool = True
    min_size: int = 800                   # paper: 1333x800
    max_size: int = 1333
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    dim: int = 256                        # FPN / CDL width (DiffusionDet)
    dim_dynamic: int = 64                 # DiffusionDet
    heads: int = 8                        # DiffusionDet
    num_stages: int = 6                   # DiffusionDet (the seed gives no number)
    pooler_size: int = 7
    sampling_ratio: int = 2
    dropout: float = 0.0
    prior_prob: float = 0.01
    match_dynamic_k: bool = True          # ours (DiffusionDet's matcher); false = one-to-one (the seed)
    det_reads_collab: bool = True         # ours: detection head reads [e0_hat, F_c]; false = F_o = e0_hat only
    emb_dim: int = 256                    # set from the teacher at training time
    timesteps: int = 1000                 # DiffusionDet
    n_train: int = 300                    # paper
    n_test: int = 300                     # paper
    box_scale: float = 2.0                # paper s1
    emb_scale: float = 3.0                # paper s2
    ddim_steps: int = 8                   # paper default
    ddim_eta: float = 1.0                 # DiffusionDet
    box_renewal: bool = True              # DiffusionDet
    renewal_thresh: float = 0.5           # DiffusionDet
    ensemble: bool = True                 # DiffusionDet: detections of every step, then NMS
    score_thresh: float = 0.05
    nms_thresh: float = 0.5
    detections_per_img: int = 100
    sample_seed: int = 0                  # inference noise: seeded per image content

    def __post_init__(self) -> None:
        if self.norm_layer not in ("bn", "frozen_bn"):
            raise ValueError(f"model.norm_layer must be bn or frozen_bn, got {self.norm_layer!r}")
        if self.pretrained not in (False, "imagenet"):
            raise ValueError(f"model.pretrained must be false or 'imagenet', got {self.pretrained!r}")
        if self.dim % self.heads or self.dim < 2:
            raise ValueError(f"model.dim ({self.dim}) must be a multiple of model.heads ({self.heads})")
        for name in ("num_stages", "n_train", "n_test", "timesteps", "ddim_steps", "emb_dim", "dim_dynamic",
                     "pooler_size", "detections_per_img"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.ddim_steps > self.timesteps:
            raise ValueError(f"model.ddim_steps ({self.ddim_steps}) cannot exceed model.timesteps ({self.timesteps})")
        if not (self.box_scale > 0 and self.emb_scale > 0):
            raise ValueError("model.box_scale and model.emb_scale must be > 0")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}/{self.max_size}")


@dataclass
class PSDiffTrainConfig(FinetuneTrainConfig):
    optimizer: str = "adamw"              # paper: AdamW


@dataclass
class PSDiffConfig:
    method: str = "psdiff"
    model: PSDiffModelConfig = field(default_factory=PSDiffModelConfig)
    train: PSDiffTrainConfig = field(default_factory=PSDiffTrainConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)


def default_config_path(dataset: str) -> Path:
    return ftconfig.default_config_path(dataset, prefix="psdiff_")


def load_config(path: str | Path | None, overrides: list[str] = ()) -> PSDiffConfig:
    return ftconfig.load_config(path, overrides, PSDiffConfig, validate)


def validate(cfg: PSDiffConfig) -> None:
    if cfg.method != "psdiff":
        raise ConfigError(f"method must be psdiff in a PSDiff config, got {cfg.method!r}")
    if cfg.train.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {OPTIMIZERS}, got {cfg.train.optimizer!r}")
    validate_finetune(cfg)


def dump_config(cfg: PSDiffConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def with_model(cfg: PSDiffConfig, **changes) -> PSDiffConfig:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))
