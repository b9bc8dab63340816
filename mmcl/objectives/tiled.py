"""InfoNCE over a logits matrix too large to hold: computed in tiles, recomputed in the backward pass.

CLIP's loss at a global batch N scores every row against N columns: a [B, N] logits matrix (and as
much again for its softmax and gradient) per direction. At N = 65,536 on one device (with
``train.grad_cache``) that is 16 GiB per float32 matrix. :func:`tiled_info_nce` walks the matrix in
``tile`` x ``tile`` blocks: the forward pass keeps only each row's log-sum-exp, the backward pass
recomputes each block's logits from the features to form ``softmax - onehot`` there. Memory is
O(tile x tile + (B + N) x D), compute one extra matrix product per block; the value and gradients
are those of :func:`mmcl.objectives.infonce.info_nce` on the whole matrix (tested in float64).
:func:`tiled_symmetric_info_nce` does both of CLIP's directions over one square matrix in one walk.
Blocks are computed in float32 whatever the features' dtype.
"""

from __future__ import annotations

from typing import Any

import torch


def _blocks(n: int, tile: int) -> list[tuple[int, int]]:
    return [(start, min(n, start + tile)) for start in range(0, n, tile)]


class _TiledInfoNCE(torch.autograd.Function):
    """Mean over rows of ``logsumexp_j(s q_i.k_j) - s q_i.k_{t_i}``, and the share of rows whose
    highest logit is the target (no gradient)."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(q.device.type, enabled=False):  # float32 blocks, also under bf16 autocast
            return _TiledInfoNCE._forward(ctx, q, k, scale, targets, tile)

    @staticmethod
    def _forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                 tile: int) -> tuple[torch.Tensor, torch.Tensor]:
        qf, kf, s = q.float(), k.float(), scale.float()
        lse = torch.empty(q.shape[0], device=q.device, dtype=torch.float32)
        hits = torch.zeros((), device=q.device, dtype=torch.float32)
        for i0, i1 in _blocks(q.shape[0], tile):
            parts, best, arg = [], None, None
            for j0, j1 in _blocks(k.shape[0], tile):
                logits = s * (qf[i0:i1] @ kf[j0:j1].T)
                parts.append(torch.logsumexp(logits, dim=1))
                value, index = logits.max(dim=1)
                if best is None:
                    best, arg = value, index + j0
                else:  # the first maximum wins ties, as argmax over the whole row does
                    better = value > best
                    best, arg = torch.where(better, value, best), torch.where(better, index + j0, arg)
            lse[i0:i1] = torch.logsumexp(torch.stack(parts), dim=0)
            hits += (arg == targets[i0:i1]).sum()
        positive = s * (qf * kf[targets]).sum(dim=1)
        ctx.save_for_backward(qf, kf, s, targets, lse)
        ctx.tile, ctx.dtypes = tile, (q.dtype, k.dtype, scale.dtype)
        return (lse - positive).mean(), hits / q.shape[0]

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, _grad_acc: torch.Tensor) -> tuple[Any, ...]:
        with torch.autocast(grad_loss.device.type, enabled=False):
            return _TiledInfoNCE._backward(ctx, grad_loss)

    @staticmethod
    def _backward(ctx: Any, grad_loss: torch.Tensor) -> tuple[Any, ...]:
        qf, kf, s, targets, lse = ctx.saved_tensors
        b = qf.shape[0]
        dq, dk = torch.zeros_like(qf), torch.zeros_like(kf)
        ds = torch.zeros((), device=qf.device, dtype=torch.float32)
        g = grad_loss.float() / b
        for i0, i1 in _blocks(b, ctx.tile):
            t = targets[i0:i1]
            for j0, j1 in _blocks(kf.shape[0], ctx.tile):
                dots = qf[i0:i1] @ kf[j0:j1].T
                grad = torch.exp(s * dots - lse[i0:i1, None])  # softmax of the block's rows
                # minus the one-hot target: 1 at each row's target column where it is in the block, else 0 at
                # a column of the block (clamped); a masked index of the rows would wait for the device
                col = (t - j0).clamp(0, j1 - j0 - 1)[:, None]
                here = ((t >= j0) & (t < j1)).to(grad.dtype)[:, None]
                grad.scatter_(1, col, grad.gather(1, col) - here)
                grad *= g
                dq[i0:i1] += s * (grad @ kf[j0:j1])
                dk[j0:j1] += s * (grad.T @ qf[i0:i1])
                ds += (grad * dots).sum()
        q_dtype, k_dtype, s_dtype = ctx.dtypes
        return dq.to(q_dtype), dk.to(k_dtype), ds.to(s_dtype).reshape(s.shape), None, None


def tiled_info_nce(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor,
                   tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of rows ``q`` [B, D] against columns ``k`` [N, D] at logit scale ``scale`` (1/τ), row i's
    positive being column ``targets[i]``, in ``tile`` x ``tile`` blocks; returns (mean loss, top-1
    accuracy). Equal to ``info_nce(scale * q @ k.T, targets)`` without holding the [B, N] matrix."""
    return _TiledInfoNCE.apply(q, k, scale, targets, tile)


