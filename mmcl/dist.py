"""Process topology in one place: this process's rank and the world size, and the cross-process
gathers (and SigLIP's ring pass) that data, objectives and evaluation share.

Everything here is an identity on one process, so a loss or an evaluation runs unchanged in a
plain Python session. ``gather_with_grad`` lets each process's loss see every negative while
gradients still flow back to the process that produced each row.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world(*, launcher: bool = False) -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one.

    ``launcher=True``: without a process group yet, the launcher's ``RANK`` and ``WORLD_SIZE``
    environment variables (``torchrun``, ``accelerate launch``), so a data loader built before the
    group exists still reads only its own shards. Collectives never use that fallback: with no
    group there is nobody to gather from, so they use the default ``world()``.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if launcher:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0; backward sums the incoming gradients over processes and keeps
    this process's slice, i.e. the exact gradient of the sum of all processes' losses."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.rank, ctx.n = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes (rank order), differentiably. Identity for one process.

    Every process must pass a tensor of the same shape.
    """
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from all processes without gradient (queues, banks, statistics)."""
    if world()[1] == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over all processes, in place and returned (no gradient; statistics such as
    Sinkhorn's marginals, DINO's centre, the NCE normaliser). Identity for one process."""
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@torch.no_grad()
def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs between processes (evaluation features)."""
    if world()[1] == 1:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = gather_no_grad(n).tolist()
    padded = torch.zeros((max(sizes), *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: x.shape[0]] = x
    parts = gather_no_grad(padded).split(max(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def pass_right(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Send ``tensors`` to the next process of the ring (rank + 1) and receive the previous one's
    (no gradient: SigLIP's ring exchange sends gradients back itself). The identity on one process."""
    rank, n = world()
    if n == 1:
        return list(tensors)
    received = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t.contiguous(), (rank + 1) % n, tag=k) for k, t in enumerate(tensors)]
    ops += [dist.P2POp(dist.irecv, r, (rank - 1) % n, tag=k) for k, r in enumerate(received)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received
