"""SigLIP across 3 real gloo processes on 127.0.0.1, every exchange and chunk mode, against the
float64 hand reference of ``test_siglip_loss`` on the global batch.

Three processes, not two: with two, a process's left and right neighbours are the same process, so
a ring that passed blocks or gradients the wrong way round would still be right. This pytest
process is rank 0 and two processes started with ``torch.multiprocessing`` (spawn) are ranks 1
and 2, as in ``test_gather_processes`` (mutation testers see only what runs in the test process).
Each rank runs every loss first and asserts afterwards, so a failing check cannot leave the others
waiting in a collective (the group's timeout bounds that case anyway).

What each process must get, with ``L_r`` its loss (its images against every process's texts) and
``L = mean_r L_r`` the loss of one process on the global batch:

- its loss ``L_r`` (so the processes' mean is ``L``);
- for its image features, ``∂L_r/∂x_r``; for its text features, ``Σ_r' ∂L_r'/∂t_r`` (every process's
  loss uses them): DDP's mean over processes then gives ``∂L``;
- for the scale and the bias, ``∂L_r/∂s`` and ``∂L_r/∂b``, whose mean is ``∂L/∂s`` and ``∂L/∂b``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mmcl.objectives.siglip import SigLipConfig, SigLipLoss
from mmcl.testing.spawn import free_port, run_with_other_ranks

from .test_siglip_loss import IDS, MODES, features, reference_siglip, run

N, B, D = 3, 2, 4  # processes, rows per process, feature size
SCALE, BIAS = 6.0, -2.5


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The [N·B, D] image and text features of the global batch (every process can write them down)."""
    return features(n=N * B, d=D, seed=3)


def run_rank(rank: int, port: int) -> dict[str, Any]:
    """Join the group as ``rank`` and run every mode on this process's rows of the global batch."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=N,
                            timeout=timedelta(seconds=30))
    try:
        image, text = global_batch()
        mine = slice(rank * B, (rank + 1) * B)
        return {name: run(SigLipLoss(cfg), image[mine], text[mine], SCALE, BIAS) for name, cfg in zip(IDS, MODES)}
    finally:
        dist.destroy_process_group()


def check_rank(rank: int, got: dict[str, Any]) -> None:
    """Every mode gives this process its share of the global loss and gradients (see the module docstring)."""
    image, text = global_batch()
    per_rank = [reference_siglip(image[r * B:(r + 1) * B].tolist(), text.tolist(), SCALE, BIAS, positive_from=r * B)
                for r in range(N)]
    loss, ref = per_rank[rank]
    text_grad = sum(torch.tensor(g["text"], dtype=torch.float64) for _, g in per_rank)[rank * B:(rank + 1) * B]
    global_loss, _ = reference_siglip(image.tolist(), text.tolist(), SCALE, BIAS)
    assert abs(sum(lo for lo, _ in per_rank) / N - global_loss) < 1e-12  # the processes' losses average to L
    for name, (got_loss, _, grads) in got.items():
        what = f"rank {rank}, {name}"
        assert abs(got_loss.item() - loss) < 1e-12, f"{what}: loss {got_loss.item()} != {loss}"
        torch.testing.assert_close(grads["image"], torch.tensor(ref["image"], dtype=torch.float64), rtol=1e-10,
                                   atol=1e-12, msg=f"{what}: image gradient")
        torch.testing.assert_close(grads["text"], text_grad, rtol=1e-10, atol=1e-12, msg=f"{what}: text gradient")
        assert abs(grads["scale"].item() - ref["scale"]) < 1e-12, f"{what}: scale gradient"
        assert abs(grads["bias"].item() - ref["bias"]) < 1e-12, f"{what}: bias gradient"


def other_rank(index: int, port: int) -> None:
    """Entry point of a started process: rank ``index + 1``."""
    rank = index + 1
    torch.set_num_threads(1)
    check_rank(rank, run_rank(rank, port))


def test_three_processes_share_the_global_loss_and_gradients_in_every_mode() -> None:
    """Rank 0 here, ranks 1 and 2 in started processes: each checks its loss and gradients."""
    assert SigLipConfig().exchange == "gather" and {c.exchange for c in MODES} == {"gather", "ring"}
    port = free_port()
    run_with_other_ranks(lambda: check_rank(0, run_rank(0, port)), other_rank, N, port)


def test_the_memory_benchmark_runs_and_its_variants_agree() -> None:
    """``benchmarks/siglip_processes_memory.py`` at a tiny size, 1 and 2 processes: it checks that open_clip's
    loss and mmcl's exchanges agree before it measures (and exits 1 if not), and prints the growth table."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "benchmarks/siglip_processes_memory.py", "--processes", "1,2",
                          "--batch", "32", "--dim", "8", "--tile", "8", "--rounds", "1"],
                         cwd=root, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "2 process(es), global batch 64: variants agree" in run.stdout
    assert "mmcl ring" in run.stdout.split("peak per process from 1 to 2 processes:")[1]
