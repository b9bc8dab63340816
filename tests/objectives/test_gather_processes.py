"""The cross-process gathers of ``mmcl.dist`` and MoCo's shuffle-BN, run for real by two
gloo processes on 127.0.0.1, against values the test computes from each process's known inputs.

This pytest process is rank 0 and one process started with ``torch.multiprocessing`` (spawn: it
inherits this process's ``sys.path`` and environment, so it imports the same code) is rank 1. Rank 0
stays in the test process on purpose: mutation testers such as mutmut record which test reaches a
function only in the test process, so gathers run only in child processes count as untested there.
Each rank runs every collective first and asserts afterwards, so a failing check cannot leave the
other rank waiting in a collective (the group's timeout bounds that case anyway).
"""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.config import from_dict
from mmcl.dist import all_reduce_sum, gather_no_grad, gather_variable, gather_with_grad
from mmcl.registry import build, registered
from mmcl.testing.spawn import free_port, run_with_other_ranks

N = 2  # processes
B, D = 3, 2  # rows per process, columns: unequal, so a slice or a concatenation along the wrong dimension shows
ENCODER = {"backbone": {"name": "cnn", "width": 4, "depth": 2, "norm": "bn"}, "projector": {"dims": [16, 8]}}
TAU, SHUFFLE_SEED = 0.2, 3  # rank 0's permutation of the 6 images with seed 3 mixes the processes' rows


def rows_of(rank: int) -> torch.Tensor:
    """Process ``rank``'s [B, D] input (every process can write down every other's)."""
    return torch.arange(B * D, dtype=torch.float32).reshape(B, D) + 100.0 * rank


def upstream_of(rank: int) -> torch.Tensor:
    """The gradient process ``rank``'s loss sends into the gathered [N·B, D] tensor."""
    return torch.arange(N * B * D, dtype=torch.float32).reshape(N * B, D) * (rank + 1) + 1


# --------------------------------------------------------------------------------------------- what each rank runs
def gathers(rank: int) -> dict[str, Any]:
    """Every gather of ``mmcl.dist`` on this process's inputs (all collectives, no checks)."""
    x = rows_of(rank).requires_grad_()
    gathered = gather_with_grad(x * 1.0)  # a non-leaf, as the projections an objective gathers
    (gathered * upstream_of(rank)).sum().backward()
    ragged = torch.full((rank + 1, D), float(rank))  # evaluation features: one row on rank 0, two on rank 1
    return {"with_grad": gathered.detach(), "requires_grad": gathered.requires_grad, "grad": x.grad,
            "no_grad": gather_no_grad(rows_of(rank).t().contiguous().t()),  # a non-contiguous input
            "sum": all_reduce_sum(torch.tensor([rank + 1.0])), "variable": gather_variable(ragged)}


def build_from(kind: str, name: str, **params: Any) -> Any:
    """What a recipe's ``{kind}: {name: ..., **params}`` section builds."""
    config_cls, _ = registered(kind)[name]
    return build(kind, from_dict(config_cls, params, kind))


def moco_step(rank: int, shuffle_bn: bool) -> dict[str, Any]:
    """One MoCo step of this process's half of a 6-image batch, and what the test needs to check it."""
    torch.manual_seed(0)  # the same model and queue on every process, as DDP's initial broadcast makes them
    model = build_from("model", "encoder", **ENCODER).train()
    objective = build_from("objective", "moco", queue_size=16, momentum=0.9, temperature=TAU, shuffle_bn=shuffle_bn)
    objective.setup(model, 1)
    key_encoder = copy.deepcopy(model)  # the momentum encoder as setup copies it (BatchNorm on batch statistics)
    gen = torch.Generator().manual_seed(1)
    views = [torch.randn(N * B, 3, 8, 8, generator=gen) for _ in range(2)]  # the global batch
    queries = torch.randn(N * B, 8, generator=gen)
    mine = slice(rank * B, (rank + 1) * B)
    queue = objective.queue.keys.clone()
    torch.manual_seed(SHUFFLE_SEED)  # rank 0's draw is the permutation every process uses
    loss, _ = objective({"z": [queries[mine], queries[mine]]}, {"views": [v[mine] for v in views]})
    return {"loss": loss.item(), "queue_before": queue, "queue_after": objective.queue.keys.clone(),
            "ptr": int(objective.queue.ptr), "views": views, "queries": queries, "key_encoder": key_encoder}


