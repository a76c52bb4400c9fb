"""Region proposal network: torchvision's RPN with NAE settings and ignore regions."""
from __future__ import annotations

import torch
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from hybridps.pretrain.model.box_ops import inside_ignore
from hybridps.pretrain.model.config import ModelConfig


class IgnoreAwareRPN(RegionProposalNetwork):
    """torchvision RPN whose background anchors inside an ignore region are dropped from the loss.

    Targets may carry ``"ignore"`` (FloatTensor[m,4], xyxy, same scale as ``"boxes"``); anchors
    labelled background whose IoA with a region exceeds ``ignore_ioa`` get label -1.
    """

    def __init__(self, *args, ignore_ioa: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ignore_ioa = ignore_ioa

    def assign_targets_to_anchors(self, anchors: list[torch.Tensor], targets: list[dict[str, torch.Tensor]]
                                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        labels, matched = super().assign_targets_to_anchors(anchors, targets)
        for anchors_i, labels_i, target in zip(anchors, labels, targets):
            ignored = inside_ignore(anchors_i, target.get("ignore"), self.ignore_ioa)
            labels_i[ignored & (labels_i == 0)] = -1.0
        return labels, matched


def build_rpn(cfg: ModelConfig, in_channels: int) -> IgnoreAwareRPN:
    """RPN on the single C4 map (one feature level)."""
    anchors = AnchorGenerator(sizes=(tuple(int(s) for s in cfg.anchor_sizes),),
                              aspect_ratios=(tuple(float(r) for r in cfg.aspect_ratios),))
    head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
    return IgnoreAwareRPN(
        anchors, head,
        fg_iou_thresh=cfg.rpn_fg_iou, bg_iou_thresh=cfg.rpn_bg_iou,
        batch_size_per_image=cfg.rpn_batch_size, positive_fraction=cfg.rpn_pos_fraction,
        pre_nms_top_n={"training": cfg.rpn_pre_nms_train, "testing": cfg.rpn_pre_nms_test},
        post_nms_top_n={"training": cfg.rpn_post_nms_train, "testing": cfg.rpn_post_nms_test},
        nms_thresh=cfg.rpn_nms_thresh, ignore_ioa=cfg.ignore_ioa)

