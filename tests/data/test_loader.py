"""mmcl.data: what mmcl-prep writes streams back; ranks x workers split; bad data is counted."""

from __future__ import annotations

import io
import itertools
import json
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cfg_for, collect
from PIL import Image

from mmcl.data import DataConfig, count_samples, expand_shards, make_loader
from mmcl.data.transforms import build_transform
from mmcl.errors import DataError


def test_round_trip_streams_back_what_was_written(digits_dir: Path) -> None:
    shards = str(digits_dir / "test-{000000..000001}.tar")
    loader = make_loader(cfg_for(shards), train=False, tokenizer=lambda t: torch.tensor([len(x) for x in t]))
    keys, batches = collect(loader)
    assert len(keys) == len(set(keys)) == 360 == count_samples(expand_shards(shards))
    written = {}
    for name in ("test-000000.tar", "test-000001.tar"):
        with tarfile.open(digits_dir / name) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                written.setdefault(key, {})[ext] = tar.extractfile(m).read()
    b = batches[0]
    for i, key in enumerate(b["key"]):
        pixels = np.asarray(Image.open(io.BytesIO(written[key]["png"])), dtype=np.float32) / 255
        assert torch.allclose(b["image"][i], torch.from_numpy(pixels).permute(2, 0, 1), atol=1e-6)
        assert b["caption"][i] == written[key]["txt"].decode()
        assert b["id"][i].item() == int(key)
        assert b["text"][i].item() == len(b["caption"][i])  # the tokenizer saw the captions
    assert b["label"].min() >= 0 and b["label"].max() <= 9


@pytest.mark.parametrize("train", [False, True])
def test_two_ranks_two_workers_see_every_sample_once(digits_dir: Path, train: bool) -> None:
    shards = str(digits_dir / "train-{000000..000004}.tar")
    seen: Counter[str] = Counter()
    for rank in range(2):
        loader = make_loader(cfg_for(shards, batch_size=1 if train else 7, num_workers=2), train=train,
                             rank=rank, world_size=2, tokenizer=None)
        assert loader.num_workers == 2
        loader.set_epoch(3)
        seen.update(collect(loader)[0])
    assert len(seen) == 1257 and set(seen.values()) == {1}


def test_shuffle_and_augmentation_are_seeded_and_worker_independent(digits_dir: Path) -> None:
    cfg = cfg_for(str(digits_dir / "test-{000000..000001}.tar"), kind="multi_view", transform="simclr",
                  batch_size=1)

    def epoch(workers: int, n: int) -> dict[str, list[torch.Tensor]]:
        loader = make_loader(cfg, seed=5, num_workers=workers)
        loader.set_epoch(n)
        return {b["key"][0]: b["views"] for b in loader}

    one, two = epoch(0, 1), epoch(2, 1)
    assert one.keys() == two.keys()
    for key in one:  # same sample -> same views, whatever the worker count
        assert all(torch.equal(a, b) for a, b in zip(one[key], two[key]))
    assert not torch.equal(*one[key])  # the two views of a sample differ
    other = epoch(0, 2)
    assert list(other) != list(one)  # a new epoch reshuffles
    assert not torch.equal(other[key][0], one[key][0])  # ... and re-augments


