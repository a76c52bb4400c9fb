"""Backbones by name: each is split into a trunk (image -> C4 map) and a RoI head (C4 RoI -> C5).

NAE's C4 layout: the trunk ends at stride 16 and the last stage runs on the 14x14 RoI-aligned
maps.  Builders are registered by name; ``timm:<name>`` covers any sequential-stage timm CNN.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from hybridps.pretrain.model.shufflenet_v1 import ShuffleNetV1
from hybridps.registry import Registry


@dataclass
class BackboneParts:
    """What the search model needs from a backbone."""

    body: nn.Module          # images [B,3,H,W] -> C4 map [B,c4,H/16,W/16]
    head: nn.Module          # RoI maps [R,c4,s,s] -> C5 maps [R,c5,s/2,s/2]
    c4_channels: int
    c5_channels: int
    stem: list[nn.Module] = field(default_factory=list)   # frozen when freeze_stem is on


Builder = Callable[[bool | str], BackboneParts]
#: backbone builders by name; a builder in any module registers itself with ``@register("name")``
BACKBONES: Registry[Builder] = Registry("backbone")
register = BACKBONES.register


def build_backbone(name: str, pretrained: bool | str = False) -> BackboneParts:
    """Build the backbone called ``name`` (a registry key or ``timm:<model>``)."""
    if name.startswith("timm:"):
        return timm_backbone(name[len("timm:"):], pretrained)
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(BACKBONES)} or 'timm:<model name>'")
    return BACKBONES[name](pretrained)


class PathSequential(nn.Module):
    """Runs modules in order while keeping their original dotted names in the state_dict.

    Lets a split network keep the key names of the full network (``layers.2.*``, ``blocks.5.*``),
    so its weights convert to and from the original layout by prefixing alone.
    """

    def __init__(self, named: list[tuple[str, nn.Module]]) -> None:
        super().__init__()
        self.order = [path for path, _ in named]
        # timm stages that work channels-last get NHWC in and give NHWC out; the rest of the
        # model always sees NCHW.
        self.nhwc_in = self.nhwc_out = False
        for path, module in named:
            parent: nn.Module = self
            *parents, leaf = path.split(".")
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, module)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc_in:
            x = x.permute(0, 2, 3, 1)
        for path in self.order:
            x = self.get_submodule(path)(x)
        return x.permute(0, 3, 1, 2) if self.nhwc_out else x


def _fetch_weights(load: Callable[[], nn.Module], what: str) -> nn.Module:
    """Run a weight-downloading constructor; turn an offline failure into a clear message."""
    try:
        return load()
    except Exception as err:  # urllib / huggingface_hub / OSError differ by library version
        raise RuntimeError(
            f"could not obtain ImageNet weights for {what}: {type(err).__name__}: {err}. "
            f"They are downloaded on first use (torch hub cache: {torch.hub.get_dir()}, or the "
            "Hugging Face cache for timm); without internet put the file there or set "
            "model.pretrained: false") from err


def _torchvision_resnet(arch: str, pretrained: bool | str) -> BackboneParts:
    import torchvision
    ctor = getattr(torchvision.models, arch)
    if pretrained:
        net = _fetch_weights(lambda: ctor(weights="IMAGENET1K_V1"), f"torchvision {arch}")
    else:
        net = ctor(weights=None)
    body = nn.Sequential(OrderedDict(
        (n, getattr(net, n)) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")))
    head = nn.Sequential(OrderedDict(layer4=net.layer4))
    c4 = net.layer3[-1].conv3.out_channels if hasattr(net.layer3[-1], "conv3") else net.layer3[-1].conv2.out_channels
    c5 = net.layer4[-1].conv3.out_channels if hasattr(net.layer4[-1], "conv3") else net.layer4[-1].conv2.out_channels
    return BackboneParts(body, head, c4, c5, stem=[net.conv1, net.bn1])


@register("resnet50")
def resnet50(pretrained: bool | str = False) -> BackboneParts:
    """torchvision ResNet-50: conv1..layer3 trunk (1024 ch), layer4 head (2048 ch)."""
    return _torchvision_resnet("resnet50", pretrained)


@register("resnet18")
def resnet18(pretrained: bool | str = False) -> BackboneParts:
    """torchvision ResNet-18: conv1..layer3 trunk (256 ch), layer4 head (512 ch)."""
    return _torchvision_resnet("resnet18", pretrained)


@register("shufflenet")
def shufflenet(pretrained: bool | str = False) -> BackboneParts:
    """ShuffleNetV1 g=3 with psvis names: stem + stages 0-1 trunk (480 ch), stage 2 head (960 ch)."""
    if pretrained:
        raise ValueError("no ImageNet weights exist for ShuffleNetV1 in torchvision/timm; use "
                         "model.pretrained: false and load the psvis weights through checkpoints/")
    net = ShuffleNetV1(groups=3)
    body = PathSequential([("conv1", net.conv1), ("maxpool", net.maxpool),
                           ("layers.0", net.layers[0]), ("layers.1", net.layers[1])])
    head = PathSequential([("layers.2", net.layers[2])])
    return BackboneParts(body, head, net.channels[1], net.channels[2], stem=[net.conv1])


# --------------------------------------------------------------------------------------- timm
def _flat_children(model: nn.Module, feature_modules: set[str]) -> list[tuple[str, nn.Module]]:
    """Top-level modules in order; a Sequential is opened one level only where a feature stage
    sits inside it (timm's ``blocks.3`` style), so every feature module becomes one entry."""
    flat = []
    for name, child in model.named_children():
        inner = [f"{name}.{sub}" for sub, _ in child.named_children()] if isinstance(child, nn.Sequential) else []
        if name not in feature_modules and any(path in feature_modules for path in inner):
            flat += [(f"{name}.{sub}", m) for sub, m in child.named_children()]
        else:
            flat.append((name, child))
    return flat


def _is_nhwc(module: nn.Module, x: torch.Tensor, channels: int) -> tuple[bool, torch.Tensor]:
    y = module(x)
    return (y.shape[1] != channels and y.shape[-1] == channels), y


def timm_backbone(name: str, pretrained: bool | str = False) -> BackboneParts:
    """Split a timm CNN: modules up to the second-last feature stage = trunk, the last stage = head.

    Works for models whose forward runs their (flattened) top-level modules in order, like
    ResNets, MobileNets, EfficientNets, RegNets and ConvNeXts.  Module names stay timm's own.
    """
    try:
        import timm
    except ImportError as err:  # pragma: no cover - timm is a declared dependency
        raise RuntimeError("timm is needed for 'timm:<name>' backbones") from err
    if name not in timm.list_models():
        raise ValueError(f"unknown timm model {name!r}")
    build = lambda: timm.create_model(name, pretrained=bool(pretrained), num_classes=0)  # noqa: E731
    model = _fetch_weights(build, f"timm {name}") if pretrained else build()
    info = getattr(model, "feature_info", None)
    if not info or len(info) < 2:
        raise ValueError(f"timm model {name!r} exposes no feature_info with >= 2 stages")
    flat = _flat_children(model, {f["module"] for f in info})
    index = {path: i for i, (path, _) in enumerate(flat)}
    c4_info, c5_info = info[-2], info[-1]
    missing = [f["module"] for f in (c4_info, c5_info) if f["module"] not in index]
    if missing:
        raise ValueError(f"timm model {name!r}: feature modules {missing} are not sequential "
                         "top-level stages; only sequential-stage CNNs can be split into trunk + head")
    i4, i5 = index[c4_info["module"]], index[c5_info["module"]]
    c4, c5 = int(c4_info["num_chs"]), int(c5_info["num_chs"])
    body = PathSequential(flat[: i4 + 1])
    head = PathSequential(flat[i4 + 1: i5 + 1])
    # Probe once on a tiny input to learn whether the stages work channels-last.
    was_training = model.training
    model.eval()
    with torch.no_grad():
        probe = torch.zeros(1, 3, 64, 64)
        body_nhwc, c4_map = _is_nhwc(body, probe, c4)
        head_nhwc, _ = _is_nhwc(head, c4_map, c5)   # the head takes the trunk's raw layout
    model.train(was_training)
    body.nhwc_out, head.nhwc_in, head.nhwc_out = body_nhwc, body_nhwc, head_nhwc
    reductions = [int(f["reduction"]) for f in info]
    first = index.get(info[0]["module"], 0)
    stem_end = first + 1 if reductions[0] <= 2 else first
    stem = [m for _, m in flat[:stem_end]]
    return BackboneParts(body, head, c4, c5, stem=stem)
