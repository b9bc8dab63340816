"""``data.decode: device``: the batch's JPEGs decoded and cropped on the training device (here the
CPU, through the same code a GPU runs) give the samples, crops and skips of ``data.decode: workers``,
with pixels equal up to decoder and resampling round-off."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import cfg_for, png_bytes
from PIL import Image
from sklearn.datasets import load_sample_image

from mmcl.data import make_loader
from mmcl.errors import ConfigError
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

from .test_faults import write_tar

ROOT = Path(__file__).resolve().parents[2]


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def corrupt(data: bytes) -> bytes:
    """A JPEG whose headers are sound and whose scan data is noise with markers in it: Pillow opens
    it, and neither Pillow nor libjpeg can decode it."""
    sos = data.index(b"\xff\xda")
    start = sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")
    noise = np.random.default_rng(0).integers(0, 256, len(data) - start - 2, dtype=np.uint8)
    return data[:start] + noise.tobytes() + b"\xff\xd9"


def samples(with_corrupt: bool = False) -> dict[str, dict[str, bytes]]:
    """Crops of scikit-learn's photos of every size and shape as JPEGs, and the images that must
    take the workers' way: grey and CMYK JPEGs, a PNG, a truncated JPEG, one too large."""
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    out = {}
    for i in range(36):
        w, h = int(rng.integers(40, 160)), int(rng.integers(40, 160))
        x, y = int(rng.integers(0, 640 - w)), int(rng.integers(0, 427 - h))
        out[f"{i:04d}"] = {"jpg": jpeg(photos[i % 2].crop((x, y, x + w, y + h))), "txt": f"photo {i}".encode()}
    out["0002"]["jpg"] = jpeg(photos[0].crop((0, 0, 90, 60)).convert("L"))
    out["0005"]["jpg"] = jpeg(photos[1].crop((0, 0, 90, 60)).convert("CMYK"))
    out["0007"] = {"png": png_bytes(np.asarray(photos[0].crop((0, 0, 70, 50)))), "txt": b"a png"}
    out["0011"]["jpg"] = out["0011"]["jpg"][: len(out["0011"]["jpg"]) // 2]  # truncated: no end marker
    out["0013"]["jpg"] = jpeg(photos[1].resize((400, 300)))  # over max_pixels below
    out["0017"]["txt"] = b"  "
    if with_corrupt:
        out["0020"]["jpg"] = corrupt(out["0020"]["jpg"])
    return out


def loader(shard: Path, decode: str, **kw):
    cfg = cfg_for(str(shard), transform="clip", transform_args={"scale": [0.3, 1.0]}, decode=decode, batch_size=4,
                  shuffle_buffer=8, max_pixels=100_000, **kw)
    loader = make_loader(cfg, tokenizer=lambda texts: texts)
    loader.set_epoch(0)
    return loader


def test_device_decoding_gives_the_workers_samples_crops_and_skips(tmp_path: Path) -> None:
    """Same keys, captions and skip counts; the crops are the same boxes and the pixels agree to
    round-off: at most 1 level of 255 here, 0.02 on average (a box 2 pixels off differs by 8 levels on
    average, up to 208). The bounds leave room for other libjpeg builds."""
    shard = write_tar(tmp_path / "photos-0.tar", samples())
    batches = {}
    for decode in ("workers", "device"):
        ld = loader(shard, decode)
        batches[decode] = [ld.prepare(b, "cpu") for b in ld]
        skipped = ld.skipped
        assert skipped == Counter({"truncated_image": 1, "too_large": 1, "missing_caption": 1}), decode
    assert [b["key"] for b in batches["workers"]] == [b["key"] for b in batches["device"]]
    assert sum(len(b["key"]) for b in batches["device"]) == 32
    for a, b in zip(batches["workers"], batches["device"]):
        assert a["text"] == b["text"]
        assert a["image"].shape == b["image"].shape == (4, 3, 32, 32)
        diff = (a["image"] - b["image"]).abs() * 255
        assert diff.mean() < 0.25 and diff.max() <= 2.01, (b["key"], diff.mean(), diff.max())


def test_a_jpeg_nothing_can_decode_costs_its_batch_counted(tmp_path: Path) -> None:
    """Its header passes the workers' check; on the device neither decoder reads it: the batch is
    dropped (``prepare`` gives None), counted, and the other batches come through as before."""
    shard = write_tar(tmp_path / "photos-0.tar", samples(with_corrupt=True))
    ld = loader(shard, "device")
    kept = [b for b in (ld.prepare(b, "cpu") for b in ld) if b is not None]
    assert ld.skipped == Counter({"truncated_image": 1, "too_large": 1, "missing_caption": 1, "bad_image": 1,
                                  "in_batch_of_a_bad_jpeg": 3})
    assert len(kept) == 7 and all("0020" not in b["key"] for b in kept)
    workers = loader(shard, "workers")
    assert sum(len(b["key"]) for b in workers) == 32 and workers.skipped["bad_image"] == 1


@pytest.mark.parametrize(("kw", "message"), [
    ({"kind": "multi_view"}, r"data.decode: device decodes the images of image-text pairs"),
    ({"view_transforms": ["simclr", "simclr"]}, r"data.decode: device decodes the images of image-text pairs"),
    ({"transform": "digits"}, r"crops as transform clip does, but data.transform is digits"),
    ({"normalize": "workers"}, r"set data.normalize: device"),
])
def test_device_decoding_is_refused_where_the_device_cannot_do_the_workers_job(kw: dict, message: str) -> None:
    base = {"train_shards": "x-0.tar", "decode": "device", "transform": "clip", **kw}
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "configs" / "clip_digits.yaml", [f"data.{k}={json.dumps(v)}" for k, v in base.items()])


