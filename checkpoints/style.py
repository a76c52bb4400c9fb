"""caffe vs pytorch ResNet style: invisible in the keys, so it is checked from metadata.

Both styles have identical keys and shapes, so loading one into the other
never raises -- it silently computes different features.  Stride placement
cannot be fixed by editing weights; only the target's config can.
"""
from __future__ import annotations

from dataclasses import dataclass

TORCHVISION_MEAN = (123.675, 116.28, 103.53)     # RGB, 0-255 units (= 0.485, 0.456, 0.406)
TORCHVISION_STD = (58.395, 57.12, 57.375)        # (= 0.229, 0.224, 0.225)
CAFFE_MEAN = (103.53, 116.28, 123.675)           # BGR
CAFFE_STD = (1.0, 1.0, 1.0)


@dataclass(frozen=True)
class Style:
    name: str
    stride: str
    channels: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


STYLES = {
    "pytorch": Style("pytorch", "stride 2 in the 3x3 conv2 of the first block of layer2-4 "
                     "(detectron2 STRIDE_IN_1X1=False)", "RGB", TORCHVISION_MEAN, TORCHVISION_STD),
    "caffe": Style("caffe", "stride 2 in the 1x1 conv1 of the first block of layer2-4 "
                   "(detectron2 STRIDE_IN_1X1=True)", "BGR", CAFFE_MEAN, CAFFE_STD),
}


class StyleMismatchError(ValueError):
    """Weights trained in one ResNet style headed for a target configured for the other."""


def check_style(source: str | None, target_style: str | None, target_name: str, how_to_fix: str,
                force: bool = False) -> list[str]:
    """Raise on a known mismatch unless ``force``; return notes for the report."""
    if source is None:
        return [f"the source's ResNet style is unknown, so it could not be checked against {target_name} "
                "(declare it with --source-style pytorch|caffe)"]
    if source not in STYLES:
        raise ValueError(f"unknown style {source!r}; use pytorch or caffe")
    if target_style is None or target_style == source:
        return []
    src, dst = STYLES[source], STYLES[target_style]
    message = (
        f"style mismatch: the weights are {src.name}-style ({src.stride}; trained on {src.channels} input, "
        f"mean {list(src.mean)}, std {list(src.std)}) but {target_name}'s configs are {dst.name}-style "
        f"({dst.stride}; {dst.channels}, mean {list(dst.mean)}, std {list(dst.std)}). The shapes are identical, "
        "so the target would load the file without complaint and compute wrong features; the stride "
        "placement cannot be converted by changing weights. Change the target config instead:\n"
        f"    {how_to_fix}\n"
        "then re-run with --force to acknowledge.")
    if not force:
        raise StyleMismatchError(message)
    return ["--force: " + message.replace("\n", " ")]
