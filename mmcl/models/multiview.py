"""One encoder per view (CMC, Tian et al., 2019): views are channel groups of one image (L vs ab
of Lab, Y vs CbCr) or separate image fields of a sample (``rgb.png`` and ``depth.png``).

``forward`` returns per-view backbone features ``h`` and projections ``z`` like
:class:`~mmcl.models.encoder.EncoderModel`, so objectives see the same interface. The
representation evaluated by kNN and linear probes is every view's features, each L2-normalised,
concatenated (the paper's evaluation of L and ab features together).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.errors import ConfigError
from mmcl.models.encoders import BackboneConfig, build_backbone
from mmcl.models.heads import HeadConfig, build_head
from mmcl.models.saved import SavedModel
from mmcl.registry import register


@dataclass
class MultiViewModelConfig:
    """``model: {name: multiview, channels: [[0], [1, 2]], backbone: {...}, projector: {...}}``.

    ``channels``: one channel group of the (single) input image per encoder; empty: one
    3-channel encoder per input view (``views`` of them, one per ``data.view_fields`` entry).
    """

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    projector: HeadConfig = field(default_factory=lambda: HeadConfig(dims=[128], norm="none"))
    channels: list[list[int]] = field(default_factory=list)
    views: int = spec(2, ge=2, help="encoders when channels is empty")

    def validate(self) -> None:
        """Channel groups must be non-empty, distinct indices."""
        if self.channels and (len(self.channels) < 2 or any(not g for g in self.channels)):
            raise ConfigError(f"model.channels needs at least 2 non-empty channel groups, got {self.channels}")
        flat = [c for g in self.channels for c in g]
        if len(set(flat)) != len(flat) or any(c < 0 for c in flat):
            raise ConfigError(f"model.channels: channel indices must be distinct and >= 0, got {self.channels}")

    def output_views(self, data: Any) -> int:
        """Views per sample in ``out["z"]``: one per encoder (channel group, or image field)."""
        return len(self.channels) or self.views

    def check_recipe(self, recipe: Any) -> None:
        """One encoder per image field when the views are fields (``data.view_fields``)."""
        fields = recipe.data.view_fields
        if fields and not self.channels and self.views != len(fields):
            raise ConfigError(f"model.views is {self.views} but data.view_fields names {len(fields)} fields "
                              f"({', '.join(fields)}); give one encoder per field")


@register("model", "multiview", MultiViewModelConfig)
class MultiViewModel(SavedModel):
    """An encoder (backbone + projector) per view.

    >>> m = MultiViewModel(MultiViewModelConfig(channels=[[0], [1, 2]], projector=HeadConfig(dims=[16])))
    >>> out = m({"views": [torch.zeros(2, 3, 32, 32)]})
    >>> [z.shape for z in out["z"]], m.encode_image(torch.zeros(2, 3, 32, 32)).shape
    ([torch.Size([2, 16]), torch.Size([2, 16])], torch.Size([2, 512]))
    """

    data_kinds = ("multi_view",)  # what the recipe checks at load (mmcl.registry.model_declaration)
    outputs = ("h:views", "z:views")

    config_cls = MultiViewModelConfig

    def __init__(self, cfg: MultiViewModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        in_channels = [len(g) for g in cfg.channels] or [cfg.backbone.in_channels] * cfg.views
        self.backbones = nn.ModuleList(build_backbone(dataclasses.replace(cfg.backbone, in_channels=c))
                                       for c in in_channels)
        self.projectors = nn.ModuleList(build_head(cfg.projector, b.out_dim) for b in self.backbones)
        self.feature_dim = sum(b.out_dim for b in self.backbones)
        self.embed_dim = cfg.projector.dims[-1]

    def inputs(self, images: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        """One input per encoder: the channel groups of one image, or the given views."""
        if self.cfg.channels:
            image = images[0] if isinstance(images, list) else images
            return [image[:, g] for g in self.cfg.channels]
        views = images if isinstance(images, list) else [images]
        if len(views) != len(self.backbones):
            raise ConfigError(f"the model has {len(self.backbones)} view encoders but the batch has {len(views)} "
                              "views: set data.view_fields to one image field per encoder")
        return views

    def forward(self, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        """Per-view backbone features ``h`` and projections ``z``."""
        h = [b(x) for b, x in zip(self.backbones, self.inputs(batch["views"]))]
        return {"h": h, "z": [p(x) for p, x in zip(self.projectors, h)]}

    def encode_image(self, images: torch.Tensor | list[torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """Every view's backbone features, each normalised, concatenated (normalised again for cosine kNN)."""
        h = torch.cat([F.normalize(b(x), dim=-1) for b, x in zip(self.backbones, self.inputs(images))], dim=-1)
        return F.normalize(h, dim=-1) if normalize else h
