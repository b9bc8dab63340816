"""Time to the first training batch: a shuffle buffer that fills before it gives out anything
(``data.shuffle_buffer`` alone) against one that starts early and grows (``data.shuffle_initial``).

    python benchmarks/first_batch.py [--samples 12000] [--buffer 5000] [--initial 1000] [--rounds 3]

Builds ``mmcl-prep photos`` shards (224 px JPEG, 256 a shard) unless ``--shards DIR`` is given, then
starts a fresh loader (one worker, the CLIP transform, batch 256) for each setting in turn,
``--rounds`` times, and prints the median seconds until its first batch and the samples the worker
read before it (counted by replaying the buffer on sample numbers). Every worker of every process
pays this once per start and once per epoch; on shards read over a network the samples read are
what counts.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import open_clip

from data_prep.cli import main as prep
from mmcl.data import DataConfig, make_loader
from mmcl.data.seek import ShuffleBuffer


def read_before_first(batch: int, buffer: int, initial: int | None) -> int:
    """Samples a worker reads before it has ``batch`` to give out."""
    buf, out, taken = ShuffleBuffer(buffer, random.Random(0), initial=initial), 0, 0
    while out < batch:
        out += len(buf.push(taken))
        taken += 1
    return taken


def first_batch_s(shards: str, buffer: int, initial: int | None, batch: int, seed: int) -> float:
    cfg = DataConfig(train_shards=shards, image_size=224, batch_size=batch, num_workers=1, shuffle_buffer=buffer,
                     shuffle_initial=initial, transform="clip")
    loader = make_loader(cfg, tokenizer=open_clip.SimpleTokenizer(), seed=seed)
    loader.set_epoch(0)
    start = time.perf_counter()
    next(iter(loader))
    seconds = time.perf_counter() - start
    loader.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, default=None, help="a folder mmcl-prep photos wrote")
    ap.add_argument("--samples", type=int, default=12000)
    ap.add_argument("--buffer", type=int, default=5000)
    ap.add_argument("--initial", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    folder = args.shards
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "photos"
        prep(["photos", "--out", str(folder), "--samples", str(args.samples), "--size", "224", "--no-progress"])
    shards = "::".join(str(p) for p in sorted(folder.glob("train-*.tar")))
    settings = {f"buffer {args.buffer}": None, f"buffer {args.buffer}, initial {args.initial}": args.initial}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for r in range(args.rounds):  # interleaved, a new seed (other shards first) each round
        for name, initial in settings.items():
            times[name].append(first_batch_s(shards, args.buffer, initial, args.batch, seed=r))
    print(f"one loader worker, batch {args.batch}, 224 px photos; median of {args.rounds} rounds")
    for name, initial in settings.items():
        print(f"{name:28s} first batch after {statistics.median(times[name]):6.2f} s "
              f"({min(times[name]):.2f}-{max(times[name]):.2f}), "
              f"{read_before_first(args.batch, args.buffer, initial):,} samples read")


if __name__ == "__main__":
    main()
