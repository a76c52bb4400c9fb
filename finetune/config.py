"""Fine-tuning configuration: plain YAML mapped one-to-one onto dataclasses.

``FinetuneConfig`` = ``model`` (:class:`pretrain.model.config.ModelConfig`, the
same model class as pre-training) + ``train`` (the NAE schedule) + ``eval``
(the evaluation protocol settings).  Per-dataset files live in
``finetune/configs/<dataset>.yaml``; ``tiny.yaml`` is the CPU test/demo size.
Command-line ``key=value`` overrides (dotted paths, YAML values) come last.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybridps.pretrain.config import ConfigError, apply_override, from_dict, load_yaml_with_includes, to_dict
from hybridps.pretrain.model.config import ModelConfig

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DATASETS = ("cuhk_sysu", "prw", "posetrack21")


@dataclass
class FinetuneTrainConfig:
    """NAE schedule (docs/protocol.md section 10): SGD, warm-up over the first
    epoch, step decay at epoch 16, batch 5, flip, grad clip 10."""

    epochs: int = 20
    max_steps: int | None = None          # cap on optimizer steps (tests, demos)
    batch_size: int = 5
    lr: float = 0.003
    momentum: float = 0.9
    weight_decay: float = 5e-4
    decay_bias: bool = False              # NAE4PS: no weight decay on biases
    warmup_factor: float = 0.001          # linear warm-up from lr*factor over the first epoch
    warmup_iters: int | None = None       # None: iterations of one epoch - 1 (NAE4PS/SeqNet)
    milestones: list[int] = field(default_factory=lambda: [16])   # in epochs
    gamma: float = 0.1
    grad_clip: float = 10.0               # max grad norm; 0 disables
    flip_prob: float = 0.5
    # NAE4PS README: --w_RCNN_loss_bbox 10; every other loss weighs 1
    loss_weights: dict[str, float] = field(default_factory=lambda: {"loss_box_reg": 10.0})
    train_fraction: float = 1.0
    num_workers: int = 2
    seed: int = 0
    mixed_precision: str = "no"           # "no" | "fp16" | "bf16"
    log_every: int = 20                   # tracker period (history.jsonl gets every step)
    log_with: str | None = None           # "tensorboard": event files under RUN/finetune/ (as pre-training)
    save_every: int = 0                   # checkpoint period in steps; 0 = only at the end
    total_limit: int = 2                  # checkpoints kept
    eval_every: int = 0                   # evaluate every N steps (monitoring; the result is the last model)
    progress: bool = True                 # progress bar on a terminal (plain lines otherwise)


@dataclass
class FinetuneEvalConfig:
    det_thresh: float = 0.5
    gallery_size: int = 100               # CUHK-SYSU only: 50..4000 or -1 (full)
    cbgm: bool = False
    cross_camera: bool = False            # PRW multi-view variant
    iou_rule: str = "standard"            # "standard" (small-box relaxed) | "fixed" (IoU 0.5)
    batch_size: int = 2                   # images per inference forward
    visualize: int = 4                    # queries drawn in topk.png (0: none)


@dataclass
class FinetuneConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)


def default_config_path(dataset: str, prefix: str = "") -> Path:
    """finetune/configs/<prefix><dataset>.yaml (prefix: a method's, e.g. ``psdiff_``)."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    return CONFIG_DIR / f"{prefix}{dataset}.yaml"


def load_config(path: str | Path | None, overrides: list[str] = (), schema: type = FinetuneConfig,
                check=None):
    """YAML (with ``include:``) + dotted overrides -> validated ``schema`` config (a
    method's own dataclass and ``check`` for PSDiff).  Unknown keys are an error naming
    the closest known key (``from_dict``)."""
    data = load_yaml_with_includes(path) if path else {}
    for ov in overrides:
        data = apply_override(data, ov, schema)
    try:
        cfg = from_dict(schema, data)
    except (TypeError, ValueError) as e:
        raise ConfigError(str(e)) from None
    (check or validate)(cfg)
    return cfg


def validate(cfg: FinetuneConfig) -> None:
    t, e = cfg.train, cfg.eval
    if not 0.0 < t.train_fraction <= 1.0:
        raise ConfigError(f"train.train_fraction must be in (0, 1], got {t.train_fraction}")
    if t.batch_size < 1 or t.epochs < 1 or (t.max_steps is not None and t.max_steps < 1):
        raise ConfigError("train.batch_size, train.epochs and train.max_steps must be >= 1")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision must be no|fp16|bf16, got {t.mixed_precision!r}")
    if e.iou_rule not in ("standard", "fixed"):
        raise ConfigError(f"eval.iou_rule must be standard|fixed, got {e.iou_rule!r}")
    if t.log_with not in (None, "tensorboard"):
        raise ConfigError(f"train.log_with must be null or 'tensorboard', got {t.log_with!r}")
    for name in ("save_every", "total_limit", "eval_every"):
        if not isinstance(getattr(t, name), int) or getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be an integer >= 0, got {getattr(t, name)!r}")
    if t.log_every < 1:
        raise ConfigError(f"train.log_every must be >= 1, got {t.log_every}")
    if e.gallery_size not in (-1, 50, 100, 500, 1000, 2000, 4000):
        raise ConfigError(f"eval.gallery_size must be one of -1, 50, 100, 500, 1000, 2000, 4000, got {e.gallery_size}")


def dump_config(cfg: FinetuneConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


def with_model(cfg: FinetuneConfig, **changes) -> FinetuneConfig:
    """A copy with model fields replaced (ModelConfig re-validates itself)."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **changes))
