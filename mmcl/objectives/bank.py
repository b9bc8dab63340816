"""A memory bank of per-sample features (InstDisc, CMC), and the NCE losses that use it.

The bank holds one L2-normalised row per training sample, indexed by the stable sample id from
the shard's ``.json``. After each step the rows of the whole global batch are updated on every
process with the proximal rule ``m ← normalise(μ m + (1 - μ) v)``, so the banks stay identical
everywhere; an id that occurs more than once in the global batch takes the update of its last
occurrence (the highest rank's, that rank's latest sample), on every device alike. Negatives
are drawn uniformly from the rows that already hold a sample's feature (from all rows until ``k``
of them do): with dense ids this is the paper's uniform draw over the dataset once an epoch has
passed, and ids that never occur (a split of a larger id range) never serve as random-vector
negatives. The draws come from the bank's own generator, seeded by (draw count, rank), so a
resumed run draws what the uninterrupted run drew.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.dist import gather_no_grad, world
from mmcl.errors import DataError


class MemoryBank(nn.Module):
    """``size`` rows of ``dim``-d unit vectors, initialised at random."""

    def __init__(self, size: int, dim: int, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("seen", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))

    def check_ids(self, ids: torch.Tensor) -> None:
        """Ids must index the bank: a clear error names the size to configure."""
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.rows.shape[0]):
            raise DataError(f"sample ids range {int(ids.min())}..{int(ids.max())} but the memory bank has "
                            f"{self.rows.shape[0]} rows: set objective.bank_size above the largest training id "
                            "(samples need an integer 'id' in their .json or a numeric key)")

    @torch.no_grad()
    def sample(self, n: int, k: int) -> torch.Tensor:
        """[n, k] row indices drawn uniformly (with replacement) from the filled rows."""
        g = torch.Generator(device=self.rows.device).manual_seed(int(self.draws) * 65537 + world()[0])
        self.draws += 1
        filled = self.seen.nonzero().squeeze(1)
        if filled.numel() < k:
            return torch.randint(self.rows.shape[0], (n, k), device=self.rows.device, generator=g)
        return filled[torch.randint(filled.numel(), (n, k), device=self.rows.device, generator=g)]

    @torch.no_grad()
    def update(self, ids: torch.Tensor, feats: torch.Tensor) -> None:
        """Proximal update of this process's rows ``ids`` with ``feats``, and of every other
        process's (gathered), so each update is applied once on every process. An id given more
        than once gets the update of its last occurrence in the gathered batch: every occurrence
        writes that one (with equal indices CUDA's ``index_put_`` lets any of them win, so banks
        would differ between devices), found with tensor operations, without waiting for the device."""
        ids, feats = gather_no_grad(ids), gather_no_grad(F.normalize(feats.detach().float(), dim=1))
        mixed = self.momentum * self.rows[ids] + (1.0 - self.momentum) * feats.to(self.rows.dtype)
        positions = torch.arange(ids.shape[0], device=ids.device)
        last = torch.full(self.seen.shape, -1, dtype=torch.long, device=ids.device)
        last.scatter_reduce_(0, ids, positions, "amax")  # each id's last position
        self.rows[ids] = F.normalize(mixed, dim=1)[last[ids]]
        self.seen[ids] = True


def bank_logits(v: torch.Tensor, rows: torch.Tensor, pos_ids: torch.Tensor, neg_idx: torch.Tensor,
                temperature: float) -> torch.Tensor:
    """[B, 1 + K] scores ``v·m / τ`` of normalised features ``v`` against their own bank row
    (column 0) and ``K`` sampled rows each (``neg_idx`` [B, K]); in at least float32."""
    dtype = torch.promote_types(v.dtype, rows.dtype)
    v, rows = v.to(dtype), rows.to(dtype)
    pos = (v * rows[pos_ids]).sum(dim=1, keepdim=True)
    neg = torch.einsum("bd,bkd->bk", v, rows[neg_idx])
    return torch.cat([pos, neg], dim=1) / temperature


def nce_loss(logits: torch.Tensor, log_z: torch.Tensor, bank_size: int) -> torch.Tensor:
    """Noise-contrastive estimation (Wu et al., 2018, Eq. 5): with ``P = exp(logit) / Z`` and noise
    ``Pn = 1/N``, ``h = P / (P + K Pn)``; loss ``-log h(pos) - Σ_neg log(1 - h(neg))``, batch mean.
    ``log_z`` is the log normaliser (fixed after the first batch, as in the paper)."""
    k = logits.shape[1] - 1
    log_p = logits - log_z
    log_noise = torch.full((), k / bank_size, dtype=log_p.dtype, device=log_p.device).log()  # no host copy
    denom = torch.logaddexp(log_p, log_noise.expand_as(log_p))
    return -((log_p[:, 0] - denom[:, 0]) + (log_noise - denom[:, 1:]).sum(dim=1)).mean()