def test_a_clip_recipe_trains_on_device_decoded_jpegs(tmp_path: Path) -> None:
    """Through the trainer, in a loader worker: the batch of the corrupt JPEG is passed over, and
    every skip is in the log."""
    shard = write_tar(tmp_path / "photos-0.tar", samples(with_corrupt=True))
    recipe = load_recipe(ROOT / "configs" / "clip_digits.yaml", [
        f"data.train_shards={shard}", f"run.output_dir={tmp_path / 'run'}", "data.decode=device",
        "data.transform=clip", "data.batch_size=8", "data.num_workers=1", "data.max_pixels=100000",
        "train.steps=3", "train.log_every=1", "train.progress=false", "eval.zeroshot_shards=null"])
    Trainer(recipe).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert [r["skipped"] for r in rows if "loss" in r][-1] == {
        "truncated_image": 1, "too_large": 1, "missing_caption": 1, "bad_image": 1, "in_batch_of_a_bad_jpeg": 7}


def test_a_batch_of_jpegs_crosses_from_a_worker_as_one_tensor(tmp_path: Path) -> None:
    """A tensor a worker sends holds a file descriptor until the main process reads it: one per JPEG
    ran a process with the common 1024-descriptor limit out of them within 4 prefetched batches of
    256. With 200 descriptors, 3 epochs of batches of 200 JPEGs go through."""
    rng = np.random.default_rng(0)
    tiny = {f"{i:04d}": {"jpg": jpeg(Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))),
                         "txt": b"noise"} for i in range(1000)}
    shard = write_tar(tmp_path / "tiny-0.tar", tiny)
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT / 'tests')!r})
resource.setrlimit(resource.RLIMIT_NOFILE, (200, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from conftest import cfg_for
from mmcl.data import make_loader
loader = make_loader(cfg_for({str(shard)!r}, transform="clip", decode="device", batch_size=200, num_workers=1),
                     tokenizer=lambda texts: texts)
n = 0
for epoch in range(3):
    loader.set_epoch(epoch)
    n += sum(len(loader.prepare(b, "cpu")["key"]) for b in loader)
loader.close()
print(n)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.split()[-1] == "3000", done.stderr[-2000:]
