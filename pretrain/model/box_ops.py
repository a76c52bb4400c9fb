"""Box helpers shared by the RPN and the RoI heads."""
from __future__ import annotations

import torch


def box_ioa(boxes: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """Intersection over the area of each box: [N,4] x [M,4] -> [N,M] (xyxy).

    IoA rather than IoU because an ignore region (a crowd, a mirror) is usually much larger
    than the anchors and proposals that fall inside it.
    """
    lt = torch.maximum(boxes[:, None, :2], regions[None, :, :2])
    rb = torch.minimum(boxes[:, None, 2:], regions[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=2)
    area = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(dim=1)
    return inter / area.clamp(min=1e-6)[:, None]


def inside_ignore(boxes: torch.Tensor, regions: torch.Tensor | None, thresh: float) -> torch.Tensor:
    """Bool[N]: the box lies more than ``thresh`` (IoA) inside any ignore region."""
    if regions is None or regions.numel() == 0 or boxes.numel() == 0:
        return torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
    return box_ioa(boxes, regions.to(boxes)).amax(dim=1) > thresh
