"""SimCLR's NT-Xent (Chen et al., 2020): each view's positive is the other view of the same image,
its negatives are all other views in the global batch (gathered across processes with gradient).

Each process scores its own 2B rows against all 2NB columns (self-similarity masked out), so
memory grows linearly with the global batch; the mean over processes equals the loss of one
process holding the whole batch, and so do the gradients (``tests/dist``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.config import spec
from mmcl.dist import gather_with_grad, world
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.registry import register


@dataclass
class SimCLRConfig:
    """``objective: {name: simclr, temperature: 0.5}`` (0.1 for large batches in the paper)."""

    temperature: float = spec(0.5, gt=0)


def pair_logits(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor,
                temperature: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This process's 2B rows ``[z1; z2]`` scored against all 2NB columns ``[z1_all; z2_all]``
    (÷ τ, float32, self-similarity -inf), and each row's positive column (the other view).
    ``z1, z2``: [B, D] normalised views of the same B images; ``z*_all``: [N·B, D] of all processes
    in rank order."""
    b, n_all = z1.shape[0], z1_all.shape[0]
    logits = (torch.cat([z1, z2]) @ torch.cat([z1_all, z2_all]).T / temperature).float()
    own = torch.arange(b, device=z1.device) + rank * b
    self_idx = torch.cat([own, own + n_all])
    pos_idx = torch.cat([own + n_all, own])
    logits = logits.masked_fill(F.one_hot(self_idx, 2 * n_all).bool(), float("-inf"))
    return logits, pos_idx


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor, temperature: float,
            rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of this process's rows (see :func:`pair_logits`). Returns (loss, top-1 accuracy).

    In one process the gathered views are the views themselves:

    >>> z1, z2 = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> loss, acc = nt_xent(z1, z2, z1, z2, temperature=0.5, rank=0)
    >>> z = torch.cat([z1, z2]); sims = (z @ z.T / 0.5).fill_diagonal_(float("-inf"))
    >>> torch.allclose(loss, F.cross_entropy(sims, torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])))
    True
    """
    logits, pos_idx = pair_logits(z1, z2, z1_all, z2_all, temperature, rank)
    return info_nce(logits, pos_idx), top1(logits, pos_idx)


@register("objective", "simclr", SimCLRConfig)
class SimCLRLoss(ViewObjective):
    """NT-Xent over the first two views' projections ``out["z"]``.

    >>> import math
    >>> z = torch.eye(8)   # 8 images whose two views agree and are orthogonal to the others
    >>> loss, metrics = SimCLRLoss(SimCLRConfig(temperature=0.5))({"z": [z, z]})
    >>> round(loss.item(), 4), round(math.log(1 + 14 * math.exp(-2)), 4)   # each positive scores 2, 14 negatives 0
    (1.0629, 1.0629)
    """


    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = (F.normalize(z, dim=-1) for z in out["z"][:2])
        loss, acc = nt_xent(z1, z2, gather_with_grad(z1), gather_with_grad(z2), self.cfg.temperature, world()[0])
        return loss, {"acc": acc, "embedding_std": embedding_std(out["z"][0])}