def test_view_fields_give_one_view_per_image_field_and_skip_samples_missing_one(digits_edges_dir: Path,
                                                                                 tmp_path: Path) -> None:
    with tarfile.open(digits_edges_dir / "test-000000.tar") as src, tarfile.open(tmp_path / "s-0.tar", "w") as dst:
        written, dropped = {}, []
        for m in src.getmembers():
            data = src.extractfile(m).read()
            key, _, ext = m.name.partition(".")
            if ext == "edges.png" and len(dropped) < 2:
                dropped.append(key)
                continue
            written[(key, ext)] = data
            dst.addfile(m, io.BytesIO(data))
    cfg = cfg_for(str(tmp_path / "s-0.tar"), kind="multi_view", view_fields=["png", "edges.png"], colour="ycbcr")
    loader = make_loader(cfg, train=False)
    keys, batches = collect(loader)
    assert len(keys) == 256 - 2 and not set(dropped) & set(keys)
    assert loader.skipped == {"missing_image:edges.png": 2}
    b = batches[0]
    assert len(b["views"]) == 2
    for v, field in enumerate(("png", "edges.png")):  # view v is field v, in the configured colour space
        pixels = np.asarray(Image.open(io.BytesIO(written[(b["key"][0], field)])).convert("YCbCr"), dtype=np.float32)
        assert torch.allclose(b["views"][v][0], torch.from_numpy(pixels / 255).permute(2, 0, 1), atol=1.5 / 255)
    assert not torch.equal(b["views"][0], b["views"][1])
    assert DataConfig(train_shards="x", view_fields=["png", "edges.png"], colour="lab").preprocess()["view_fields"] \
        == ["png", "edges.png"]


