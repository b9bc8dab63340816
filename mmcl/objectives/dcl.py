"""Decoupled contrastive learning (Yeh et al., 2022): NT-Xent without the positive in the
denominator, and its weighted form DCLW.

For each of the 2B rows ``z_i`` of this process (both views) with positive ``z_i⁺`` (the other view
of the same image) and negatives ``N_i`` (every other view of the global batch: both views of the
other images)::

    ℓ_i = −w_i · z_i·z_i⁺ / τ + log Σ_{k ∈ N_i} exp(z_i·z_k / τ)

DCL: ``w_i = 1``. DCLW: ``w_i = 2 − exp(z_i·z_i⁺ / σ) / mean_j exp(z_j·z_j⁺ / σ)``, the mean over
the images of the global batch, so easy positives (already close) weigh less than hard ones. The
weight is differentiated too, as in the authors' code. The loss is the mean over rows, i.e. the
average of the two views' losses (lightly's ``DCLLoss`` / ``DCLWLoss``).

Across processes both views are gathered with gradient (as SimCLR), and DCLW's normaliser reads the
gathered positives, so the mean of the processes' losses and its gradients equal those of one
process on the whole batch (``tests/dist``).
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
class DCLConfig:
    """``objective: {name: dcl, temperature: 0.1}`` (the paper's and lightly's default τ)."""

    temperature: float = spec(0.1, gt=0)


@dataclass
class DCLWConfig:
    """``objective: {name: dclw, temperature: 0.1, sigma: 0.5}``: DCL with the positives weighted
    by a softmax over the batch at temperature σ (0.5 in the paper)."""

    temperature: float = spec(0.1, gt=0)
    sigma: float = spec(0.5, gt=0, help="temperature of the positive weighting (von Mises-Fisher)")


def dcl_loss(z1: torch.Tensor, z2: torch.Tensor, z1_all: torch.Tensor, z2_all: torch.Tensor, temperature: float,
             rank: int, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoupled contrastive loss of this process's 2B rows ``[z1; z2]`` (normalised views of the
    same B images) against all processes' ``z*_all`` [N·B, D] (rank order); ``sigma`` set: DCLW.
    Returns (loss, top-1 accuracy of the positive among all columns, as NT-Xent's).

    The positive is not in the denominator, so unlike NT-Xent the loss can be negative:

    >>> z1, z2 = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    >>> loss, acc = dcl_loss(z1, z2, z1, z2, temperature=0.5, rank=0)
    >>> z = torch.cat([z1, z2]); sims = z @ z.T / 0.5; pos = torch.tensor([4, 5, 6, 7, 0, 1, 2, 3])
    >>> keep = ~torch.eye(8, dtype=torch.bool); keep[torch.arange(8), pos] = False
    >>> by_hand = (-sims[torch.arange(8), pos] + torch.stack([s[k].logsumexp(0) for s, k in zip(sims, keep)])).mean()
    >>> torch.allclose(loss, by_hand)
    True
    """
    logits, pos_idx = pair_logits(z1, z2, z1_all, z2_all, temperature, rank)
    positive = logits.gather(1, pos_idx[:, None]).squeeze(1)
    negatives = logits.scatter(1, pos_idx[:, None], float("-inf")).logsumexp(dim=1)
    if sigma is not None:
        b = z1.shape[0]
        cos_all = (z1_all * z2_all).sum(dim=-1).float() / sigma  # every image's positive, same for both views
        own = cos_all[rank * b:(rank + 1) * b]
        weight = 2 - torch.exp(own - cos_all.logsumexp(dim=0)) * cos_all.shape[0]  # 2 − exp(s_i/σ)/mean exp(s/σ)
        positive = positive * weight.repeat(2)
    return (negatives - positive).mean(), top1(logits, pos_idx)


@register("objective", "dcl", DCLConfig)
class DCLLoss(ViewObjective):
    """DCL over the first two views' projections ``out["z"]``.

    >>> import math
    >>> z = torch.eye(8)   # 8 images whose two views agree and are orthogonal to the others
    >>> loss, metrics = DCLLoss(DCLConfig(temperature=0.5))({"z": [z, z]})
    >>> round(loss.item(), 4), round(math.log(14) - 2, 4)   # positive 2 out of the sum, 14 negatives at 0
    (0.6391, 0.6391)
    """

    def _sigma(self) -> float | None:
        return None

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = (F.normalize(z, dim=-1) for z in out["z"][:2])
        loss, acc = dcl_loss(z1, z2, gather_with_grad(z1), gather_with_grad(z2), self.cfg.temperature, world()[0],
                             self._sigma())
        return loss, {"acc": acc, "embedding_std": embedding_std(out["z"][0])}


@register("objective", "dclw", DCLWConfig)
class DCLWLoss(DCLLoss):
    """DCLW: DCL with each positive term weighted by ``2 − exp(z·z⁺/σ) / mean(exp(z·z⁺/σ))``.

    When every positive pair is equally close the weights are all 1, and DCLW is DCL:

    >>> z = torch.eye(8)
    >>> dclw, _ = DCLWLoss(DCLWConfig(temperature=0.5))({"z": [z, z]})
    >>> dcl, _ = DCLLoss(DCLConfig(temperature=0.5))({"z": [z, z]})
    >>> torch.allclose(dclw, dcl)
    True
    """

    def _sigma(self) -> float | None:
        return self.cfg.sigma
