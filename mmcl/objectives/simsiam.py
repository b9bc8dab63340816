"""SimSiam (Chen & He, 2021): predict one view's projection from the other's, with a
stop-gradient on the target branch and no momentum encoder or negatives.

``loss = −½ (cos(p1, sg(z2)) + cos(p2, sg(z1)))``, averaged over the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.models.heads import HeadConfig, build_head
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.infonce import embedding_std
from mmcl.registry import register


@dataclass
class SimSiamConfig:
    """``objective: {name: simsiam, predictor: {dims: [512, 2048]}}`` (bottleneck predictor)."""

    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(dims=[512, 2048]))


def simsiam_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """Symmetric negative cosine with stop-gradient on ``z``: -1 when each prediction points at the
    other view's projection.

    >>> z1, z2 = torch.randn(2, 4), torch.randn(2, 4)
    >>> round(simsiam_loss(3 * z2, 0.5 * z1, z1, z2).item(), 6)
    -1.0
    """
    cos = lambda p, z: F.cosine_similarity(p.float(), z.float().detach(), dim=-1).mean()  # noqa: E731
    return -0.5 * (cos(p1, z2) + cos(p2, z1))


@register("objective", "simsiam", SimSiamConfig)
class SimSiamLoss(ViewObjective):
    """Holds the predictor.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> simsiam = SimSiamLoss(SimSiamConfig(predictor=HeadConfig(dims=[32, 16]))); simsiam.setup(model, total_steps=100)
    >>> loss, metrics = simsiam(model({"views": views}), {"views": views})
    >>> -1 <= loss.item() <= 1   # the negative cosine of predictions and stop-gradient projections
    True
    """

    couples_batch = False  # each sample against its own stop-gradient target: accumulation is exact

    needs_model_attributes = ("embed_dim",)

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """The predictor, on the model's embeddings."""
        self.check_model(model)
        self.predictor = build_head(self.cfg.predictor, model.embed_dim)

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = out["z"][:2]
        loss = simsiam_loss(self.predictor(z1), self.predictor(z2), z1, z2)
        return loss, {"embedding_std": embedding_std(z1)}
