"""Loader throughput in samples/s: image-text and 2-view batches from digits shards (64x64).

    python benchmarks/loader_throughput.py [--shards DIR] [--workers 2] [--epochs 3]

Builds 64 px digits shards if none are given, then times full epochs (after one warm-up epoch).
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
    args = ap.parse_args()
    folder = args.shards
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "digits64"
        t = time.perf_counter()
        prep(["digits", "--out", str(folder), "--size", "64", "--no-progress"])
        print(f"built 64px digits shards in {time.perf_counter() - t:.1f}s")
    shards = str(folder / "train-{000000..000004}.tar")
    base = dict(train_shards=shards, image_size=64, batch_size=128, num_workers=args.workers, shuffle_buffer=1000)
    tok = open_clip.SimpleTokenizer(context_length=16)
    rows = [("image-text (clip transform)", DataConfig(**base, transform="clip"), tok),
            ("2-view (simclr transform)", DataConfig(**base, kind="multi_view", transform="simclr"), None)]
    for name, cfg, tokenizer in rows:
        print(f"{name:32s} {measure(cfg, tokenizer, args.epochs):8.0f} samples/s ({args.workers} workers)")


if __name__ == "__main__":
    main()
