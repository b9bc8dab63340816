"""Barlow Twins (Zbontar et al., 2021): the cross-correlation matrix of the two views' batch-normalised
projections is pushed towards the identity, so each dimension is invariant to the augmentation
(diagonal 1) and carries information the other dimensions do not (off-diagonal 0). No negatives, no
predictor, no momentum target.

``C = BN(z1)ᵀ BN(z2) / N`` over the N rows of the global batch (BN: per dimension, mean 0 and
biased variance 1, ``eps`` as ``nn.BatchNorm1d``), ``loss = Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²``.

Across processes the projections are gathered with gradient and every process computes the loss of
the whole batch (the official code normalises with SyncBatchNorm and all-reduces ``C``: the same
global statistics): with DDP's gradient averaging, N processes train exactly as one process on the
whole batch (``tests/dist``). The loss is computed in float32 with autocast off, the D×D
correlations being too coarse in bfloat16.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from mmcl.config import spec
from mmcl.dist import gather_with_grad
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.infonce import embedding_std
from mmcl.registry import register


@dataclass
class BarlowTwinsConfig:
    """``objective: {name: barlow_twins, lambd: 0.0051}`` (the paper's λ for an 8192-d projector)."""

    lambd: float = spec(0.0051, ge=0, help="λ: weight of the off-diagonal (redundancy reduction) term")
    eps: float = spec(1e-5, gt=0, help="added to each dimension's variance before normalising (nn.BatchNorm1d's)")


def full_precision(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``t``'s device while it is on there (float32 matmuls under a bf16 recipe), else
    nothing to do (devices without autocast, such as meta).

    >>> with torch.autocast("cpu", dtype=torch.bfloat16), full_precision(torch.ones(1)):
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.float32
    """
    on = t.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(t.device.type)
    return torch.autocast(t.device.type, enabled=False) if on else contextlib.nullcontext()


def standardize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each column to mean 0 and (biased) variance 1 over the rows: ``nn.BatchNorm1d(affine=False)``
    in training mode.

    >>> z = standardize(torch.randn(64, 3) * 5 + 2)
    >>> z.mean(0).abs().max() < 1e-5, ((z ** 2).mean(0) - 1).abs().max() < 1e-4
    (tensor(True), tensor(True))
    """
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (the official code's trick: dropping
    the last entry, rows of n + 1 start with a diagonal entry).

    >>> off_diagonal(torch.arange(9.0).view(3, 3))
    tensor([1., 2., 3., 5., 6., 7.])
    """
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()


def barlow_twins_loss(z1: torch.Tensor, z2: torch.Tensor, lambd: float,
                      eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``Σ_i (1 − C_ii)² + λ Σ_{i≠j} C_ij²`` of the cross-correlation ``C`` of the standardised
    ``z1``, ``z2`` ([N, D], the whole batch). Returns the loss and its two sums (unweighted).

    Perfectly correlated views with uncorrelated dimensions score 0:

    >>> z = standardize(torch.linalg.qr(torch.randn(16, 4))[0])   # 16 rows, 4 orthogonal columns
    >>> loss, terms = barlow_twins_loss(z, 2 * z + 1, lambd=0.0051)
    >>> round(loss.item(), 4), round(terms["on_diag"].item(), 4)
    (0.0, 0.0)
    """
    c = standardize(z1, eps).T @ standardize(z2, eps) / z1.shape[0]
    on_diag = (1 - c.diagonal()).pow(2).sum()
    off_diag = off_diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()}


@register("objective", "barlow_twins", BarlowTwinsConfig)
class BarlowTwinsLoss(ViewObjective):
    """Barlow Twins over the first two views' projections ``out["z"]``, on the global batch.

    Logs ``on_diag`` (invariance: Σ(1 − C_ii)²), ``off_diag`` (redundancy: Σ_{i≠j} C_ij², before λ)
    and ``embedding_std``.

    >>> torch.manual_seed(0); z = torch.randn(32, 8)
    <torch._C.Generator object at ...>
    >>> loss, metrics = BarlowTwinsLoss(BarlowTwinsConfig())({"z": [z, z]})   # identical views
    >>> round(metrics["on_diag"].item(), 6), round(loss.item(), 6) == round(0.0051 * metrics["off_diag"].item(), 6)
    (0.0, True)
    """

    couples_batch = True  # the batch statistics and C couple every sample of the global batch

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z1, z2 = out["z"][:2]
        dtype = torch.promote_types(z1.dtype, torch.float32)  # float64 stays float64
        with full_precision(z1):
            z1_all, z2_all = (gather_with_grad(z.to(dtype)) for z in (z1, z2))
            loss, terms = barlow_twins_loss(z1_all, z2_all, self.cfg.lambd, self.cfg.eps)
        return loss, {**terms, "embedding_std": embedding_std(z1)}
