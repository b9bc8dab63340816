"""Contrastive Predictive Coding for images (van den Oord et al., 2018; Hénaff et al., 2019):
a patch encoder over an overlapping grid of patches, and an autoregressive context network
down the rows of the grid.

``forward`` cuts each image into a ``G × G`` grid of ``patch_size`` patches every ``patch_stride``
pixels, encodes every patch to ``z`` ([B, G, G, D]) and runs the context network to ``c``
([B, G, G, C]), where ``c[:, i, j]`` depends on patch rows ``0..i`` only: a stack of masked
convolutions whose kernels see the current and earlier rows (``context: conv``), or a GRU down
each column (``context: gru``). The CPC objective predicts ``z`` k rows below from ``c``.
The representation evaluated by kNN and linear probes is ``z`` averaged over the grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.errors import ConfigError
from mmcl.models.encoders import BackboneConfig, build_backbone
from mmcl.models.saved import SavedModel
from mmcl.registry import register


@dataclass
class CPCModelConfig:
    """``model: {name: cpc, backbone: {...}, patch_size: 8, patch_stride: 4, context: conv}``."""

    backbone: BackboneConfig = field(default_factory=lambda: BackboneConfig(depth=2, norm="gn"))
    patch_size: int = spec(8, ge=2)
    patch_stride: int = spec(4, ge=1)
    context: Literal["conv", "gru"] = "conv"
    context_dim: int = spec(256, ge=1)
    context_layers: int = spec(3, ge=1, help="conv: masked convolutions (each sees 1 more row up)")
    patch_jitter: int = spec(0, ge=0, help="training only: each patch cut up to this many pixels off its "
                                           "grid position, independently per patch (CPC v2's patch augmentation)")
    patch_rotate: float = spec(0.0, ge=0, le=180, help="training only: each patch rotated by its own random "
                                                         "angle in [-patch_rotate, patch_rotate] degrees")

    def grid(self, image_size: int) -> int:
        """Patches per side of the grid cut from ``image_size`` px images."""
        return (image_size - self.patch_size) // self.patch_stride + 1

    def check_recipe(self, recipe: Any) -> None:
        """The images must hold a grid of at least 2 x 2 patches."""
        if self.grid(recipe.data.image_size) < 2:
            raise ConfigError(f"model.patch_size {self.patch_size} with patch_stride {self.patch_stride} gives fewer "
                              f"than 2 x 2 patches on data.image_size {recipe.data.image_size}")


def patch_grid(images: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """[B, C, H, W] → [B, G, G, C, size, size] overlapping patches (G = (H - size) // stride + 1)."""
    patches = images.unfold(2, size, stride).unfold(3, size, stride)  # B, C, G, G, size, size
    return patches.permute(0, 2, 3, 1, 4, 5).contiguous()


def jittered_patch_grid(images: torch.Tensor, size: int, stride: int, jitter: int) -> torch.Tensor:
    """:func:`patch_grid` with every patch moved by its own random offset in [-jitter, jitter]²
    (the image edge-padded): a prediction from the context cannot know the offset of its target,
    so the patch encoder is pushed towards features that do not change under small shifts."""
    b, _, h, w = images.shape
    g_h, g_w = (h - size) // stride + 1, (w - size) // stride + 1
    every = F.pad(images, (jitter,) * 4, mode="replicate").unfold(2, size, 1).unfold(3, size, 1)
    dev = images.device
    rows = (torch.arange(g_h, device=dev) * stride + jitter)[None, :, None]
    cols = (torch.arange(g_w, device=dev) * stride + jitter)[None, None, :]
    rows = rows + torch.randint(-jitter, jitter + 1, (b, g_h, g_w), device=dev)
    cols = cols + torch.randint(-jitter, jitter + 1, (b, g_h, g_w), device=dev)
    return every[torch.arange(b, device=dev)[:, None, None], :, rows, cols]  # B, G, G, C, size, size


def rotate_patches(patches: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """[N, C, s, s] patches, patch n rotated about its centre by ``degrees[n]`` (bilinear, edge
    values outside)."""
    angle = degrees.to(patches.device, torch.float32) * torch.pi / 180
    cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta.to(patches.dtype), list(patches.shape), align_corners=False)
    return F.grid_sample(patches, grid, padding_mode="border", align_corners=False)


class RowCausalConv(nn.Module):
    """A 2×3 convolution over a [B, C, G, G] grid padded so output row i sees input rows i-1 and i."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, (2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, 1, 0)))  # left, right, top, bottom


class ConvContext(nn.Module):
    """Stacked row-causal convolutions (ReLU between), then a 1×1 output convolution."""

    def __init__(self, d_in: int, dim: int, layers: int):
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(layers):
            blocks += [RowCausalConv(d_in if i == 0 else dim, dim), nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*blocks, nn.Conv2d(dim, dim, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, G, G, D] → [B, G, G, C]."""
        return self.net(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class GRUContext(nn.Module):
    """A GRU down each column of the grid."""

    def __init__(self, d_in: int, dim: int):
        super().__init__()
        self.gru = nn.GRU(d_in, dim, batch_first=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """[B, G, G, D] → [B, G, G, C]."""
        b, g, w, d = z.shape
        cols = z.permute(0, 2, 1, 3).reshape(b * w, g, d)
        c, _ = self.gru(cols)
        return c.reshape(b, w, g, -1).permute(0, 2, 1, 3)


@register("model", "cpc", CPCModelConfig)
class CPCModel(SavedModel):
    """Patch encoder + context network.

    >>> m = CPCModel(CPCModelConfig(context_dim=32))
    >>> out = m({"views": [torch.zeros(2, 3, 32, 32)]})
    >>> out["z"].shape, out["c"].shape, m.encode_image(torch.zeros(2, 3, 32, 32)).shape
    (torch.Size([2, 7, 7, 64]), torch.Size([2, 7, 7, 32]), torch.Size([2, 64]))
    """

    data_kinds = ("multi_view",)  # what the recipe checks at load (mmcl.registry.model_declaration)
    outputs = ("z:grid", "c:grid")

    config_cls = CPCModelConfig

    def __init__(self, cfg: CPCModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_backbone(cfg.backbone)
        d = self.encoder.out_dim
        self.context = ConvContext(d, cfg.context_dim, cfg.context_layers) if cfg.context == "conv" \
            else GRUContext(d, cfg.context_dim)
        self.feature_dim = self.embed_dim = d
        self.context_dim = cfg.context_dim

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → patch embeddings ``z`` [B, G, G, D] (patches jittered and rotated when
        training, if configured)."""
        cfg = self.cfg
        patches = jittered_patch_grid(images, cfg.patch_size, cfg.patch_stride, cfg.patch_jitter) \
            if self.training and cfg.patch_jitter else patch_grid(images, cfg.patch_size, cfg.patch_stride)
        b, g, w = patches.shape[:3]
        patches = patches.flatten(0, 2)
        if self.training and cfg.patch_rotate:
            angles = (torch.rand(patches.shape[0], device=patches.device) * 2 - 1) * cfg.patch_rotate
            patches = rotate_patches(patches, angles)
        return self.encoder(patches).reshape(b, g, w, -1)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Patch embeddings ``z`` and contexts ``c`` of the first view."""
        z = self.patch_features(batch["views"][0])
        return {"z": z, "c": self.context(z)}

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Patch embeddings averaged over the grid."""
        h = self.patch_features(images).mean(dim=(1, 2))
        return F.normalize(h, dim=-1) if normalize else h
