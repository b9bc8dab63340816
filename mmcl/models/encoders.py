"""Image backbones for self-supervised recipes: a small CNN, torchvision ResNets, open_clip towers.

Every backbone maps ``[B, 3, H, W]`` to ``[B, D]`` features and reports ``D`` as ``out_dim``.
``small_stem`` replaces a ResNet's 7×7/2 convolution and max-pool with one 3×3/1 convolution,
as is usual for 32 px images (CIFAR, digits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
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
    in_channels: int = spec(3, ge=1, help="input channels (CMC's L view: 1, ab view: 2)")
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

    def __init__(self, width: int = 32, depth: int = 4, norm: Norm = "bn", in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
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

    def __init__(self, name: str, small_stem: bool, norm: Norm, in_channels: int = 3):
        super().__init__()
        import torchvision

        kwargs = {}
        if norm == "gn":
            kwargs["norm_layer"] = lambda c: nn.GroupNorm(32, c)
        elif norm == "none":
            raise ConfigError("backbone.norm: torchvision ResNets need bn or gn")
        net = getattr(torchvision.models, name)(weights=None, **kwargs)
        if small_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class OpenClipVision(nn.Module):
    """The vision tower of an open_clip model (a name such as ViT-B-32, or a JSON config).

    A ViT tower also takes images of another size than it was built for (multi-crop's local
    crops): the patch-position embeddings are interpolated (bicubic) to the new grid, as in DINO.
    """

    def __init__(self, model: str | None, config: str | None):
        super().__init__()
        from open_clip.model import _build_vision_tower

        from mmcl.models.clip import ClipModelConfig, open_clip_model_cfg, use_device_patch_dropout

        if (model is None) == (config is None):
            raise ConfigError("backbone: name open_clip needs exactly one of open_clip_model or open_clip_config")
        model_cfg = open_clip_model_cfg(ClipModelConfig(open_clip_model=model, open_clip_config=config))
        self.tower = _build_vision_tower(model_cfg["embed_dim"], model_cfg["vision_cfg"])
        use_device_patch_dropout(self.tower)  # a config's patch_dropout, drawn on the device
        self.out_dim = model_cfg["embed_dim"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.tower
        grid = getattr(tower, "grid_size", None)
        if grid is None or tuple(grid) == self._grid(x):
            return tower(x)
        if not hasattr(tower, "positional_embedding") or getattr(tower, "output_tokens", False):
            raise ConfigError(f"this open_clip vision tower takes {tower.image_size} px images only")
        return self._resized_forward(x)

    def _grid(self, x: torch.Tensor) -> tuple[int, int]:
        ph, pw = self.tower.patch_size
        return x.shape[-2] // ph, x.shape[-1] // pw

    def _resized_forward(self, x: torch.Tensor) -> torch.Tensor:
        """open_clip's ViT forward with the position embeddings interpolated to ``x``'s grid."""
        t = self.tower
        pos = t.positional_embedding
        (gh, gw), (h, w) = t.grid_size, self._grid(x)
        patch_pos = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        pos = torch.cat([pos[:1], patch_pos.permute(0, 2, 3, 1).reshape(h * w, -1)])
        x = t.conv1(x).flatten(2).transpose(1, 2)
        cls = t.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = t.ln_pre(t.patch_dropout(torch.cat([cls, x], dim=1) + pos.to(x.dtype)))
        pooled, _ = t._pool(t.transformer(x))
        return pooled @ t.proj if t.proj is not None else pooled


def build_backbone(cfg: BackboneConfig) -> nn.Module:
    """The backbone a config names; its ``out_dim`` is the feature size."""
    if cfg.name == "cnn":
        return SmallCNN(cfg.width, cfg.depth, cfg.norm, cfg.in_channels)
    if cfg.name.startswith("resnet"):
        return ResNet(cfg.name, cfg.small_stem, cfg.norm, cfg.in_channels)
    if cfg.in_channels != 3:
        raise ConfigError("backbone.in_channels: open_clip vision towers take 3-channel images")
    return OpenClipVision(cfg.open_clip_model, cfg.open_clip_config)
