"""VICReg (Bardes, Ponce & LeCun, 2022): Variance-Invariance-Covariance Regularisation of the two
views' projections, with no negatives, no predictor and no normalisation of the embeddings.

- invariance: ``s = MSE(z1, z2)`` (mean over rows and dimensions),
- variance: ``v(z) = mean_j max(0, γ − sqrt(Var(z_·j) + ε))`` (unbiased variance per dimension),
  ``(v(z1) + v(z2)) / 2``: keeps every dimension's spread above γ, so the embeddings cannot collapse,
- covariance: ``c(z) = Σ_{i≠j} Cov(z)_ij² / D`` (unbiased covariance), ``c(z1) + c(z2)``: decorrelates
  the dimensions,

``loss = λ s + μ v + ν c`` (λ = μ = 25, ν = 1, γ = 1, ε = 1e-4 in the paper).

Across processes, as in the official code: the invariance term is each process's own rows (their
mean over processes is the global batch's), variance and covariance are over the global batch,
gathered with gradient. With DDP's gradient averaging, N processes train exactly as one process on
the whole batch (``tests/dist``). Computed in float32 with autocast off.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.config import spec
from mmcl.dist import gather_with_grad
from mmcl.objectives.barlow import full_precision, off_diagonal
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.infonce import embedding_std
from mmcl.registry import register


@dataclass
class VICRegConfig:
    """``objective: {name: vicreg, sim_coeff: 25, std_coeff: 25, cov_coeff: 1}`` (the paper's weights)."""

    sim_coeff: float = spec(25.0, ge=0, help="λ: weight of the invariance (MSE) term")
    std_coeff: float = spec(25.0, ge=0, help="μ: weight of the variance (std hinge) term")
    cov_coeff: float = spec(1.0, ge=0, help="ν: weight of the covariance term")
    std_target: float = spec(1.0, gt=0, help="γ: the std each dimension is pushed up to")
    eps: float = spec(1e-4, gt=0, help="ε: added to the variance under the square root")


def variance_term(z: torch.Tensor, gamma: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``mean_j max(0, γ − sqrt(Var(z_·j) + ε))`` over the dimensions of ``z`` [N, D] (unbiased variance).

    >>> variance_term(torch.tensor([[0.0, 5.0], [2.0, -5.0]])).item()   # stds √2 and √50: both above 1
    0.0
    >>> round(variance_term(torch.zeros(4, 3)).item(), 4)   # collapsed: 1 − √ε per dimension
    0.99
    """
    return F.relu(gamma - torch.sqrt(z.var(dim=0) + eps)).mean()


def covariance_term(z: torch.Tensor) -> torch.Tensor:
    """``Σ_{i≠j} Cov(z)_ij² / D`` of ``z`` [N, D] (unbiased covariance).

    >>> x = torch.randn(100, 1)
    >>> covariance_term(torch.cat([x, torch.zeros(100, 1)], dim=1)).item()   # uncorrelated dimensions
    0.0
    >>> cov = torch.cov(torch.cat([x, x], dim=1).T)[0, 1]
    >>> torch.allclose(covariance_term(torch.cat([x, x], dim=1)), 2 * cov ** 2 / 2)   # two copies of x
    True
    """
    z = z - z.mean(dim=0)
    cov = z.T @ z / (z.shape[0] - 1)
    return off_diagonal(cov).pow(2).sum() / z.shape[1]


@register("objective", "vicreg", VICRegConfig)
class VICRegLoss(ViewObjective):
    """VICReg over the first two views' projections ``out["z"]``: invariance on this process's rows,
    variance and covariance on the global batch.

    Logs the unweighted terms ``invariance``, ``variance``, ``covariance``, and ``embedding_std``.

    >>> z = torch.randn(64, 4) * 3   # stds about 3: no variance penalty
    >>> loss, metrics = VICRegLoss(VICRegConfig())({"z": [z, z]})   # identical views: no invariance term
    >>> metrics["invariance"].item(), metrics["variance"].item()
    (0.0, 0.0)
    >>> torch.allclose(loss, 2 * covariance_term(z))   # what is left: ν (c(z1) + c(z2))
    True
    """

    couples_batch = True  # the variance and covariance couple every sample of the global batch

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        dtype = torch.promote_types(out["z"][0].dtype, torch.float32)  # float64 stays float64
        with full_precision(out["z"][0]):
            z1, z2 = (z.to(dtype) for z in out["z"][:2])
            invariance = F.mse_loss(z1, z2)
            z1_all, z2_all = gather_with_grad(z1), gather_with_grad(z2)
            variance = sum(variance_term(z, cfg.std_target, cfg.eps) for z in (z1_all, z2_all)) / 2
            covariance = covariance_term(z1_all) + covariance_term(z2_all)
            loss = cfg.sim_coeff * invariance + cfg.std_coeff * variance + cfg.cov_coeff * covariance
        metrics = {"invariance": invariance, "variance": variance, "covariance": covariance}
        return loss, {**{k: v.detach() for k, v in metrics.items()}, "embedding_std": embedding_std(out["z"][0])}