def test_corrupt_images_and_truncated_tar_are_skipped_and_counted(digits_dir: Path, tmp_path: Path) -> None:
    # shard 0: copied as is; shard 1: 3 images replaced with garbage; shard 2: cut in the middle
    shutil.copy(digits_dir / "train-000000.tar", tmp_path / "s-0.tar")
    with tarfile.open(digits_dir / "train-000001.tar") as src, tarfile.open(tmp_path / "s-1.tar", "w") as dst:
        bad = 0
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.endswith(".png") and bad < 3:
                data, bad = b"\x89PNG\r\n\x1a\n garbage", bad + 1
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    raw = (digits_dir / "train-000002.tar").read_bytes()
    (tmp_path / "s-2.tar").write_bytes(raw[: len(raw) // 2 + 700])
    complete = Counter()
    try:
        with tarfile.open(tmp_path / "s-2.tar", "r|") as tar:
            for m in tar:
                tar.extractfile(m).read()
                key, _, ext = m.name.partition(".")
                complete[key] += ext in ("png", "txt")
    except tarfile.ReadError:
        pass
    readable = sum(1 for n in complete.values() if n == 2)  # image and caption whole (json optional)
    loader = make_loader(cfg_for(str(tmp_path / "s-{0..2}.tar")), train=False)
    keys, _ = collect(loader)
    assert len(keys) == 256 + 253 + readable
    assert loader.skipped["truncated_image"] == 3  # a PNG signature, then too few bytes
    assert loader.skipped["bad_shard"] == 1
    assert sum(loader.skipped.values()) == 3 + 1 + loader.skipped.get("missing_caption", 0) + \
        loader.skipped.get("missing_image", 0)


def test_clear_errors_for_missing_shards_and_missing_fields(digits_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found: .*nope-0.tar"):
        make_loader(cfg_for(str(tmp_path / "nope-{0..1}.tar")))
    with pytest.raises(DataError, match="empty"):
        make_loader(cfg_for(""))
    with pytest.raises(DataError, match="cannot feed 2 processes"):
        make_loader(cfg_for(str(digits_dir / "val-000000.tar")), rank=0, world_size=2)
    # image-only shards used for an image-text recipe: a clear error naming the missing field
    with tarfile.open(digits_dir / "val-000000.tar") as src, tarfile.open(tmp_path / "img.tar", "w") as dst:
        for m in src.getmembers():
            if not m.name.endswith(".txt"):
                dst.addfile(m, src.extractfile(m))
    with pytest.raises(DataError, match=r"needs \['txt'\]"):
        collect(make_loader(cfg_for(str(tmp_path / "img.tar")), train=False))


def test_resampled_epochs_have_the_manifest_length(digits_dir: Path) -> None:
    shards = str(digits_dir / "train-{000000..000004}.tar")
    loader = make_loader(cfg_for(shards, resample=True, batch_size=32, num_workers=2), seed=1)
    keys, _ = collect(loader)
    assert len(keys) == 2 * -(-1257 // (2 * 32)) * 32  # ceil per worker, whole batches
    assert len(set(keys)) < len(keys)  # with replacement


def test_unknown_transform_is_a_config_error() -> None:
    from mmcl.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown transform 'simclrr'"):
        build_transform("simclrr", 32)


def test_random_gaussian_blur_matches_a_gaussian_convolution_and_follows_the_torch_seed() -> None:
    import math

    from sklearn.datasets import load_digits
    from torchvision.transforms.v2 import functional as F

    from mmcl.data.transforms import RandomGaussianBlur

    digit = np.kron(load_digits().images[3] / 16, np.ones((28, 28)))  # a real digit, 224 px
    img = Image.fromarray((digit * 255).astype(np.uint8)).convert("RGB")
    blur = RandomGaussianBlur((0.5, 2.0))
    for seed in range(3):
        torch.manual_seed(seed)
        sigma = float(torch.empty(1).uniform_(0.5, 2.0))
        torch.manual_seed(seed)
        fast = np.asarray(blur(img)).astype(float)
        k = 2 * math.ceil(4 * sigma) + 1
        reference = F.gaussian_blur(F.pil_to_tensor(img), [k, k], [sigma, sigma]).permute(1, 2, 0).numpy()
        diff = np.abs(fast - reference.astype(float))
        assert diff.max() <= 4 and diff.mean() < 0.5, (sigma, diff.max(), diff.mean())  # box approximation
        assert np.abs(fast - np.asarray(img)).max() > 20  # it did blur the strokes
        torch.manual_seed(seed)
        x = F.pil_to_tensor(img).float() / 255
        assert torch.equal(blur(x), F.gaussian_blur(x, [k, k], [sigma, sigma]))  # tensors: the convolution


@pytest.mark.parametrize("kind, transform, colour", [("image_text", "clip", "rgb"), ("multi_view", "simclr", "lab")])
def test_device_normalisation_gives_the_workers_batches_from_a_quarter_of_the_bytes(digits_dir: Path, kind: str,
                                                                                     transform: str,
                                                                                     colour: str) -> None:
    """``data.normalize: device`` (the default) ships uint8 images and normalises whole batches after the
    copy; with the same seed the result is the workers' float batch, bit for bit, augmentations included."""
    shards = str(digits_dir / "train-{000000..000001}.tar")
    batches = {}
    for where in ("device", "workers"):
        cfg = cfg_for(shards, kind=kind, transform=transform, colour=colour, normalize=where, batch_size=16,
                      num_workers=1, mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.25])
        loader = make_loader(cfg, seed=3)
        raw = next(iter(loader))
        images = [raw["image"]] if kind == "image_text" else raw["views"]
        assert all(x.dtype == (torch.uint8 if where == "device" else torch.float32) for x in images)
        batches[where] = loader.prepare(raw, "cpu")
        loader.close()
    dev, work = batches["device"], batches["workers"]
    assert dev["key"] == work["key"]
    pairs = [(dev["image"], work["image"])] if kind == "image_text" else list(zip(dev["views"], work["views"]))
    for d, w in pairs:
        assert d.dtype == torch.float32 and torch.equal(d, w)
        assert d.std() > 0.1  # normalised, not the raw 0..255 values


def equal_shards(digits_dir: Path, folder: Path, n: int, size: int = 60) -> str:
    """``n`` shards of ``size`` digits samples each (copied from the training shards), '::'-joined."""
    return sized_shards(digits_dir, folder, [size] * n)


def sized_shards(digits_dir: Path, folder: Path, sizes: list[int], manifest: bool = False) -> str:
    """Shards of the given numbers of digits samples (copied from the training shards), '::'-joined;
    with ``manifest``, a ``manifest.json`` beside them listing their sizes."""
    members: dict[str, list[tuple[tarfile.TarInfo, bytes]]] = {}
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        with tarfile.open(digits_dir / name) as tar:
            for m in tar.getmembers():
                members.setdefault(m.name.partition(".")[0], []).append((m, tar.extractfile(m).read()))
    keys = iter(list(members)[: sum(sizes)])
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"s-{i}.tar"
        with tarfile.open(path, "w") as tar:
            for key in itertools.islice(keys, size):
                for m, data in members[key]:
                    tar.addfile(m, io.BytesIO(data))
        paths.append(str(path))
    if manifest:
        shards = [{"name": Path(p).name, "samples": n} for p, n in zip(paths, sizes)]
        (folder / "manifest.json").write_text(json.dumps({"splits": {"train": {"shards": shards}}}))
    return "::".join(paths)


@pytest.mark.parametrize("n_shards", [3, 5, 7])
def test_uneven_shard_counts_give_every_process_the_same_share(digits_dir: Path, tmp_path: Path,
                                                               n_shards: int) -> None:
    """2 processes x 2 workers (1 worker per process for 3 shards: no idle workers) over shard counts
    that do not divide evenly, 60 samples a shard: in one training epoch every sample is seen once,
    and the processes' shares differ by at most one sample per shard shared sample by sample. Shards
    dealt whole gave 5 shards as 3 + 2 (180 against 120 samples an epoch): over a run, the smaller
    share was seen 1.5 times as often. (Shards of different sizes still give shares as different as
    the whole shards dealt to each process.)"""
    pattern = equal_shards(digits_dir, tmp_path, n_shards)
    seen: Counter[str] = Counter()
    share = []
    for rank in range(2):
        loader = make_loader(cfg_for(pattern, batch_size=1, num_workers=2), train=True, rank=rank, world_size=2)
        loader.set_epoch(1)
        keys = collect(loader)[0]
        seen.update(keys)
        share.append(len(keys))
        slots = 2 * max(1, loader.num_workers)
        loader.close()
    assert loader.num_workers == (1 if n_shards == 3 else 2)
    assert set(seen.values()) == {1} and len(seen) == 60 * n_shards
    assert abs(share[0] - share[1]) <= 2 * (n_shards % slots), (share, slots)


def test_shards_of_unequal_sizes_are_dealt_by_size(digits_dir: Path, tmp_path: Path) -> None:
    """Shards of 40, 40, 200, 40, 40, 40 samples on 2 processes (1 worker each): dealt in turn, a
    process could get 40 + 200 + 40 against 120 (2.3x as often seen over a run); dealt largest first
    to the smaller share, 200 against 200. Every sample is still read once per epoch."""
    pattern = sized_shards(digits_dir, tmp_path, [40, 40, 200, 40, 40, 40], manifest=True)
    seen: Counter[str] = Counter()
    shares = []
    for rank in range(2):
        loader = make_loader(cfg_for(pattern, batch_size=1, num_workers=1), train=True, rank=rank, world_size=2)
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            keys = collect(loader)[0]
            seen.update(keys)
            shares.append(len(keys))
        assert loader.stream.epoch_shares(1) == [200, 200]
        loader.close()
    assert set(seen.values()) == {2} and len(seen) == 400
    assert shares == [200, 200, 200, 200]


def test_the_run_says_when_shard_sizes_leave_the_shares_unequal(digits_dir: Path, tmp_path: Path) -> None:
    """300 + 100 samples on 2 processes cannot be shared evenly by whole shards: the shares are 300
    and 100 samples an epoch, which the stream reports (and the trainer says at the start)."""
    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    pattern = sized_shards(digits_dir, tmp_path, [300, 100], manifest=True)
    loader = make_loader(cfg_for(pattern, batch_size=1, num_workers=1), train=True, rank=0, world_size=2)
    assert loader.stream.epoch_shares(1) == [300, 100]
    root = Path(__file__).resolve().parents[2]
    trainer = Trainer(load_recipe(root / "configs" / "simclr_digits.yaml", [
        f"data.train_shards={pattern}", f"run.output_dir={tmp_path / 'run'}", "data.num_workers=0"]))
    trainer.loader = loader  # as process 0 of 2 sees it
    assert ("mmcl: shards of unequal sizes: the processes read 100 to 300 samples an epoch, so over a run the "
            "smaller shares are seen up to 3.00x as often") in trainer.sizes()
