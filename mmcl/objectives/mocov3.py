"""MoCo v3 (Chen, Xie & He, 2021): symmetric InfoNCE between predicted queries and momentum keys
of the other view across the global batch, scaled by 2τ; no queue.

``loss = ctr(q1, k2) + ctr(q2, k1)``, ``ctr(q, k) = 2τ · CE(q·k_all / τ, own index)``, with
``q`` = predictor(online projection) and ``k`` = momentum encoder's projection (gathered from
all processes, no gradient). The momentum rises from ``momentum`` to 1 on a cosine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.config import spec
from mmcl.dist import gather_no_grad, world
from mmcl.models.heads import HeadConfig
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.objectives.momentum import MomentumObjective
from mmcl.registry import register


@dataclass
class MoCoV3Config:
    """``objective: {name: mocov3, temperature: 0.2, momentum: 0.99, predictor: {...}}``."""

    temperature: float = spec(0.2, gt=0)
    momentum: float = spec(0.99, ge=0, le=1, help="base of the cosine schedule to 1")
    predictor: HeadConfig = field(default_factory=lambda: HeadConfig(dims=[4096, 256], last_norm="bn_noaffine"))


def mocov3_ctr(q: torch.Tensor, k_all: torch.Tensor, temperature: float,
               rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """2τ-scaled InfoNCE of this process's normalised queries against all processes' keys."""
    logits = q @ k_all.T / temperature
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]
    return 2 * temperature * info_nce(logits, labels), top1(logits, labels)


@register("objective", "mocov3", MoCoV3Config)
class MoCoV3Loss(MomentumObjective):
    """Holds the predictor (trained) and the momentum encoder.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> moco = MoCoV3Loss(MoCoV3Config(predictor=HeadConfig(dims=[32, 16]))); moco.setup(model, total_steps=100)
    >>> loss, metrics = moco(model({"views": views}), {"views": views})
    >>> loss.backward(); moco.after_optimizer_step(1)   # after the optimizer: the momentum encoder follows
    >>> sorted(metrics)
    ['acc', 'embedding_std', 'momentum']
    """

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rank = world()[0]
        q1, q2 = (F.normalize(self.predictor(z), dim=-1) for z in out["z"][:2])
        k1, k2 = (gather_no_grad(F.normalize(k, dim=-1)) for k in self.target({"views": batch["views"][:2]})["z"])
        l1, a1 = mocov3_ctr(q1, k2, self.cfg.temperature, rank)
        l2, a2 = mocov3_ctr(q2, k1, self.cfg.temperature, rank)
        return l1 + l2, {"acc": (a1 + a2) / 2, "embedding_std": embedding_std(out["z"][0]),
                         "momentum": self.momentum_metric(q1)}
