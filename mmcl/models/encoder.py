"""A single-modal image encoder for self-supervised recipes: backbone + projection head.

``forward`` embeds every view of a multi-view batch (``{"views": [V × [B, 3, H, W]]}``) and
returns backbone features ``h`` and projections ``z`` per view; the objective decides what to
compare. Views are encoded one at a time, so BatchNorm statistics are per view (as in the
BYOL/SimSiam/MoCo reference code) and views may differ in size (multi-crop).
``encode_image`` gives the L2-normalised backbone features used by kNN and linear probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import from_dict, register, to_dict
from mmcl.models.encoders import BackboneConfig, build_backbone
from mmcl.models.heads import HeadConfig, build_head


@dataclass
class EncoderModelConfig:
    """``model: {name: encoder, backbone: {...}, projector: {dims: [...]} | null}``."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig | None = field(default_factory=HeadConfig)


class EncoderModel(nn.Module):
    """Backbone + projector.

    >>> m = EncoderModel(EncoderModelConfig(projector=HeadConfig(dims=[64, 16])))
    >>> out = m({"views": [torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)]})
    >>> [z.shape for z in out["z"]], out["h"][0].shape
    ([torch.Size([2, 16]), torch.Size([2, 16])], torch.Size([2, 256]))
    """

    def __init__(self, cfg: EncoderModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.projector = build_head(cfg.projector, self.backbone.out_dim) if cfg.projector else nn.Identity()
        self.feature_dim = self.backbone.out_dim
        self.embed_dim = cfg.projector.dims[-1] if cfg.projector else self.feature_dim

    def forward(self, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """Per-view backbone features ``h`` and projections ``z``."""
        h = [self.backbone(v) for v in batch["views"]]
        return {"h": h, "z": [self.projector(x) for x in h]}

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Backbone features (the representation evaluated by kNN / linear probes)."""
        x = self.backbone(image)
        return F.normalize(x, dim=-1) if normalize else x

    def save_files(self, folder: Path, preprocess: dict[str, Any]) -> dict[str, Any]:
        """Write ``model.safetensors``; return the config that rebuilds the architecture."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        return {"mmcl_model": to_dict(self.cfg), "feature_dim": self.feature_dim}

    @classmethod
    def load_files(cls, folder: Path, config: dict[str, Any]) -> EncoderModel:
        """Rebuild a model written by :meth:`save_files`."""
        from safetensors.torch import load_file

        model = cls(from_dict(EncoderModelConfig, config["mmcl_model"]))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model


@register("model", "encoder", EncoderModelConfig)
def build_encoder(cfg: EncoderModelConfig) -> EncoderModel:
    """Registry entry: ``model: {name: encoder, ...}``."""
    return EncoderModel(cfg)
