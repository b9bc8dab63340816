"""Projection and prediction heads, built from explicit (in, out, norm, activation) blocks.

``HeadConfig(dims=[2048, 2048, 128], norm="bn", last_norm="none")`` on a 512-d backbone is
``Linear(512, 2048) BN ReLU, Linear(2048, 2048) BN ReLU, Linear(2048, 128)``: SimCLR v2's
3-layer projector. The same config type describes every head of the family:

- SimCLR v1: ``dims [H, 128]``; v2: ``dims [H, H, 128]``; MoCo v2: ``dims [2048, 128], norm none``
- BYOL: projector and predictor ``dims [4096, 256]``; SimSiam: projector ``dims [2048, 2048, 2048]``,
  ``last_norm bn``, predictor ``dims [512, 2048]``; MoCo v3: ``last_norm bn_noaffine``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import nn

from mmcl.errors import ConfigError


@dataclass
class HeadConfig:
    """Output sizes of the head's linear layers, and the norms between and after them."""

    dims: list[int] = field(default_factory=lambda: [2048, 128])
    norm: Literal["bn", "ln", "none"] = "bn"
    last_norm: Literal["bn", "bn_noaffine", "none"] = "none"
    activation: Literal["relu", "gelu"] = "relu"

    def validate(self) -> None:
        """Dimensions must be positive."""
        if not self.dims or any(d < 1 for d in self.dims):
            raise ConfigError(f"head dims must be positive integers, got {self.dims}")


def block(d_in: int, d_out: int, norm: str, activation: str | None) -> list[nn.Module]:
    """Linear (bias only without a following norm), then the norm, then the activation."""
    layers: list[nn.Module] = [nn.Linear(d_in, d_out, bias=norm == "none")]
    if norm == "bn":
        layers.append(nn.BatchNorm1d(d_out))
    elif norm == "bn_noaffine":
        layers.append(nn.BatchNorm1d(d_out, affine=False))
    elif norm == "ln":
        layers.append(nn.LayerNorm(d_out))
    if activation == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif activation == "gelu":
        layers.append(nn.GELU())
    return layers


def build_head(cfg: HeadConfig, d_in: int) -> nn.Sequential:
    """The MLP a :class:`HeadConfig` describes, on ``d_in``-dimensional inputs (``out_dim`` set)."""
    layers: list[nn.Module] = []
    for i, d_out in enumerate(cfg.dims):
        last = i == len(cfg.dims) - 1
        layers += block(d_in, d_out, cfg.last_norm if last else cfg.norm, None if last else cfg.activation)
        d_in = d_out
    head = nn.Sequential(*layers)
    head.out_dim = d_in
    return head
