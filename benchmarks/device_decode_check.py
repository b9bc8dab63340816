"""``data.decode: device`` on a GPU: the same pixels as the workers, no memory corrupted while the GPU
is busy, and how fast nvJPEG decodes.

    python benchmarks/device_decode_check.py [--samples 2048] [--tries 100] [--batch 256]

1. **Pixels.** One pass over ``mmcl-prep photos`` shards (224 px JPEG crops of real photographs) with
   ``data.decode: workers`` and one with ``device`` (``Loader.prepare`` on the GPU): the same keys in
   the same order, and the mean and largest difference of the ``uint8`` images, in levels of 255
   (the CPU test bounds the libjpeg-turbo decode to 1 level; nvJPEG rounds differently).
2. **The stream hazard** (pytorch/vision#9606): each try fills tensors with known values, queues a
   long matrix product and then one sum per tensor on the current stream, frees the tensors while
   the sums are still queued, decodes a batch with :class:`DeviceDecoder`, and checks every sum. With
   ``drain`` (mmcl's decoder) no sum may be wrong; without it (``drain`` replaced by nothing) the
   count shows whether this GPU and driver have the fault at all.
3. **Speed.** Images per second through :class:`DeviceDecoder` (decode, crop, resize) on the GPU
   against one CPU process decoding and cropping as a loader worker does.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import mmcl.data.device_decode as dd
from data_prep.cli import main as prep
from mmcl.data import DataConfig, make_loader


def batches(cfg: DataConfig, device: str) -> list[dict]:
    loader = make_loader(cfg, tokenizer=lambda texts: texts)
    loader.set_epoch(0)
    out = [loader.prepare(b, device) for b in loader]
    loader.close()
    return out


def pixels(shards: str, batch: int, device: str) -> None:
    base = dict(train_shards=shards, image_size=224, batch_size=batch, num_workers=4, shuffle_buffer=500,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    a = batches(DataConfig(**base), device)
    b = batches(DataConfig(**base, decode="device"), device)
    assert [x["key"] for x in a] == [x["key"] for x in b], "the two loaders gave different samples"
    diffs = torch.cat([((x["image"] - y["image"]).abs() * 255).flatten() for x, y in zip(a, b)])
    print(f"1. pixels, {sum(len(x['key']) for x in a)} images: mean |diff| {diffs.mean():.3f} levels, "
          f"{(diffs > 2.5).float().mean():.2%} of values off by more than 2, largest {diffs.max():.1f}")


def one_jpeg_batch(shards: str, batch: int) -> dict:
    cfg = DataConfig(train_shards=shards, image_size=224, batch_size=batch, num_workers=0, decode="device")
    loader = make_loader(cfg, tokenizer=lambda texts: texts)
    loader.set_epoch(0)
    return next(iter(loader))["jpeg"]


def hazard(jpegs: dict, tries: int, with_drain: bool) -> int:
    """Tries in which a queued sum over a freed tensor came out wrong."""
    decoder, wrong = dd.DeviceDecoder(224), 0
    saved = dd.drain
    if not with_drain:
        dd.drain = lambda device: None
    try:
        big = torch.randn(8192, 8192, device="cuda")
        for _ in range(tries):
            # as many bytes as one decoded 224 px image, so the allocator may hand their blocks to the decoder
            # int32, summed exactly (a float sum over overwritten bytes may be NaN, which no tolerance catches)
            tensors = [torch.full((224 * 224 * 3 // 4,), k + 1, dtype=torch.int32, device="cuda") for k in range(256)]
            torch.cuda.synchronize()
            for _ in range(8):  # ~100 ms of queued work before the sums
                big = (big @ big).tanh_()
            sums = torch.stack([x.sum() for x in tensors])
            expected = torch.arange(1, 257, device="cuda") * tensors[0].numel()
            del tensors  # freed while the sums are still queued: the allocator may hand the blocks on
            decoder(jpegs, None, "cuda")
            torch.cuda.synchronize()
            wrong += int(not torch.equal(sums, expected))
    finally:
        dd.drain = saved
    return wrong


def speed(jpegs: dict, shards: str, device: str, rounds: int = 5) -> None:
    decoder = dd.DeviceDecoder(224)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n = len(jpegs["at"])  # the batch's JPEGs
    gpu = []
    for _ in range(rounds + 1):
        sync()
        t = time.perf_counter()
        decoder(jpegs, None, device)
        sync()
        gpu.append(n / (time.perf_counter() - t))
    cfg = DataConfig(train_shards=shards, image_size=224, batch_size=n, num_workers=0)
    loader = make_loader(cfg, tokenizer=lambda texts: texts)
    cpu = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        t = time.perf_counter()
        next(iter(loader))
        cpu.append(n / (time.perf_counter() - t))
    print(f"3. speed, batches of {n}: {device} decode + crop {statistics.median(gpu[1:]):,.0f} images/s; "
          f"one CPU process as a loader worker {max(cpu):,.0f} images/s (shard reading and shuffling included)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--tries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of steps 1 and 3 (no stream to check)")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("device_decode_check.py: no CUDA device here; this check is for GPUs (--device cpu: a dry run)")
    folder = Path(tempfile.mkdtemp()) / "photos224"
    prep(["photos", "--out", str(folder), "--samples", str(args.samples), "--size", "224", "--no-progress"])
    shards = "::".join(str(p) for p in sorted(folder.glob("train-*.tar")))
    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}, torch {torch.__version__}")
    pixels(shards, args.batch, args.device)
    jpegs = one_jpeg_batch(shards, args.batch)
    with_drain = 0
    if args.device == "cuda":
        with_drain, without = hazard(jpegs, args.tries, True), hazard(jpegs, args.tries, False)
        print(f"2. stream hazard, {args.tries} tries: wrong sums with mmcl's drain {with_drain}, without it {without}")
    speed(jpegs, shards, args.device)
    if with_drain:
        sys.exit("device_decode_check.py: memory was corrupted with the drain in place")


if __name__ == "__main__":
    main()
