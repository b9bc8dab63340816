"""SigLIP's loss memory per process as processes are added, at a fixed batch per process: open_clip's
``SigLipLoss`` (its default neighbour exchange, ``bidir``) against mmcl's ``objective.exchange:
gather`` and ``ring`` (and ``ring`` with ``objective.tile``).

    python benchmarks/siglip_processes_memory.py [--processes 1,2,4] [--batch 4096] [--dim 512]
                                                 [--tile 1024] [--rounds 3] [--results FILE]

The issue's claim to check: with the ring no process ever holds the global logits, so the loss's
memory per process stays flat as processes are added, where open_clip's users see it grow (its
exchange keeps every neighbour block's logits for the backward). For each number of processes N,
N real processes on one gloo group (one per GPU on a machine with N GPUs: NCCL) each score their
own ``--batch`` images against all N·B texts, forward and backward, every variant in turn,
``--rounds`` times; rank 0 prints the medians of the largest per-process peak:

- memory: the peak above what the process held before the step (its features, the weights of
  nothing else). On a CPU the peak resident set (Linux ``VmHWM``, reset before each step through
  ``/proc/self/clear_refs``), with large allocations served by ``mmap`` so that freed memory
  leaves the resident set; on a GPU ``torch.cuda.max_memory_allocated``;
- seconds per step (on a CPU, N processes share the machine's cores, and every large allocation
  pays its page faults under the mapping set for the memory reading, which weighs on the variants
  that allocate more: a rough guide only);
- before timing, every variant's loss and gradients are checked against mmcl's ``gather`` on the
  same features (largest relative difference printed; above 1e-4 the script stops), so the same
  computation is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
BIAS, SCALE = -10.0, 10.0  # SigLIP's start


def variants(tile: int) -> dict[str, tuple[str, int]]:
    """label: (exchange, tile); exchange ``open_clip`` is open_clip's SigLipLoss."""
    return {"open_clip SigLipLoss (bidir)": ("open_clip", 0), "mmcl gather": ("gather", 0),
            "mmcl ring": ("ring", 0), f"mmcl ring, tile {tile}": ("ring", tile)}


def loss_of(exchange: str, tile: int, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor,
            bias: torch.Tensor) -> torch.Tensor:
    """This process's loss over its images against the global batch's texts (mmcl's normalisation:
    divided by the local batch, as open_clip's)."""
    if exchange == "open_clip":
        from open_clip.loss import SigLipLoss as OpenClipSigLip

        rank, size = dist.get_rank(), dist.get_world_size()
        return OpenClipSigLip(rank=rank, world_size=size)(image, text, scale, bias)
    from mmcl.objectives.siglip import SigLipConfig, SigLipLoss

    out = {"image_features": image, "text_features": text, "logit_scale": scale, "logit_bias": bias}
    return SigLipLoss(SigLipConfig(exchange=exchange, tile=tile))(out)[0]


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


class Peak:
    """The step's peak memory above what was held when it started, in MiB (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> Peak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _kib("VmRSS") * 1024
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _kib("VmHWM") * 1024
        self.seconds = time.perf_counter() - self.start
        self.mib = (peak - self.base) / 2**20


def features(batch: int, dim: int, rank: int, device: torch.device) -> list[torch.Tensor]:
    """This process's unit image and text features (made without large temporaries), scale and bias."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for _ in range(2):
        x = torch.randn(batch, dim, generator=g).to(device)
        x /= x.norm(dim=-1, keepdim=True)
        out.append(x.requires_grad_())
    return [*out, torch.tensor(SCALE, device=device, requires_grad=True),
            torch.tensor(BIAS, device=device, requires_grad=True)]


