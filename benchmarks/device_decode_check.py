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
4. **Corrupt JPEGs.** Each of ``--corrupt`` photo JPEGs spoilt three ways that keep the header check
   passing (data cut short with the end marker put back; bytes of the compressed data overwritten;
   a run of it zeroed), given to mmcl's decoder (Pillow, as the workers decode) and to the device's
   (``decode_jpeg``): how many the device decodes where the workers skip them (it would train on
   images the workers refuse), and the reverse (the device falls back to Pillow: no harm).
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


def spoilt(data: bytes, how: str, rng: torch.Generator) -> bytes:
    """``data`` (a JPEG) spoilt after its headers: ``cut`` (cut at a random point of the compressed
    data, the end marker put back), ``flip`` (a few random bytes overwritten) or ``zero`` (a run of
    2 % zeroed); each keeps what :func:`mmcl.data.device_decode.jpeg_size` checks."""
    start = data.rindex(b"\xff\xda") + 16  # past the (last) start-of-scan header
    body = len(data) - 2 - start
    at = start + int(torch.randint(body // 10, body - body // 10, (1,), generator=rng))
    if how == "cut":
        return data[:at] + b"\xff\xd9"
    out = bytearray(data)
    if how == "flip":
        for i in torch.randint(start, len(data) - 2, (8,), generator=rng).tolist():
            if out[i - 1] != 0xFF:  # the 00 of a stuffed ff 00 made non-zero would be a marker (a cut)
                out[i] = int(torch.randint(0, 255, (1,), generator=rng))  # never 0xff itself: no marker made
    else:
        run = max(1, body // 50)
        out[at:at + run] = bytes(min(run, len(data) - 2 - at))
    return bytes(out)


def corrupt(shards: str, count: int, device: str) -> int:
    """Where the device's decoder and the workers' disagree on spoilt JPEGs (step 4); returns how many the
    device decodes that the workers skip."""
    import webdataset as wds
    from torchvision.io import ImageReadMode, decode_jpeg

    from mmcl.decode import BadImage, decode_image

    rng, device_only = torch.Generator().manual_seed(0), 0
    jpegs = [s["jpg"] for s, _ in zip(wds.WebDataset(shards.split("::"), shardshuffle=False), range(count))]
    for how in ("cut", "flip", "zero"):
        tally = {"both decode": 0, "both refuse": 0, "device only": 0, "workers only": 0}
        for data in jpegs:
            bad = spoilt(data, how, rng)
            assert dd.jpeg_size(bad, 10**8) is not None, "the spoilt JPEG no longer passes the header check"
            try:
                decode_image(bad)
                workers = True
            except BadImage:
                workers = False
            try:
                decode_jpeg(torch.frombuffer(bytearray(bad), dtype=torch.uint8), mode=ImageReadMode.RGB,
                            device=device)
                on_device = True
            except RuntimeError:
                on_device = False
            key = ("both decode" if on_device else "workers only") if workers else \
                ("device only" if on_device else "both refuse")
            tally[key] += 1
        print(f"4. corrupt JPEGs, {how:4s} x {len(jpegs)}: " + ", ".join(f"{k} {v}" for k, v in tally.items()))
        device_only += tally["device only"]
    return device_only


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--tries", type=int, default=100)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--corrupt", type=int, default=200, help="JPEGs spoilt each way in step 4")
    ap.add_argument("--device", default="cuda",
                    help="cpu: steps 1, 3 and 4 with torchvision's CPU decoder (no stream to check)")
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
    device_only = corrupt(shards, args.corrupt, args.device)
    if with_drain:
        sys.exit("device_decode_check.py: memory was corrupted with the drain in place")
    if device_only:
        sys.exit(f"device_decode_check.py: the device decoded {device_only} corrupt JPEGs that the workers skip: "
                 "data.decode: device would train on them")


if __name__ == "__main__":
    main()
