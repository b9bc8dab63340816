"""Invariant and Spreading instance features (Ye et al., 2019): in-batch instance discrimination.

Each image ``i`` of the (global) batch is seen twice, ``x_i`` and its augmentation ``x̂_i``, by one
shared encoder. With ``P(j | f) = exp(f_j·f / τ) / Σ_k exp(f_k·f / τ)`` over every other
feature ``f_k`` of the batch, the loss asks each view to be classified as its own instance and
every other instance to reject it:

    L = -1/(2N) Σ_rows [ log P(pos | row) + Σ_{c ≠ pos, row} log(1 - P(c | row)) ]

(the paper's Eq. 6 with both views as queries; the value of its ``BatchCriterion``, whose code
also blocks the gradient through the compared-against features, where this takes the full
gradient of the equation). Negatives are the other views of the global batch, gathered across
processes with gradient; the mean over processes equals one process holding the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.config import spec
from mmcl.dist import gather_with_grad, world
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.infonce import embedding_std, top1
from mmcl.objectives.simclr import pair_logits
from mmcl.registry import register


@dataclass
class InvaSpreadConfig:
    """``objective: {name: invaspread, temperature: 0.1}`` (the paper's τ, 128-d features)."""

    temperature: float = spec(0.1, gt=0)


def invaspread_loss(logits: torch.Tensor, pos_idx: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-log P(pos) - Σ_neg log(1 - P(neg))``; ``logits`` ÷ τ with -inf on
    each row's own column (which then has probability 0 and contributes nothing)."""
    logp = F.log_softmax(logits, dim=1)
    p = logp.exp()
    pos = F.one_hot(pos_idx, logits.shape[1]).bool()
    spread = torch.log1p(-p.masked_fill(pos, 0.0).clamp(max=1 - 1e-6)).sum(dim=1)
    return -(logp.gather(1, pos_idx[:, None]).squeeze(1) + spread).mean()


@register("objective", "invaspread", InvaSpreadConfig)
class InvaSpreadLoss(ViewObjective):
    """The loss over the first two views' normalised projections ``out["z"]``.

    >>> z = torch.eye(8)
    >>> spread = InvaSpreadLoss(InvaSpreadConfig(temperature=0.5))
    >>> matched, shuffled = spread({"z": [z, z]})[0], spread({"z": [z, z.roll(1, 0)]})[0]
    >>> bool(matched < shuffled)   # views of one image should agree, and be spread from the others
    True
    """


    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = (F.normalize(z, dim=-1) for z in out["z"][:2])
        logits, pos_idx = pair_logits(z1, z2, gather_with_grad(z1), gather_with_grad(z2), self.cfg.temperature,
                                      world()[0])
        return invaspread_loss(logits, pos_idx), {"acc": top1(logits, pos_idx),
                                                  "embedding_std": embedding_std(out["z"][0])}
