"""Configuration of the search model: plain fields that map one-to-one onto YAML."""
from __future__ import annotations

from dataclasses import dataclass, field

NORM_LAYERS = ("bn", "frozen_bn", "syncbn")
LUT_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelConfig:
    """NAE person-search model; defaults are the NAE4PS values (docs/protocol.md section 8).

    ``norm_layer``: "bn" (plain BatchNorm in train mode, as NAE), "frozen_bn" (BatchNorm that
    always uses its running statistics and has frozen affine parameters; keys unchanged) or
    "syncbn" (built as plain BN; the trainer converts it with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` when running on several processes).
    """

    backbone: str = "resnet50"            # resnet50 | resnet18 | shufflenet | timm:<name>
    pretrained: bool | str = False        # False | "imagenet"
    norm_layer: str = "bn"
    freeze_stem: bool = True              # conv1 / bn1 affine frozen like NAE
    # transform
    min_size: int = 900
    max_size: int = 1500
    image_mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    image_std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # RPN
    anchor_sizes: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_size: int = 256
    rpn_pos_fraction: float = 0.5
    rpn_pre_nms_train: int = 12000
    rpn_pre_nms_test: int = 6000
    rpn_post_nms_train: int = 2000
    rpn_post_nms_test: int = 300
    rpn_nms_thresh: float = 0.7
    # RoI heads
    roi_fg_iou: float = 0.5
    roi_bg_iou: float = 0.1               # IoU in [bg, fg) is ignored (NAE4PS), < bg is background
    roi_batch_size: int = 128
    roi_pos_fraction: float = 0.5
    roi_output_size: int = 14
    roi_sampling_ratio: int = 2
    ignore_ioa: float = 0.5               # non-fg anchor/proposal inside an ignore region -> ignored
    box_coder_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    box_loss_beta: float = 1.0            # smooth-L1 beta of the box head (NAE/SeqNet: 1.0; torchvision: 1/9)
    # re-ID
    emb_dim: int = 256
    num_pids: int = 5532
    cq_size: int = 5000
    oim_momentum: float = 0.5
    oim_scalar: float = 30.0
    lut_dtype: str = "float32"
    oim_sample: int = 0                   # > 0: score the batch's ids + random LUT rows, this many in all
    # UGAS (pretrain/model/ugas.py, pretrain/losses/ugas.py); all off = plain NAE
    ugas_sfm: bool = False                # Shallow Fusion Module: re-ID vector = [deep; shallow]/sqrt2
    ugas_sfm_dim: int = 128               # shallow vector size (poster silent); embedding emb_dim + this
    ugas_sfm_channels: int = 256          # width of the fused shallow maps (poster silent)
    ugas_distill: bool = False            # deep -> shallow self-distillation (needs ugas_sfm)
    ugas_distill_temp: float = 1.0        # KL temperature on the 30x-scaled OIM logits (poster silent)
    ugas_uncertainty: bool = False        # Uncertainty Guidance: per-RoI variance weights the re-ID loss
    # IIDFC (pretrain/model/iidfc.py, pretrain/losses/fc.py)
    iidfc_fc: bool = False                # Feature Compactness loss replaces OIM's cross entropy
    iidfc_m1: float = 0.9                 # FC penalty factor on the target angle (paper: 0.9)
    iidfc_m2: float = 0.1                 # FC additive angular margin (paper: 0.1); tau = 1/oim_scalar
    iidfc_pam: bool = False               # Pedestrian Attention Module on the res5 RoI maps
    iidfc_pam_channels: int = 8           # output channels of PAM's shared 3x3 conv (paper silent)
    # inference
    score_thresh: float = 0.5
    nms_thresh: float = 0.4
    detections_per_img: int = 300

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field; called on construction."""
        if self.pretrained not in (False, "imagenet"):
            raise ValueError(f"model.pretrained must be false or 'imagenet', got {self.pretrained!r}")
        if self.norm_layer not in NORM_LAYERS:
            raise ValueError(f"model.norm_layer must be one of {NORM_LAYERS}, got {self.norm_layer!r}")
        if self.lut_dtype not in LUT_DTYPES:
            raise ValueError(f"model.lut_dtype must be one of {LUT_DTYPES}, got {self.lut_dtype!r}")
        if self.emb_dim % 2:
            raise ValueError(f"model.emb_dim must be even (split between res4 and res5), got {self.emb_dim}")
        if self.oim_sample < 0:
            raise ValueError(f"model.oim_sample must be >= 0 (0 = the full OIM), got {self.oim_sample}")
        if self.num_pids < 1 or self.cq_size < 0:
            raise ValueError(f"model.num_pids must be >= 1 and cq_size >= 0, got {self.num_pids}/{self.cq_size}")
        if not self.anchor_sizes or not self.aspect_ratios:
            raise ValueError("model.anchor_sizes and model.aspect_ratios must be non-empty")
        if not 0.0 <= self.roi_bg_iou <= self.roi_fg_iou <= 1.0:
            raise ValueError(f"need 0 <= roi_bg_iou <= roi_fg_iou <= 1, got {self.roi_bg_iou}/{self.roi_fg_iou}")
        if not 0.0 <= self.rpn_bg_iou <= self.rpn_fg_iou <= 1.0:
            raise ValueError(f"need 0 <= rpn_bg_iou <= rpn_fg_iou <= 1, got {self.rpn_bg_iou}/{self.rpn_fg_iou}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or len(self.box_coder_weights) != 4:
            raise ValueError("model.image_mean/image_std take 3 values, model.box_coder_weights 4")
        if not self.box_loss_beta > 0:
            raise ValueError(f"model.box_loss_beta must be > 0, got {self.box_loss_beta}")
        if self.ugas_distill and not self.ugas_sfm:
            raise ValueError("model.ugas_distill needs model.ugas_sfm (it distils deep -> shallow)")
        if self.ugas_sfm_dim < 1 or self.ugas_sfm_channels < 1 or self.iidfc_pam_channels < 1:
            raise ValueError("model.ugas_sfm_dim, ugas_sfm_channels and iidfc_pam_channels must be >= 1")
        if not self.ugas_distill_temp > 0 or not self.iidfc_m1 > 0:
            raise ValueError("model.ugas_distill_temp and model.iidfc_m1 must be > 0")
        if self.min_size < 1 or self.max_size < self.min_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {self.min_size}/{self.max_size}")


def tiny_config(**overrides) -> ModelConfig:
    """A CPU-sized ModelConfig for tests and smoke runs (~128x96 images, few RoIs)."""
    base = dict(backbone="resnet18", min_size=96, max_size=128, anchor_sizes=[16, 32, 64],
                rpn_pre_nms_train=300, rpn_post_nms_train=64, rpn_pre_nms_test=300,
                rpn_post_nms_test=32, rpn_batch_size=64, roi_batch_size=8, roi_output_size=7,
                num_pids=16, cq_size=8, score_thresh=0.0)
    base.update(overrides)
    return ModelConfig(**base)