class _TiledSymmetricInfoNCE(torch.autograd.Function):
    """CLIP's symmetric loss over one square matrix ``s a @ b.T`` with the diagonal as targets: each
    block serves both directions (its rows' and its columns' log-sum-exp), so the tiled loss costs
    one matrix product per block forward and three backward, against three for the whole matrix."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.autocast(a.device.type, enabled=False):
            af, bf, s = a.float(), b.float(), scale.float()
            n, dev = a.shape[0], a.device
            row_lse = torch.empty(n, device=dev)
            col_lse = torch.full((n,), float("-inf"), device=dev)
            col_best = torch.full((n,), float("-inf"), device=dev)
            col_arg = torch.zeros(n, dtype=torch.long, device=dev)
            row_hits = torch.zeros((), device=dev)
            for i0, i1 in _blocks(n, tile):
                parts, best, arg = [], None, None
                for j0, j1 in _blocks(n, tile):
                    logits = s * (af[i0:i1] @ bf[j0:j1].T)
                    parts.append(torch.logsumexp(logits, dim=1))
                    col_lse[j0:j1] = torch.logaddexp(col_lse[j0:j1], torch.logsumexp(logits, dim=0))
                    value, index = logits.max(dim=1)
                    better = value > best if best is not None else torch.ones_like(value, dtype=torch.bool)
                    best = value if best is None else torch.where(better, value, best)
                    arg = index + j0 if arg is None else torch.where(better, index + j0, arg)
                    cvalue, cindex = logits.max(dim=0)
                    cbetter = cvalue > col_best[j0:j1]  # earlier row blocks win ties, as argmax does
                    col_best[j0:j1] = torch.where(cbetter, cvalue, col_best[j0:j1])
                    col_arg[j0:j1] = torch.where(cbetter, cindex + i0, col_arg[j0:j1])
                row_lse[i0:i1] = torch.logsumexp(torch.stack(parts), dim=0)
                row_hits += (arg == torch.arange(i0, i1, device=dev)).sum()
            positive = s * (af * bf).sum(dim=1)
            loss = 0.5 * ((row_lse - positive).mean() + (col_lse - positive).mean())
            col_hits = (col_arg == torch.arange(n, device=dev)).sum()
        ctx.save_for_backward(af, bf, s, row_lse, col_lse)
        ctx.tile, ctx.dtypes = tile, (a.dtype, b.dtype, scale.dtype)
        return loss, row_hits / n, col_hits.float() / n

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: torch.Tensor) -> tuple[Any, ...]:
        af, bf, s, row_lse, col_lse = ctx.saved_tensors
        with torch.autocast(af.device.type, enabled=False):
            n = af.shape[0]
            da, db = torch.zeros_like(af), torch.zeros_like(bf)
            ds = torch.zeros((), device=af.device)
            half = 0.5 * grad_loss.float() / n
            for i0, i1 in _blocks(n, ctx.tile):
                for j0, j1 in _blocks(n, ctx.tile):
                    dots = af[i0:i1] @ bf[j0:j1].T
                    logits = s * dots
                    grad = torch.exp(logits - row_lse[i0:i1, None]) + torch.exp(logits - col_lse[None, j0:j1])
                    lo, hi = max(i0, j0), min(i1, j1)
                    if lo < hi:  # the block holds part of the diagonal: minus both one-hot targets
                        diag = torch.arange(lo, hi, device=af.device)
                        grad[diag - i0, diag - j0] -= 2
                    grad *= half
                    da[i0:i1] += s * (grad @ bf[j0:j1])
                    db[j0:j1] += s * (grad.T @ af[i0:i1])
                    ds += (grad * dots).sum()
        a_dtype, b_dtype, s_dtype = ctx.dtypes
        return da.to(a_dtype), db.to(b_dtype), ds.to(s_dtype).reshape(s.shape), None


def tiled_symmetric_info_nce(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor,
                             tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CLIP's symmetric InfoNCE of paired rows ``a``, ``b`` [N, D] (pair i is row i of both) in
    ``tile`` x ``tile`` blocks; returns (loss, a→b top-1, b→a top-1). Equal to
    ``symmetric_info_nce(L, L.T, arange(N))`` with ``L = scale * a @ b.T``, without holding ``L``."""
    return _TiledSymmetricInfoNCE.apply(a, b, scale, tile)