def run_rank(rank: int, port: int) -> dict[str, Any]:
    """Join the group as ``rank``, run the gathers and the MoCo steps, leave the group."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N,
                            timeout=timedelta(seconds=30))
    try:
        return {"gathers": gathers(rank), "moco": {s: moco_step(rank, s) for s in (False, True)}}
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------- the checks
def check_gathers(rank: int, got: dict[str, Any]) -> None:
    """Values in rank order; the backward gives each process the sum over processes of the upstream
    gradients of its own rows (the gradient of the sum of all processes' losses)."""
    everyone = torch.cat([rows_of(r) for r in range(N)])
    assert got["with_grad"].dtype == torch.float32 and got["requires_grad"]
    assert torch.equal(got["with_grad"], everyone), f"rank {rank}: gather_with_grad is not in rank order"
    expected_grad = sum(upstream_of(r) for r in range(N))[rank * B:(rank + 1) * B]
    assert got["grad"] is not None and torch.equal(got["grad"], expected_grad), f"rank {rank}: gather backward"
    assert torch.equal(got["no_grad"], everyone), f"rank {rank}: gather_no_grad is not in rank order"
    assert torch.equal(got["sum"], torch.tensor([3.0])), f"rank {rank}: all_reduce_sum"
    assert torch.equal(got["variable"], torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])), f"rank {rank}: ragged"


def check_moco(rank: int, shuffle_bn: bool, got: dict[str, Any]) -> None:
    """Keys come from the momentum encoder run on a cross-process permutation of the batch (shuffle-BN)
    or on this process's own images; the loss uses this process's keys, and every process enqueues
    all processes' keys in rank order."""
    views, encoder, mine = got["views"], got["key_encoder"], slice(rank * B, (rank + 1) * B)
    perm = torch.randperm(N * B, generator=torch.Generator().manual_seed(SHUFFLE_SEED))
    assert set(perm[:B].tolist()) != set(range(B)), "the permutation must mix the processes' images"
    chunks = [perm[r * B:(r + 1) * B] if shuffle_bn else torch.arange(r * B, (r + 1) * B) for r in range(N)]
    keys = torch.empty(N * B, 8)
    with torch.no_grad():
        for rows in chunks:  # each process encodes one chunk: BatchNorm sees that chunk's statistics
            z = encoder({"views": [views[1][rows]]})["z"][0]
            keys[rows] = z / z.norm(dim=-1, keepdim=True)
    q = F.normalize(got["queries"][mine], dim=-1)
    logits = torch.cat([(q * keys[mine]).sum(dim=1, keepdim=True), q @ got["queue_before"].T], dim=1) / TAU
    expected = (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()
    what = f"rank {rank}, shuffle_bn={shuffle_bn}"
    assert abs(got["loss"] - expected.item()) < 1e-5 * max(1.0, abs(expected.item())), f"{what}: loss"
    torch.testing.assert_close(got["queue_after"][:N * B], keys, rtol=1e-5, atol=1e-6, msg=f"{what}: enqueued keys")
    torch.testing.assert_close(got["queue_after"][N * B:], got["queue_before"][N * B:], msg=f"{what}: rest of queue")
    assert got["ptr"] == N * B, f"{what}: queue pointer"


def check_rank(rank: int, got: dict[str, Any]) -> None:
    """Every check of one process's results."""
    check_gathers(rank, got["gathers"])
    for shuffle_bn, step in got["moco"].items():
        check_moco(rank, shuffle_bn, step)


def other_rank(index: int, port: int) -> None:
    """Entry point of the started process: rank ``index + 1``."""
    rank = index + 1
    torch.set_num_threads(1)
    check_rank(rank, run_rank(rank, port))


def test_two_processes_gather_in_rank_order_sum_gradients_and_shuffle_keys() -> None:
    """Rank 0 here, rank 1 in a started process: both check their gathers and MoCo steps."""
    port = free_port()
    run_with_other_ranks(lambda: check_rank(0, run_rank(0, port)), other_rank, N, port)
