"""BYOL (Grill et al., 2020): the online network predicts the momentum target's projection of
the other view; symmetric normalised MSE, no negatives.

``loss = ℓ(p1, t2) + ℓ(p2, t1)``, ``ℓ(p, t) = mean(2 − 2 cos(p, t))``, target without gradient,
target momentum from ``momentum`` (0.996) to 1 on a cosine over the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.config import spec
from mmcl.models.heads import HeadConfig
from mmcl.objectives.infonce import embedding_std
from mmcl.objectives.momentum import MomentumObjective
from mmcl.registry import register


@dataclass
class BYOLConfig:
    """``objective: {name: byol, momentum: 0.996, predictor: {dims: [4096, 256]}}``."""

    momentum: float = spec(0.996, ge=0, le=1, help="base of the cosine schedule to 1")
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(dims=[4096, 256]))


def byol_loss(p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``‖p/‖p‖ − t/‖t‖‖² = 2 − 2 cos(p, t)``.

    >>> p, t = torch.randn(3, 5), torch.randn(3, 5)
    >>> torch.allclose(byol_loss(p, t), ((F.normalize(p, dim=-1) - F.normalize(t, dim=-1)) ** 2).sum(-1).mean())
    True
    """
    return (2 - 2 * F.cosine_similarity(p.float(), t.float().detach(), dim=-1)).mean()


@register("objective", "byol", BYOLConfig)
class BYOLLoss(MomentumObjective):
    """Holds the predictor (trained) and the momentum target.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> byol = BYOLLoss(BYOLConfig(predictor=HeadConfig(dims=[32, 16]))); byol.setup(model, total_steps=100)
    >>> loss, metrics = byol(model({"views": views}), {"views": views})
    >>> 0 <= loss.item() <= 8   # 2 - 2·cos per view pair, both directions
    True
    """

    couples_batch = False  # each sample's prediction against its momentum target: accumulation is exact

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        p1, p2 = (self.predictor(z) for z in out["z"][:2])
        t1, t2 = self.target({"views": batch["views"][:2]})["z"]
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        return loss, {"embedding_std": embedding_std(out["z"][0]), "momentum": self.momentum_metric(out["z"][0])}
