"""The NAE person-search model, composed torchvision-style: transform, backbone, rpn, roi_heads."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from hybridps.pretrain.model.backbones import BackboneParts, build_backbone
from hybridps.pretrain.model.config import ModelConfig
from hybridps.pretrain.model.roi_heads import FEATURE, NAERoIHeads
from hybridps.pretrain.model.rpn import build_rpn
from hybridps.pretrain.model.ugas import SHALLOW, StageTap, probe_channels, shallow_stage

Target = dict[str, torch.Tensor]


def _check_inputs(images: list[torch.Tensor], targets: list[Target] | None) -> None:
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of CHW float tensors")
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != 3 or not img.is_floating_point():
            raise ValueError(f"images[{i}] must be a float CHW tensor with 3 channels, got "
                             f"{tuple(img.shape)} {img.dtype}")
    if targets is None:
        return
    if len(targets) != len(images):
        raise ValueError(f"got {len(images)} images but {len(targets)} targets")
    for i, t in enumerate(targets):
        boxes, pids = t.get("boxes"), t.get("pids")
        if boxes is None or pids is None:
            raise ValueError(f"targets[{i}] needs 'boxes' and 'pids'")
        if boxes.dim() != 2 or boxes.shape[1] != 4 or pids.shape != (boxes.shape[0],):
            raise ValueError(f"targets[{i}]: boxes must be [n,4] and pids [n], got "
                             f"{tuple(boxes.shape)} / {tuple(pids.shape)}")
        if boxes.numel() and bool((boxes[:, 2:] <= boxes[:, :2]).any()):
            raise ValueError(f"targets[{i}] has a box with non-positive width or height")
        ignore = t.get("ignore")
        if ignore is not None and (ignore.dim() != 2 or ignore.shape[1] != 4) and ignore.numel():
            raise ValueError(f"targets[{i}]['ignore'] must be [m,4], got {tuple(ignore.shape)}")


def _scale_boxes(boxes: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    ry, rx = new[0] / old[0], new[1] / old[1]
    return boxes * boxes.new_tensor([rx, ry, rx, ry])


class SearchModel(nn.Module):
    """NAE person search (CONTRACTS section 4).

    train: ``model(images, targets)`` -> dict of losses (``return_features=True`` also gives the
    features the hybrid objective needs); eval: ``model(images)`` -> list of
    {"boxes", "scores", "embeddings"} in original pixels, embeddings unit-norm.
    """

    def __init__(self, cfg: ModelConfig, parts: BackboneParts) -> None:
        super().__init__()
        self.cfg = cfg
        self.transform = GeneralizedRCNNTransform(cfg.min_size, cfg.max_size, list(cfg.image_mean),
                                                  list(cfg.image_std))
        self.backbone = parts.body
        self.rpn = build_rpn(cfg, parts.c4_channels)
        self._tap, c3 = None, None
        if cfg.ugas_sfm:   # UGAS SFM reads the stage before C4 (stride 8) through a forward hook
            _, stage = shallow_stage(parts.body)
            c3 = probe_channels(parts.body, stage)
            self._tap = StageTap(stage)
        self.roi_heads = NAERoIHeads(cfg, parts.head, parts.c4_channels, parts.c5_channels, c3)
        self.c4_channels, self.c5_channels = parts.c4_channels, parts.c5_channels
        if cfg.freeze_stem:
            for module in parts.stem:
                for p in module.parameters():
                    p.requires_grad_(False)
        if cfg.norm_layer == "frozen_bn":
            for module in list(self.backbone.modules()) + list(self.roi_heads.box_head.modules()):
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)
                    module._hybridps_frozen = True

    def train(self, mode: bool = True) -> "SearchModel":
        """Like nn.Module.train, but frozen BatchNorms keep using their running statistics."""
        super().train(mode)
        for module in self.modules():
            if getattr(module, "_hybridps_frozen", False):
                module.train(False)
        return self

    def _prepare(self, images, targets):
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, new_targets = self.transform(list(images), _copy_targets(targets))
        if new_targets is not None:
            for t, old, new in zip(new_targets, original_sizes, image_list.image_sizes):
                if t.get("ignore") is not None and t["ignore"].numel():
                    t["ignore"] = _scale_boxes(t["ignore"].to(image_list.tensors), old, new)
        return image_list, new_targets, original_sizes

    def forward(self, images: list[torch.Tensor], targets: list[Target] | None = None,
                return_features: bool = False, defer_reid: bool = False):
        _check_inputs(images, targets if self.training else None)
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        image_list, targets, original_sizes = self._prepare(images, targets if self.training else None)
        c4 = self.backbone(image_list.tensors)
        features = OrderedDict([(FEATURE, c4)])
        proposals, rpn_losses = self.rpn(image_list, features, targets)
        features = self._with_shallow(features)
        if not self.training:
            detections = self.roi_heads(features, proposals, image_list.image_sizes)
            return self.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        roi_losses, feats = self.roi_heads(features, proposals, image_list.image_sizes, targets,
                                           return_features=return_features, defer_reid=defer_reid)
        losses = {"loss_rpn_cls": rpn_losses["loss_objectness"], "loss_rpn_reg": rpn_losses["loss_rpn_box_reg"],
                  **roi_losses}
        if not return_features:
            return losses
        feats["img_feat"] = c4
        feats["image_sizes"] = list(image_list.image_sizes)      # content (h, w) of each padded image
        feats["padded_size"] = tuple(image_list.tensors.shape[-2:])
        return losses, feats

    def extract_query(self, images: list[torch.Tensor], boxes_list: list[torch.Tensor]) -> list[torch.Tensor]:
        """Unit-norm embeddings [n,emb_dim] of the given boxes (original pixels); call in eval mode."""
        _check_inputs(images, None)
        if len(boxes_list) != len(images):
            raise ValueError(f"got {len(images)} images but {len(boxes_list)} box lists")
        original_sizes = [tuple(img.shape[-2:]) for img in images]
        image_list, _ = self.transform(list(images))
        boxes = [_scale_boxes(b.to(image_list.tensors).reshape(-1, 4), old, new)
                 for b, old, new in zip(boxes_list, original_sizes, image_list.image_sizes)]
        features = self._with_shallow(OrderedDict([(FEATURE, self.backbone(image_list.tensors))]))
        return self.roi_heads.embed_boxes(features, boxes, image_list.image_sizes)

    def _with_shallow(self, features: OrderedDict) -> OrderedDict:
        """Add the SFM's stride-8 map (RoI heads only: the RPN sees C4 alone)."""
        if self._tap is None:
            return features
        out = OrderedDict(features)
        out[SHALLOW] = self._tap.take()
        return out

    def backbone_state_dict(self) -> dict[str, torch.Tensor]:
        """Trunk + RoI head in the backbone's own layout (torchvision ResNet keys without fc,
        psvis ShuffleNetV1 keys, or timm names)."""
        state = {k: v for k, v in self.backbone.state_dict().items()}
        state.update(self.roi_heads.box_head.state_dict())
        return state


def _copy_targets(targets: list[Target] | None) -> list[Target] | None:
    # The transform rescales boxes in place on its own copies; ours must not leak back out.
    return None if targets is None else [dict(t) for t in targets]


def build_search_model(cfg: ModelConfig) -> SearchModel:
    """Build the NAE search model described by ``cfg``."""
    return SearchModel(cfg, build_backbone(cfg.backbone, cfg.pretrained))
