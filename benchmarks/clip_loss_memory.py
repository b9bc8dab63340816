"""Peak memory and time of CLIP's loss (forward + backward): open_clip's ``ClipLoss``, mmcl's whole
logits matrix, mmcl's tiles.

    python benchmarks/clip_loss_memory.py [--batches 4096,16384] [--tile 2048] [--dim 512] [--rounds 3]

For each global batch B: open_clip's ``ClipLoss`` (one process), the symmetric InfoNCE over B x B
logits as ``objective.tile: 0`` computes it, then ``objective.tile: T``
(:mod:`mmcl.objectives.tiled`), alternating round by round, medians. First, on a small batch, the
gradients of all three are compared (largest difference printed).
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

BIAS = -10.0  # SigLIP's start


def loss_of(kind: str, image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, tile: int) -> torch.Tensor:
    """CLIP's symmetric loss (``open_clip``: its ClipLoss; ``mmcl``: with ``tile``, 0 the whole matrix)
    or SigLIP's sigmoid loss (``open_clip siglip``: its SigLipLoss; ``mmcl siglip``: ``objective.tile``)."""
    if kind == "open_clip":
        from open_clip.loss import ClipLoss

        return ClipLoss()(image, text, scale)
    if kind == "open_clip siglip":
        from open_clip.loss import SigLipLoss

        return SigLipLoss()(image, text, scale, torch.tensor(BIAS, device=image.device))
    if kind == "mmcl siglip":
        from mmcl.objectives.siglip import SigLipConfig, SigLipLoss

        out = {"image_features": image, "text_features": text, "logit_scale": scale,
               "logit_bias": torch.tensor(BIAS, device=image.device)}
        return SigLipLoss(SigLipConfig(tile=tile))(out)[0]
    from mmcl.objectives.clip import clip_loss

    return clip_loss(image, text, image, text, scale, 0, local_loss=False, tile=tile)[0]


def check_gradients(tile: int, device: str) -> float:
    """Largest difference of loss and gradients between open_clip and mmcl (whole and tiled), batch 3 x tile."""
    g = torch.Generator(device=device).manual_seed(1)
    image = F.normalize(torch.randn(3 * tile, 64, device=device, generator=g), dim=-1)
    text = F.normalize(torch.randn(3 * tile, 64, device=device, generator=g), dim=-1)
    worst = 0.0
    for family in (("open_clip", "mmcl"), ("open_clip siglip", "mmcl siglip")):
        results = []
        for kind, t in ((family[0], 0), (family[1], 0), (family[1], tile)):
            leaves = [x.clone().requires_grad_() for x in (image, text, torch.tensor(10.0, device=device))]
            loss = loss_of(kind, *leaves, t)
            results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
        worst = max(worst, *((a - b).abs().max().item() for other in results[1:] for a, b in zip(results[0], other)))
    return worst


def measure(batch: int, dim: int, tile: int, device: str, loss_too: bool = True,
            kind: str = "mmcl") -> dict[str, float]:
    """One forward + backward; peak memory above the features (MiB) and seconds."""
    import open_clip.loss  # noqa: F401 (imported with or without the loss: a fair baseline of resident memory)

    import mmcl.objectives.clip  # noqa: F401
    import mmcl.objectives.siglip  # noqa: F401

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
        loss_of(kind, image, text, scale, tile).backward()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    return {"seconds": seconds, "peak_mib": peak}


def cpu_peak(batch: int, dim: int, tile: int, loss_too: bool, kind: str) -> dict[str, float]:
    """``measure`` in a fresh process; its peak resident set (MiB) as ``rss_mib``."""
    code = ("import json, resource, sys; sys.path.insert(0, '.'); from benchmarks.clip_loss_memory import measure; "
            f"r = measure({batch}, {dim}, {tile}, 'cpu', {loss_too}, {kind!r}); "
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
    print(f"loss and gradients, open_clip vs mmcl whole vs mmcl tiled, CLIP and SigLIP (batch {3 * args.tile}, "
          "float32): "
          f"largest difference {check_gradients(args.tile, device):.2e}")
    print(f"{'batch':>7} {'loss':>22} {'peak MiB':>10} {'seconds':>9} {'memory vs open_clip':>20}")
    configs = {"open_clip ClipLoss": ("open_clip", 0), "mmcl whole": ("mmcl", 0),
               f"mmcl tiles {args.tile}": ("mmcl", args.tile), "open_clip SigLipLoss": ("open_clip siglip", 0),
               f"mmcl siglip tile {args.tile}": ("mmcl siglip", args.tile)}
    baseline = {label: "open_clip SigLipLoss" if "siglip" in kind else "open_clip ClipLoss"
                for label, (kind, _) in configs.items()}
    for batch in (int(b) for b in args.batches.split(",")):
        rows: dict[str, list[dict[str, float]]] = {label: [] for label in configs}
        for _ in range(args.rounds):
            for label, (kind, tile) in configs.items():
                if device == "cuda":
                    rows[label].append(measure(batch, args.dim, tile, device, kind=kind))
                else:
                    r = cpu_peak(batch, args.dim, tile, True, kind)
                    base = cpu_peak(batch, args.dim, tile, False, kind)
                    rows[label].append({"seconds": r["seconds"], "peak_mib": r["rss_mib"] - base["rss_mib"]})
        peaks = {label: statistics.median(r["peak_mib"] for r in runs) for label, runs in rows.items()}
        for label, runs in rows.items():
            # MiB: on a CPU, allocations that fit in memory the process freed earlier (its features' own
            # temporaries) do not raise the resident set, so peaks below this read as "at most this"
            floor = 128 if device == "cpu" else 1
            ratio = peaks[baseline[label]] / max(peaks[label], floor)
            ratio_text = f"{'>' if peaks[label] < floor else ''}{ratio:.1f}x"
            shown = f"<{floor}" if peaks[label] < floor else f"{peaks[label]:.0f}"
            print(f"{batch:>7} {label:>22} {shown:>10} {statistics.median(r['seconds'] for r in runs):>9.3f}"
                  f" {ratio_text:>20}")


if __name__ == "__main__":
    main()
