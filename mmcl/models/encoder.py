"""A single-modal image encoder for self-supervised recipes: backbone + projection head.

``forward`` embeds every view of a multi-view batch (``{"views": [V × [B, 3, H, W]]}``) and
returns backbone features ``h`` and projections ``z`` per view; the objective decides what to
compare. Views are encoded one at a time, so BatchNorm statistics are per view (as in the
BYOL/SimSiam/MoCo reference code), or with ``group_views`` once per run of same-size views
(multi-crop: the global crops together, then the local crops, as in SwAV and DINO).
``encode_image`` gives the L2-normalised backbone features used by kNN and linear probes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.models.encoders import BackboneConfig, build_backbone
from mmcl.models.heads import HeadConfig, build_head
from mmcl.models.saved import SavedModel
from mmcl.registry import register


@dataclass
class EncoderModelConfig:
    """``model: {name: encoder, backbone: {...}, projector: {dims: [...]} | null}``."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig | None = field(default_factory=HeadConfig)
    group_views: bool = spec(False, help="encode consecutive same-size views in one batch (multi-crop)")

    def embedding_width(self) -> int | None:
        """Width of the embeddings (the projector's last layer); None without a projector (the
        backbone's, known once it is built)."""
        return self.projector.dims[-1] if self.projector else None

    def output_views(self, data: Any) -> int:
        """Views per sample in ``out["z"]``: one per image the data section makes (image fields, or
        augmented views plus multi-crop local crops), all through the one encoder."""
        local = data.multi_crop.local_crops if data.multi_crop else 0
        return len(data.view_fields) or data.views + local


def encode_grouped(net: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """``net`` applied once per run of consecutive views of the same size (2 global crops, then the
    local crops, as in DINO's multi-crop wrapper); results split back per view."""
    out: list[torch.Tensor] = []
    start = 0
    while start < len(views):
        end = start
        while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
            end += 1
        out += list(net(torch.cat(views[start:end])).split([v.shape[0] for v in views[start:end]]))
        start = end
    return out


@register("model", "encoder", EncoderModelConfig)
class EncoderModel(SavedModel):
    """Backbone + projector.

    >>> m = EncoderModel(EncoderModelConfig(projector=HeadConfig(dims=[64, 16])))
    >>> out = m({"views": [torch.zeros(2, 3, 32, 32), torch.ones(2, 3, 32, 32)]})
    >>> [z.shape for z in out["z"]], out["h"][0].shape
    ([torch.Size([2, 16]), torch.Size([2, 16])], torch.Size([2, 256]))
    """

    data_kinds = ("multi_view",)  # what the recipe checks at load (mmcl.registry.model_declaration)
    outputs = ("h:views", "z:views")

    config_cls = EncoderModelConfig

    def __init__(self, cfg: EncoderModelConfig):
        super().__init__()
        self.cfg = cfg
        self.backbone = build_backbone(cfg.backbone)
        self.projector = build_head(cfg.projector, self.backbone.out_dim) if cfg.projector else nn.Identity()
        self.feature_dim = self.backbone.out_dim
        self.embed_dim = cfg.projector.dims[-1] if cfg.projector else self.feature_dim

    def forward(self, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """Per-view backbone features ``h`` and projections ``z``."""
        views = batch["views"]
        h = encode_grouped(self.backbone, views) if self.cfg.group_views else [self.backbone(v) for v in views]
        z = encode_grouped(self.projector, h) if self.cfg.group_views else [self.projector(x) for x in h]
        return {"h": h, "z": z}

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Backbone features (the representation evaluated by kNN / linear probes)."""
        x = self.backbone(image)
        return F.normalize(x, dim=-1) if normalize else x


