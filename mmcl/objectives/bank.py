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

Nothing here waits for the device: the draw count is mirrored on the host, the filled rows are
counted and indexed on the device, and ids outside the bank (a data mistake: an ``id`` above
``bank_size``, or -1 for a sample without one) are clamped for indexing and recorded on the
device by :meth:`MemoryBank.update`; :meth:`MemoryBank.check_ids` raises for them where the trainer
reads the device anyway (logging windows, checkpoints, the end), before any checkpoint is written.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.dist import gather_no_grad, world
from mmcl.errors import DataError
from mmcl.objectives.base import reset_after_load


class MemoryBank(nn.Module):
    """``size`` rows of ``dim``-d unit vectors, initialised at random."""

    def __init__(self, size: int, dim: int, momentum: float = 0.5):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("rows", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("seen", torch.zeros(size, dtype=torch.bool))
        self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        # the draw count on the host, read from the buffer once after construction or a checkpoint's load
        self._host_draws: int | None = None
        # [lowest, highest] id the updates met since the last check_ids, on the device (None: none yet)
        self._id_range: torch.Tensor | None = None
        reset_after_load(self, "_host_draws", None)

    def clamp(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` clamped into the bank, to index it before they are checked: an id beyond it would stop
        a GPU with a device-side assert, and -1 would silently index the last row. :meth:`update` records
        the ids as given, for :meth:`check_ids`."""
        return ids.clamp(0, self.rows.shape[0] - 1)

    def check_ids(self, ids: torch.Tensor | None = None) -> None:
        """Ids must index the bank: a clear error names the size to configure. Checks ``ids``, or without
        them every id :meth:`update` met since the last check (a host synchronisation: the trainer
        calls it where it reads the device anyway)."""
        if ids is None:
            if self._id_range is None:
                return
            (lo, hi), self._id_range = self._id_range.tolist(), None
        elif not ids.numel():
            return
        else:
            lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.rows.shape[0]:
            raise DataError(f"sample ids range {lo}..{hi} but the memory bank has {self.rows.shape[0]} rows: set "
                            "objective.bank_size above the largest training id (samples need an integer 'id' in "
                            "their .json or a numeric key)")

    def check_deferred(self) -> None:
        """:meth:`check_ids` of the ids the updates met (:meth:`mmcl.objectives.base.Objective.check_deferred`)."""
        self.check_ids()

    @torch.compiler.disable
    @torch.no_grad()
    def sample(self, n: int, k: int) -> torch.Tensor:
        """[n, k] row indices drawn uniformly (with replacement) from the filled rows, without waiting
        for the device: 62 random bits per index, reduced modulo the number of filled rows (counted on
        the device) to the rank of a filled row, which the running count of filled rows locates; while
        fewer than ``k`` rows are filled, modulo the number of rows."""
        if self._host_draws is None:
            self._host_draws = int(self.draws)  # once after construction or a checkpoint's load
        device, size = self.rows.device, self.rows.shape[0]
        g = torch.Generator(device=device).manual_seed(self._host_draws * 65537 + world()[0])
        self._host_draws += 1
        self.draws += 1
        bits = torch.randint(1 << 62, (n, k), device=device, generator=g)
        ranks = self.seen.cumsum(0)  # the number of filled rows up to each row
        filled = ranks[-1]
        in_filled = torch.searchsorted(ranks, bits % filled.clamp(min=1) + 1)  # the first row of that rank
        return torch.where(filled >= k, in_filled, bits % size)

    @torch.no_grad()
    def update(self, ids: torch.Tensor, feats: torch.Tensor) -> None:
        """Proximal update of this process's rows ``ids`` with ``feats``, and of every other
        process's (gathered), so each update is applied once on every process. An id given more
        than once gets the update of its last occurrence in the gathered batch: every occurrence
        writes that one (with equal indices CUDA's ``index_put_`` lets any of them win, so banks
        would differ between devices), found by a stable sort of the batch's ids, without waiting for
        the device. The gathered ids' range is recorded for :meth:`check_ids` (the same on every
        process, so all raise together); ids outside the bank update the clamped rows until then."""
        ids, feats = gather_no_grad(ids), gather_no_grad(F.normalize(feats.detach().float(), dim=1))
        if ids.numel():
            lo_hi = torch.stack(torch.aminmax(ids))
            self._id_range = lo_hi if self._id_range is None else torch.stack(
                [torch.minimum(self._id_range[0], lo_hi[0]), torch.maximum(self._id_range[1], lo_hi[1])])
        ids = self.clamp(ids)
        mixed = self.momentum * self.rows[ids] + (1.0 - self.momentum) * feats.to(self.rows.dtype)
        by_id, order = torch.sort(ids, stable=True)  # equal ids stay in batch order
        last = order[torch.searchsorted(by_id, ids, right=True) - 1]  # each id's last position
        self.rows[ids] = F.normalize(mixed, dim=1)[last]
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
