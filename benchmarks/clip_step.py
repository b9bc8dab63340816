"""CLIP training step on one GPU: mmcl's trainer against open_clip's training loop, side by side.

    python benchmarks/clip_step.py [--model ViT-B-32] [--batch 256] [--steps 10] [--rounds 5]
                                   [--compile] [--caption-tokens N] [--results FILE]

Both sides train the same open_clip architecture, starting from the same weights, on the same
device-resident batches (random 224 px images and token ids: loaders are measured apart, by
``gpu_recipes.py``'s ``data_wait``), with bf16 autocast, AdamW (lr 5e-4, wd 0.2, betas 0.9/0.98,
eps 1e-6) and gradient clipping at 1.0, TF32 allowed for float32 products on both (open_clip's
``main`` sets it; mmcl's ``train.tf32`` is on by default):

- ``open_clip``: the step of open_clip's training loop (``open_clip_train/train.py``, one
  micro-batch): autocast forward, ``open_clip.loss.ClipLoss``, backward, ``clip_grad_norm_``,
  ``optimizer.step``, the ``logit_scale`` clamp, ``zero_grad``; weight decay off for gains,
  biases and ``logit_scale`` as its ``main.py`` sets it; and the same step followed by one
  ``loss.item()`` (what one host synchronisation per step costs);
- ``mmcl ...``: ``Trainer(recipe).train_step(batch)`` with ``configs/clip_vit_b32.yaml``
  (forward, loss, backward, clipping, the vote on finite loss and gradient norm, the update, the
  scheduler and hooks), and variants of it by recipe key: the vote on the host (one host
  synchronisation per step) against the default on the device, gradient caching in chunks of a
  quarter of the batch (the issue's target: at most 1.3x the plain step), gradient
  checkpointing, patch dropout. The recipe cuts token ids after the batch's longest caption
  (``model.trim_text: 8``), so its rows are fed the batch as its tokenizer cuts it, and one more
  row is fed the padded ids open_clip's loop gets (``model.trim_text: 0``).

By default every text is random ids over the whole context (the text tower's full cost);
``--caption-tokens N`` makes captions of 2 to N tokens instead (start and end tokens included,
lengths uniform; padded with 0 to the context), where cutting the padding pays.

The variants are timed in turn, ``--rounds`` times, ``--steps`` steps each (CUDA events around
the steps); the table gives the median milliseconds per step, samples/s, the speed ratio to
open_clip (above 1: faster), MFU (model FLOPs of one step, counted by torch's FlopCounterMode, over
the bf16 matrix-product rate measured here at 8192^3) and the step's peak memory above what the
models and optimizer states hold. ``--compile`` compiles both sides (``torch.compile`` as
open_clip's ``--torchcompile``; ``train.compile: true`` for mmcl). Without a GPU it runs on the CPU
with ``--model mmcl-tiny-vit`` as a smoke test; its figures say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {  # name: recipe overrides
    "mmcl": ["optim.fused=false"],
    "mmcl fused AdamW": ["optim.fused=true"],  # the vote on the device (train.vote: auto): no host sync per step
    "mmcl fused + host vote": ["optim.fused=true", "train.vote=host"],  # one host synchronisation per step
    "mmcl fused + grad cache B/4": ["optim.fused=true", "train.grad_cache={quarter}"],
    # the GradCache of the paper: every chunk embedded twice (mmcl keeps the last chunk's first pass)
    "mmcl fused + grad cache B/4 rerun all": ["optim.fused=true", "train.grad_cache={quarter}",
                                              "train.grad_cache_keep_last=false"],
    "mmcl fused + grad ckpt": ["optim.fused=true", "model.grad_checkpointing=true"],
    "mmcl fused + patch drop 0.5": ["optim.fused=true", "model.patch_dropout=0.5"],
    # the recipe cuts token ids after the batch's longest caption (model.trim_text: 8), so the mmcl rows are
    # fed the batch as its tokenizer cuts it (the same embeddings from fewer tokens); this one is fed them padded
    "mmcl fused + ids padded": ["optim.fused=true", "model.trim_text=0"],
}


def open_clip_side(model_name: str, weights: dict[str, torch.Tensor], device: torch.device,
                   compile_model: bool) -> tuple[Callable[[dict[str, Any]], None], torch.nn.Module]:
    """open_clip's model, optimizer and one step of its training loop."""
    import open_clip

    model = open_clip.create_model(model_name, force_custom_text=True, output_dict=True).to(device)
    model.load_state_dict(weights)
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
                                   {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
                                  lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()
    forward = torch.compile(model) if compile_model else model
    model.train()

    def step(batch: dict[str, Any]) -> torch.Tensor:
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = forward(batch["image"], batch["text"])
            loss = sum(loss_fn(**out, output_dict=True).values())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, norm_type=2.0)
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    return step, model