def step(spec: tuple[str, int], leaves: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Forward and backward of one variant (the leaves' gradients cleared before: by the caller, outside
    the measurement); the loss and the leaves' gradients."""
    loss = loss_of(*spec, *leaves)
    loss.backward()
    return loss.detach(), [x.grad for x in leaves]


def rank_main(rank: int, size: int, port: int, args: argparse.Namespace, queue: mp.Queue) -> None:
    """One process (``rank``: the index torch's process starter passes): check the variants agree, then
    measure each in turn, ``rounds`` times."""
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= size
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size)
    leaves = features(args.batch, args.dim, rank, device)
    chosen = variants(args.tile)
    def clear() -> None:
        for x in leaves:
            x.grad = None

    clear()
    reference = step(chosen["mmcl gather"], leaves)
    worst = 0.0
    for spec in chosen.values():  # also the warm-up: lazy buffers of the process group
        clear()
        loss, grads = step(spec, leaves)
        worst = max(worst, (loss - reference[0]).abs().item() / reference[0].abs().item(),
                    *((a - b).norm().item() / b.norm().item() for a, b in zip(grads, reference[1])))
    del reference, loss, grads
    rows: dict[str, list[tuple[float, float]]] = {label: [] for label in chosen}
    for _ in range(args.rounds):
        for label, spec in chosen.items():
            clear()  # the last variant's gradients are not this one's to free
            dist.barrier()
            with Peak(device) as peak:
                step(spec, leaves)
            rows[label].append((peak.mib, peak.seconds))
    everyone: list = [None] * size
    dist.all_gather_object(everyone, {"worst": worst, "rows": rows})
    if rank == 0:
        queue.put(everyone)
    dist.barrier()
    dist.destroy_process_group()


def measure(size: int, args: argparse.Namespace) -> dict:
    """Run ``size`` processes; per variant the median over rounds of the largest peak among processes."""
    from mmcl.testing.spawn import free_port

    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # freed buffers leave the resident set
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(rank_main, args=(size, free_port(), args, queue), nprocs=size, join=False,
                               start_method="spawn")
    everyone = queue.get(timeout=3600)
    procs.join()
    worst = max(r["worst"] for r in everyone)
    result = {"processes": size, "largest_difference": worst, "variants": {}}
    for label in everyone[0]["rows"]:
        rounds = len(everyone[0]["rows"][label])
        mib = [max(r["rows"][label][i][0] for r in everyone) for i in range(rounds)]
        sec = [max(r["rows"][label][i][1] for r in everyone) for i in range(rounds)]
        result["variants"][label] = {"peak_mib": round(statistics.median(mib), 1),
                                     "seconds": round(statistics.median(sec), 3)}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", default="1,2,4")
    ap.add_argument("--batch", type=int, default=4096, help="images (and texts) per process")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--tile", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", type=Path, default=None, help="append the run to the JSON list in this file")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    print(f"{torch.cuda.get_device_name() if cuda else 'CPU'}, torch {torch.__version__}; batch {args.batch} "
          f"per process, dim {args.dim}, float32; medians of {args.rounds} rounds of the largest per-process peak",
          flush=True)
    results = []
    for size in (int(n) for n in args.processes.split(",")):
        if cuda and 1 < size > torch.cuda.device_count():
            print(f"{size} processes: skipped (one GPU per process, {torch.cuda.device_count()} here)")
            continue
        r = measure(size, args)
        results.append(r)
        print(f"{size} process(es), global batch {size * args.batch}: variants agree to "
              f"{r['largest_difference']:.1e} (relative)", flush=True)
        if not r["largest_difference"] < 1e-4:  # not the same computation: the figures would mean nothing
            sys.exit(f"the variants disagree by {r['largest_difference']:.1e} (loss or gradients)")
        for label, v in r["variants"].items():
            print(f"  {label:32s} peak {v['peak_mib']:8.1f} MiB  {v['seconds']:7.3f} s", flush=True)
    if len(results) > 1:
        first, last = results[0], results[-1]
        print(f"peak per process from {first['processes']} to {last['processes']} processes:")
        for label in first["variants"]:
            a, b = first["variants"][label]["peak_mib"], last["variants"][label]["peak_mib"]
            print(f"  {label:32s} {a:8.1f} -> {b:8.1f} MiB  ({b / max(a, 1e-9):.2f}x)")
    if args.results:
        earlier = json.loads(args.results.read_text()) if args.results.is_file() else []
        earlier.append({"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        "command": shlex.join(["python", *sys.argv]),
                        "device": torch.cuda.get_device_name() if cuda else f"cpu x{os.cpu_count()}",
                        "torch": torch.__version__, "batch_per_process": args.batch, "dim": args.dim,
                        "results": results})
        args.results.write_text(json.dumps(earlier, indent=1) + "\n")


if __name__ == "__main__":
    main()
