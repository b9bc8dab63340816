"""Peak memory and time of CLIP's loss (forward + backward), whole logits matrix vs tiles.

    python benchmarks/clip_loss_memory.py [--batches 4096,16384] [--tile 2048] [--dim 512] [--rounds 3]

For each global batch B: the symmetric InfoNCE over B x B logits as ``objective.tile: 0`` computes
it, then ``objective.tile: T`` (:mod:`mmcl.objectives.tiled`), alternating round by round, medians.
Memory is the peak above the features themselves: on a GPU ``torch.cuda.max_memory_allocated``; on
a CPU the peak resident set of a fresh process per measurement, less that of a process that only
makes the features. That is what decides the largest contrastive batch one device can score (with
``train.grad_cache`` the towers need only a chunk's activations; the loss then holds the rest).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


def measure(batch: int, dim: int, tile: int, device: str, loss_too: bool = True) -> dict[str, float]:
    """One forward + backward; peak memory above the features (MiB) and seconds."""
    from mmcl.objectives.clip import clip_loss

    g = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, device=device, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    if loss_too:
        loss, _ = clip_loss(image, text, image, text, scale, 0, local_loss=False, tile=tile)
        loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return {"seconds": seconds, "peak_mib": peak}


def cpu_peak(batch: int, dim: int, tile: int, loss_too: bool) -> dict[str, float]:
    """``measure`` in a fresh process; its peak resident set (MiB) as ``rss_mib``."""
    code = ("import json, resource, sys; sys.path.insert(0, '.'); from benchmarks.clip_loss_memory import measure; "
            f"r = measure({batch}, {dim}, {tile}, 'cpu', {loss_too}); "
            "r['rss_mib'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024; print(json.dumps(r))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="4096,16384")
    ap.add_argument("--tile", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; embedding dim {args.dim}; tile {args.tile}; {args.rounds} alternating rounds, medians")
    print(f"{'batch':>7} {'loss':>12} {'peak MiB':>10} {'seconds':>9}")
    for batch in (int(b) for b in args.batches.split(",")):
        rows: dict[int, list[dict[str, float]]] = {0: [], args.tile: []}
        for _ in range(args.rounds):
            for tile in rows:
                if device == "cuda":
                    rows[tile].append(measure(batch, args.dim, tile, device))
                else:
                    r, base = cpu_peak(batch, args.dim, tile, True), cpu_peak(batch, args.dim, tile, False)
                    rows[tile].append({"seconds": r["seconds"], "peak_mib": r["rss_mib"] - base["rss_mib"]})
        for tile, runs in rows.items():
            label = "whole" if tile == 0 else f"tiles {tile}"
            print(f"{batch:>7} {label:>12} {statistics.median(r['peak_mib'] for r in runs):>10.0f} "
                  f"{statistics.median(r['seconds'] for r in runs):>9.3f}")


if __name__ == "__main__":
    main()