def clip_trainer(model_name: str, batch_size: int, overrides: list[str], shards: str, out: Path) -> Any:
    """An mmcl Trainer for configs/clip_vit_b32.yaml with open_clip's ``model_name`` at its own image size,
    ``overrides`` on top; its loader points at ``shards`` but the benchmarks feed batches themselves."""
    import open_clip

    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    size = open_clip.get_model_config(model_name)["vision_cfg"]["image_size"]
    sets = [f"model.open_clip_model={model_name}", f"data.image_size={size}", f"data.batch_size={batch_size}",
            f"data.train_shards={shards}", "data.num_workers=0", f"run.output_dir={out}", "train.progress=false",
            "optim.warmup_steps=0", *overrides]
    trainer = Trainer(load_recipe(ROOT / "configs" / "clip_vit_b32.yaml", sets))
    trainer.model.train()
    return trainer


def time_steps(step: Callable[[], Any], steps: int) -> float:
    """Milliseconds per step over ``steps`` steps, by device events (host clock on a CPU)."""
    if not torch.cuda.is_available():
        import time

        t = time.perf_counter()
        for _ in range(steps):
            step()
        return (time.perf_counter() - t) * 1e3 / steps
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / steps


def matmul_tflops(device: torch.device) -> float:
    """bf16 matrix-product rate at 8192^3 on random data (the MFU ceiling), TFLOP/s."""
    if device.type != "cuda":
        return float("nan")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    ms = time_steps(lambda: a @ b, 10)
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def model_flops(model: torch.nn.Module, objective: Any, batch: dict[str, Any], device: torch.device) -> float:
    """FLOPs of one forward + backward (matrix products and convolutions), as FlopCounterMode counts them."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = objective(model(batch), batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def texts(n: int, context: int, vocab: int, longest: int | None) -> torch.Tensor:
    """Token ids of ``n`` texts: random ids over the whole context, or captions of 2 to ``longest``
    tokens (a start token, random words, the end token: the highest id, where CLIP pools) padded with 0."""
    if longest is None:
        return torch.randint(1, vocab, (n, context))
    ids = torch.zeros(n, context, dtype=torch.long)
    for row, length in zip(ids, torch.randint(2, min(longest, context) + 1, (n,)).tolist()):
        row[0], row[1:length - 1], row[length - 1] = vocab - 2, torch.randint(1, vocab - 2, (length - 2,)), vocab - 1
    return ids


def make_shards(folder: Path) -> str:
    """A few digits shards for the recipe's loader to point at (the benchmark feeds batches itself)."""
    subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", str(folder), "--no-progress"],
                   check=True, cwd=ROOT, capture_output=True)
    return str(folder / "train-{000000..000004}.tar")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="open_clip model name (default ViT-B-32; mmcl-tiny-vit on CPU)")
    ap.add_argument("--batch", type=int, default=None, help="per device (default 256; 32 on CPU)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of the mmcl variants")
    ap.add_argument("--compile", action="store_true", help="torch.compile both sides")
    ap.add_argument("--caption-tokens", type=int, default=None,
                    help="captions of 2 to N tokens, padded (default: random ids over the whole context)")
    ap.add_argument("--results", type=Path, default=None, help="append the rows to the JSON list in this file")
    args = ap.parse_args()
    import open_clip

    from mmcl.models.clip import CONFIG_DIR, trim_padding

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = args.model or ("ViT-B-32" if cuda else "mmcl-tiny-vit")
    batch_size = args.batch or (256 if cuda else 32)
    if name.startswith("mmcl-"):
        open_clip.add_model_config(CONFIG_DIR / f"{name}.json")
    tmp = Path(tempfile.mkdtemp())
    shards = make_shards(tmp / "digits")

    torch.manual_seed(0)
    trainers = {v: clip_trainer(name, batch_size, [f"train.compile={str(args.compile).lower()}",
                                                   *(o.format(quarter=max(1, batch_size // 4)) for o in VARIANTS[v])],
                                shards, tmp / f"run{i}") for i, v in enumerate(args.variants.split(","))}
    first = next(iter(trainers.values()))
    weights = {k: v.detach().clone() for k, v in first.unwrapped.clip.state_dict().items()}
    for t in trainers.values():  # every side starts from the same weights
        t.unwrapped.clip.load_state_dict(weights)
    oc_step, _ = open_clip_side(name, weights, device, args.compile)
    size = first.unwrapped.image_size
    context = first.unwrapped.model_cfg.get("text_cfg", {}).get("context_length", 77)
    vocab = first.unwrapped.model_cfg.get("text_cfg", {}).get("vocab_size", 49408)
    batches = [{"image": torch.randn(batch_size, 3, size, size, device=device),
                "text": texts(batch_size, context, vocab, args.caption_tokens).to(device),
                "key": [str(i) for i in range(batch_size)]} for _ in range(4)]
    # what each variant's tokenizer would give it: the ids cut in multiples of its model.trim_text, or padded
    feeds = {v: [{**b, "text": trim_padding(b["text"].cpu(), t.unwrapped.cfg.trim_text).to(device)} for b in batches]
             if t.unwrapped.cfg.trim_text else batches for v, t in trainers.items()}
    turn = {"i": 0}

    def next_batch(feed: list[dict[str, Any]] = batches) -> dict[str, Any]:
        turn["i"] += 1
        return feed[turn["i"] % len(feed)]

    # the same first step on both sides: the same computation is being timed
    loss_oc = float(oc_step(batches[0]))
    trainers_first = first.train_step(batches[0])
    loss_mmcl = float(first._window["loss"][-1][0]) if trainers_first else float("nan")  # (value, weight)
    print(f"first step on the same weights and batch: loss open_clip {loss_oc:.5f}, mmcl {loss_mmcl:.5f}")

    steps: dict[str, Callable[[], Any]] = {"open_clip": lambda: oc_step(next_batch()),
                                           # what one host synchronisation per step costs open_clip's loop
                                           "open_clip + .item() per step": lambda: oc_step(next_batch()).item()}
    for v, t in trainers.items():
        steps[v] = lambda t=t, feed=feeds[v]: t.train_step(next_batch(feed))
    base = model_flops(first.unwrapped, first.objective, batches[0], device)  # the same architecture on both sides
    flops = {"open_clip": base, "open_clip + .item() per step": base}
    for v, t in trainers.items():  # FLOPs done: fewer with patches dropped or ids cut
        own = feeds[v][0]
        fewer = "patch" in v or own["text"].shape != batches[0]["text"].shape
        flops[v] = model_flops(t.unwrapped, t.objective, own, device) if fewer else base
    peak_tflops = matmul_tflops(device)

    times: dict[str, list[float]] = {v: [] for v in steps}
    memory: dict[str, float] = {}
    for v, step in steps.items():  # warm-up (compilation, optimizer state), then the step's own peak memory
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            memory[v] = (torch.cuda.max_memory_allocated() - resident) / 2**30
    for _ in range(args.rounds):
        for v, step in steps.items():
            times[v].append(time_steps(step, args.steps))

    device_name = torch.cuda.get_device_name() if cuda else "cpu"
    widths = sorted({f[0]["text"].shape[1] for f in feeds.values()})
    captions = f"captions of 2-{args.caption_tokens} tokens (ids fed {' or '.join(map(str, widths))} wide)" \
        if args.caption_tokens else f"random ids over all {context} tokens"
    print(f"{device_name}, torch {torch.__version__}, open_clip {open_clip.__version__}, {name}, batch {batch_size}, "
          f"bf16{', compiled' if args.compile else ''}, {captions}; bf16 matmul {peak_tflops:.0f} TFLOP/s; median of "
          f"{args.rounds} rounds x {args.steps} steps")
    oc_ms = statistics.median(times["open_clip"])
    rows = []
    for v in steps:
        ms = statistics.median(times[v])
        row = {"variant": v, "ms_per_step": round(ms, 2), "samples_per_s": round(batch_size / ms * 1e3, 1),
               "vs_open_clip": round(oc_ms / ms, 3), "tflops": round(flops[v] / (ms * 1e-3) / 1e12, 1),
               "mfu": round(flops[v] / (ms * 1e-3) / 1e12 / peak_tflops, 3) if cuda else None,
               "step_peak_gib": round(memory.get(v, float("nan")), 2), "spread_ms": [round(min(times[v]), 2),
                                                                                     round(max(times[v]), 2)]}
        rows.append(row)
        print(f"{v:28s} {ms:8.2f} ms  {row['samples_per_s']:8.0f} samples/s  x{row['vs_open_clip']:.3f}  "
              f"{row['tflops']:6.1f} TFLOP/s  MFU {row['mfu'] if cuda else float('nan'):.3f}  "
              f"step peak {row['step_peak_gib']:.2f} GiB  (rounds {row['spread_ms'][0]}-{row['spread_ms'][1]} ms)",
              flush=True)
    if args.results:
        earlier = json.loads(args.results.read_text()) if args.results.is_file() else []
        run = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "command": shlex.join(["python", *sys.argv]), "device": device_name, "torch": torch.__version__,
               "open_clip": open_clip.__version__, "model": name, "batch": batch_size, "compiled": args.compile,
               "caption_tokens": args.caption_tokens,
               "matmul_tflops": round(peak_tflops, 1), "first_loss": {"open_clip": loss_oc, "mmcl": loss_mmcl}}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(earlier + [{**row, **run} for row in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
