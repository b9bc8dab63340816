"""Image backbones for self-supervised recipes: a small CNN, torchvision ResNets, open_clip towers.

Every backbone maps ``[B, 3, H, W]`` to ``[B, D]`` features and reports ``D`` as ``out_dim``.
``small_stem`` replaces a ResNet's 7×7/2 convolution and max-pool with one 3×3/1 convolution,
as is usual for 32 px images (CIFAR, digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mmcl.config import spec
from mmcl.errors import ConfigError

Norm = Literal["bn", "gn", "none"]


@dataclass
class BackboneConfig:
    """``backbone: {name: cnn | resnet18 | resnet34 | resnet50 | open_clip, ...}``."""

    name: Literal["cnn", "resnet18", "resnet34", "resnet50", "open_clip"] = "cnn"
    width: int = spec(32, ge=4, help="cnn: channels of the first block (doubled per block)")
    depth: int = spec(4, ge=1, le=6, help="cnn: number of conv blocks")
    norm: Norm = "bn"
    small_stem: bool = False
    open_clip_model: str | None = spec(None, help="open_clip: a model name (its vision tower is used)")
    open_clip_config: str | None = spec(None, help="open_clip: a JSON config or shipped name")


def norm_layer(kind: Norm, channels: int, dims: int = 2) -> nn.Module:
    """BatchNorm, GroupNorm (up to 32 groups) or nothing."""
    if kind == "bn":
        return nn.BatchNorm2d(channels) if dims == 2 else nn.BatchNorm1d(channels)
    if kind == "gn":
        return nn.GroupNorm(min(32, channels), channels)
    return nn.Identity()


class SmallCNN(nn.Module):
    """``depth`` blocks of (3×3 stride-2 conv, norm, ReLU), channels doubling from ``width``, then
    global average pooling: a CPU-sized encoder (32 px → 2×2×256 with the defaults)."""

    def __init__(self, width: int = 32, depth: int = 4, norm: Norm = "bn"):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width * 2 ** i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=norm == "none"), norm_layer(norm, c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


class ResNet(nn.Module):
    """A torchvision ResNet without its classifier (optionally with the small-image stem)."""

    def __init__(self, name: str, small_stem: bool, norm: Norm):
        super().__init__()
        import torchvision

        kwargs = {}
        if norm == "gn":
            kwargs["norm_layer"] = lambda c: nn.GroupNorm(32, c)
        elif norm == "none":
            raise ConfigError("backbone.norm: torchvision ResNets need bn or gn")
        net = getattr(torchvision.models, name)(weights=None, **kwargs)
        if small_stem:
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OpenClipVision(nn.Module):
    """The vision tower of an open_clip model (a name such as ViT-B-32, or a JSON config)."""

    def __init__(self, model: str | None, config: str | None):
        super().__init__()
        from open_clip.model import _build_vision_tower

        from mmcl.models.clip import ClipModelConfig, open_clip_model_cfg

        if (model is None) == (config is None):
            raise ConfigError("backbone: name open_clip needs exactly one of open_clip_model or open_clip_config")
        model_cfg = open_clip_model_cfg(ClipModelConfig(open_clip_model=model, open_clip_config=config))
        self.tower = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
        self.out_dim = model_cfg["embed_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tower(x)


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone a config names; its ``out_dim`` is the feature size."""
    if cfg.name == "cnn":
        return SmallCNN(cfg.width, cfg.depth, cfg.norm)
    if cfg.name.startswith("resnet"):
        return ResNet(cfg.name, cfg.small_stem, cfg.norm)
    return OpenClipVision(cfg.open_clip_model, cfg.open_clip_config)
