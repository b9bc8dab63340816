"""Loader throughput in samples/s: image-text and 2-view batches from digits shards (64 px by default).

    python benchmarks/loader_throughput.py [--shards DIR] [--size 64] [--workers 2] [--epochs 3]

Builds digits shards of ``--size`` px if none are given, then times full epochs (after one warm-up
epoch). ``--size 224`` gives the per-sample cost of the full-size recipes' augmentations.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import open_clip

from data_prep.cli import main as prep
from mmcl.data import DataConfig, make_loader


def measure(cfg: DataConfig, tokenizer, epochs: int) -> float:
    loader = make_loader(cfg, tokenizer=tokenizer)
    n, start = 0, None
    for epoch in range(epochs + 1):
        loader.set_epoch(epoch)
        if epoch == 1:
            n, start = 0, time.perf_counter()
        for batch in loader:
            n += len(batch["key"])
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=Path, default=None)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", type=int, default=64, help="image side of the built shards and the batches")
    args = ap.parse_args()
    folder = args.shards
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / f"digits{args.size}"
        t = time.perf_counter()
        prep(["digits", "--out", str(folder), "--size", str(args.size), "--no-progress"])
        print(f"built {args.size} px digits shards in {time.perf_counter() - t:.1f}s")
    shards = str(folder / "train-{000000..000004}.tar")
    base = dict(train_shards=shards, image_size=args.size, batch_size=128, num_workers=args.workers,
                shuffle_buffer=1000)
    tok = open_clip.SimpleTokenizer(context_length=16)
    rows = [("image-text (clip transform)", DataConfig(**base, transform="clip"), tok),
            ("2-view (simclr transform)", DataConfig(**base, kind="multi_view", transform="simclr"), None)]
    for name, cfg, tokenizer in rows:
        print(f"{name:32s} {measure(cfg, tokenizer, args.epochs):8.0f} samples/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
