"""Loader throughput in samples/s, normalising in the workers vs on the device, and (image-text) decoding
the JPEGs in the workers vs on the device, side by side.

    python benchmarks/loader_throughput.py [--data photos|digits] [--size 224] [--workers 2] [--rounds 3]

Builds shards (``mmcl-prep photos``: 224 px JPEG crops of real photographs, the realistic case;
or digits upscaled to ``--size``) unless ``--shards DIR`` is given, then times full passes over
them for each configuration, interleaved round by round (A, B, A, B, ...), and prints the median
samples/s, the bytes per batch that cross to the device and the ratio. "device" is
``data.normalize: device`` (uint8 batches, normalised by ``Loader.prepare`` where the model runs:
here the CPU, so its cost is counted); "workers" converts to float and normalises in the workers.
"decode on device" is ``data.decode: device`` (the workers read JPEG headers and draw crops; the
batch is decoded, cropped and normalised by ``Loader.prepare`` on ``--device``: on a GPU, nvJPEG).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import open_clip
import torch

from data_prep.cli import main as prep
from mmcl.data import DataConfig, make_loader


def one_pass(cfg: DataConfig, tokenizer, epoch: int, device: str) -> tuple[float, int]:
    """(samples/s, bytes of images per batch that cross to the device) over one epoch, ``Loader.prepare``
    on ``device`` included (and waited for)."""
    loader = make_loader(cfg, tokenizer=tokenizer)
    loader.set_epoch(epoch)
    n, nbytes, start = 0, 0, time.perf_counter()
    for batch in loader:
        images = ([batch["image"]] if "image" in batch else []) + batch.get("views", []) + \
            ([batch["jpeg"]["bytes"]] if "jpeg" in batch else [])
        nbytes = sum(x.numel() * x.element_size() for x in images)
        n += len(batch["key"])
        loader.prepare(batch, device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    loader.close()
    return n / seconds, nbytes


def build(args: argparse.Namespace) -> tuple[Path, str]:
    folder = Path(tempfile.mkdtemp()) / f"{args.data}{args.size}"
    t = time.perf_counter()
    if args.data == "photos":
        prep(["photos", "--out", str(folder), "--size", str(args.size), "--samples", str(args.samples),
              "--workers", str(args.workers), "--no-progress"])
    else:
        prep(["digits", "--out", str(folder), "--size", str(args.size), "--no-progress"])
    print(f"built {args.size} px {args.data} shards in {time.perf_counter() - t:.1f}s")
    return folder, "train-*.tar"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shards", type=Path, default=None, help="a folder of train-*.tar shards (default: build)")
    ap.add_argument("--data", choices=["photos", "digits"], default="photos")
    ap.add_argument("--samples", type=int, default=4096, help="photos to build")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--size", type=int, default=224, help="image side of the built shards and the batches")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where Loader.prepare puts the batches")
    args = ap.parse_args()
    folder = args.shards or build(args)[0]
    shards = "::".join(str(p) for p in sorted(folder.glob("train-*.tar")))
    base = dict(train_shards=shards, image_size=args.size, batch_size=args.batch, num_workers=args.workers,
                shuffle_buffer=1000)
    tok = open_clip.SimpleTokenizer(context_length=16)
    print(f"{torch.get_num_threads()} torch threads, {args.workers} loader workers, batch {args.batch}, "
          f"batches to {args.device}, {args.rounds} interleaved rounds, medians")
    variants = {"normalise in workers": {"normalize": "workers"}, "normalise on device": {"normalize": "device"},
                "decode on device": {"normalize": "device", "decode": "device"}}
    for name, kind, transform, tokenizer in (("image-text (clip)", "image_text", "clip", tok),
                                             ("2-view (simclr)", "multi_view", "simclr", None)):
        chosen = {v: kw for v, kw in variants.items() if kind == "image_text" or "decode" not in kw}
        rates: dict[str, list[float]] = {v: [] for v in chosen}
        sizes: dict[str, int] = {}
        for r in range(args.rounds + 1):  # round 0 warms the page cache
            for variant, kw in chosen.items():
                cfg = DataConfig(**base, kind=kind, transform=transform, **kw)
                rate, sizes[variant] = one_pass(cfg, tokenizer, r, args.device)
                if r:
                    rates[variant].append(rate)
        first = statistics.median(rates["normalise in workers"])
        print(name)
        for variant in chosen:
            rate = statistics.median(rates[variant])
            print(f"  {variant:22s} {rate:7.0f} samples/s  {sizes[variant] / 2**20:6.2f} MiB/batch to the device  "
                  f"{rate / first:.2f}x")


if __name__ == "__main__":
    main()
