"""The largest contrastive batch one GPU trains within a memory budget, with and without gradient caching.

    python benchmarks/clip_max_batch.py [--model ViT-B-32] [--budget-gib 24] [--chunk 256] [--tile 4096]

For each way of training ``configs/clip_vit_b32.yaml`` (plain; ``model.grad_checkpointing``;
``train.grad_cache`` in chunks of ``--chunk`` with the loss in tiles, ``objective.tile``), the
batch is doubled from 256 until a training step (two, to include the optimizer's state) runs out
of the budget (``torch.cuda.set_per_process_memory_fraction``), then bisected to 1/8 of the last
doubling. Random 224 px images and token ids already on the device; bf16; fused AdamW. Without a
GPU it runs the tiny CPU model at a few small sizes as a smoke test, with no budget.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WAYS = {  # name: recipe overrides ({chunk}, {tile} filled in)
    "plain": [],
    "grad checkpointing": ["model.grad_checkpointing=true"],
    "grad cache + tiled loss": ["train.grad_cache={chunk}", "objective.tile={tile}"],
}


def fits(model: str, batch: int, overrides: list[str], shards: str, out: Path, device: torch.device) -> bool:
    """Whether two training steps of ``batch`` samples run within the memory budget."""
    from benchmarks.clip_step import clip_trainer

    trainer = None
    try:
        trainer = clip_trainer(model, batch, ["train.mixed_precision=bf16", *overrides], shards, out)
        size = trainer.unwrapped.image_size
        text_cfg = trainer.unwrapped.model_cfg.get("text_cfg", {})
        for _ in range(2):
            batch_data = {"image": torch.randn(batch, 3, size, size, device=device),
                          "text": torch.randint(1, text_cfg.get("vocab_size", 49408),
                                                (batch, text_cfg.get("context_length", 77)), device=device),
                          "key": [""] * batch}
            trainer.train_step(batch_data)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del trainer
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def largest(model: str, overrides: list[str], shards: str, out: Path, device: torch.device, start: int,
            limit: int) -> int:
    """Double from ``start`` until a batch does not fit (or ``limit``), then bisect to 1/8 of the step."""
    good, batch = 0, start
    while batch <= limit and fits(model, batch, overrides, shards, out, device):
        good, batch = batch, batch * 2
    if good == 0 or batch > limit:
        return good
    bad, step = batch, max(8, good // 8)
    while bad - good > step:
        mid = good + max(8, (bad - good) // 2 // 8 * 8)
        if fits(model, mid, overrides, shards, out, device):
            good = mid
        else:
            bad = mid
    return good


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="open_clip model (default ViT-B-32; mmcl-tiny-vit on CPU)")
    ap.add_argument("--budget-gib", type=float, default=24.0)
    ap.add_argument("--chunk", type=int, default=256)
    ap.add_argument("--tile", type=int, default=4096)
    ap.add_argument("--limit", type=int, default=262144, help="largest batch tried")
    args = ap.parse_args()
    import open_clip

    from benchmarks.clip_step import make_shards
    from mmcl.models.clip import CONFIG_DIR

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    model = args.model or ("ViT-B-32" if cuda else "mmcl-tiny-vit")
    if model.startswith("mmcl-"):
        open_clip.add_model_config(CONFIG_DIR / f"{model}.json")
    tmp = Path(tempfile.mkdtemp())
    shards = make_shards(tmp / "digits")
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.budget_gib * 2**30 / total), device)
        start, limit, chunk, tile = 256, args.limit, args.chunk, args.tile
        print(f"{torch.cuda.get_device_name()}, {model}, bf16, budget {args.budget_gib} GiB of "
              f"{total / 2**30:.0f}; grad cache chunk {chunk}, tiles {tile}")
    else:
        start, limit, chunk, tile = 16, 64, 8, 16
        print(f"CPU smoke test ({model}, no memory budget): batches {start} to {limit}")
    for name, overrides in WAYS.items():
        sets = [o.format(chunk=chunk, tile=tile) for o in overrides]
        best = largest(model, sets, shards, tmp / "run", device, start, limit)
        print(f"{name:26s} largest batch {best:>8,}", flush=True)


if __name__ == "__main__":
    main()
