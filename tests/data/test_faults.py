"""One bad sample never stops a run: every per-sample fault is a counted skip, in every loader path,
and shards from other tools decode exactly as mmcl-prep converts images."""

from __future__ import annotations

import functools
import io
import shutil
import struct
import tarfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cfg_for, collect, png_bytes
from PIL import Image, ImageFile

from data_prep.images import ImageOptions, load_image
from mmcl.data import make_loader
from mmcl.evaluate.run import frozen_feature_evals, retrieval_eval, zeroshot

Sample = dict[str, bytes]

# (reason counted, field, what it holds): unreadable or wrong-type .json sidecars, bad captions
JSON_FAULTS = [("bad_json", "json", data) for data in (b"[1, 2, 3]", b"not json {", b"null", b'"text"', b"\xff{")] + \
    [("bad_label", "json", data) for data in (b'{"label": "cat"}', b'{"label": 1.5}', b'{"label": -3}',
                                              b'{"label": true}', b'{"label": [1]}')] + \
    [("bad_id", "json", data) for data in (b'{"id": null}', b'{"id": "7"}', b'{"id": -1}', b'{"id": 2e3}',
                                           b'{"id": 1180591620717411303424}')]
CAPTION_FAULTS = [("bad_caption", "txt", b"\xff\xfe caption"), ("missing_caption", "txt", b"   ")]


def read_tar(path: Path) -> dict[str, Sample]:
    """All samples of a tar shard: key -> {extension: bytes}, in order."""
    out: dict[str, Sample] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def write_tar(path: Path, samples: dict[str, Sample] | list[tuple[str, bytes]]) -> Path:
    """A hand-made shard, as another tool might write it (from samples, or a list of members)."""
    members = samples if isinstance(samples, list) else \
        [(f"{key}.{ext}", data) for key, fields in samples.items() for ext, data in fields.items()]
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def with_faults(digits_dir: Path, faults: list[tuple[str, str, bytes]], n: int = 40) -> tuple[dict, dict]:
    """The first ``n`` digits val samples, one fault each in the first ones; returns (samples, {key: reason})."""
    samples = dict(list(read_tar(digits_dir / "val-000000.tar").items())[:n])
    assert len(faults) < n
    expected = {}
    for (key, sample), (reason, field, data) in zip(samples.items(), faults):
        sample[field] = data
        expected[key] = reason
    return samples, expected


@pytest.mark.parametrize("kind", ["image_text", "multi_view"])
def test_wrong_type_json_and_bad_captions_are_counted_skips_in_training(digits_dir: Path, tmp_path: Path,
                                                                         kind: str) -> None:
    # captions only matter to image-text recipes
    samples, expected = with_faults(digits_dir, JSON_FAULTS + (CAPTION_FAULTS if kind == "image_text" else []))
    shard = write_tar(tmp_path / "bad-0.tar", samples)
    loader = make_loader(cfg_for(str(shard), kind=kind, batch_size=1, transform="digits"), num_workers=1)
    keys, batches = collect(loader)  # before: the first wrong-type .json ended the run in the worker
    assert sorted(keys) == sorted(k for k in samples if k not in expected)
    assert loader.skipped == Counter(expected.values())
    assert all(b["label"].item() >= 0 and b["id"].item() == int(b["key"][0]) for b in batches)


class TinyClip(torch.nn.Module):
    """A stand-in CLIP model: image embedding = mean colour, text embedding from the prompt."""

    image_size = 32

    def tokenizer(self):
        return lambda texts: torch.tensor([[len(t), t.count(" ") + 1.0, sum(map(ord, t)) % 7 + 1.0] for t in texts])

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x.mean(dim=(2, 3)) + 0.1, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(tokens.float(), dim=-1)


def test_retrieval_zeroshot_and_knn_run_past_bad_samples_and_report_skips(digits_dir: Path, tmp_path: Path) -> None:
    samples, expected = with_faults(digits_dir, JSON_FAULTS + CAPTION_FAULTS)
    good = [k for k in samples if k not in expected]
    samples[good[0]]["json"] = b'{"label": null}'  # unlabelled: fine for retrieval, left out of classification
    samples[good[1]]["json"] = b'{"label": 12}'  # no class name for it (zero-shot only)
    shard = str(write_tar(tmp_path / "bad-0.tar", samples))
    model, pre = TinyClip(), {"image_size": TinyClip.image_size}

    # before: an AttributeError ended it
    res = retrieval_eval(model, shard, preprocess=pre, batch_size=8, num_workers=0)
    assert res["n"] == len(good) and res["skipped"] == Counter(expected.values())
    for direction in ("image_to_text", "text_to_image"):  # recall can only grow with k
        assert res[f"{direction}_R@1"] <= res[f"{direction}_R@5"] <= res[f"{direction}_R@10"], res

    image_only = Counter(r for r, _, _ in JSON_FAULTS)  # image-only reads ignore captions
    names = [str(i) for i in range(10)]
    zs = zeroshot(model, shard, preprocess=pre, templates=["{}"], classes=names, batch_size=8, num_workers=0)
    assert zs["n"] == len(good) - 2 + len(CAPTION_FAULTS)
    assert zs["skipped"] == image_only + Counter({"missing_label": 1, "unknown_class": 1})

    (knn,) = frozen_feature_evals(model, shard, [shard], preprocess=pre, k=1, batch_size=8, num_workers=0)
    assert knn["skipped"] == {r: 2 * n for r, n in (image_only + Counter({"missing_label": 1})).items()}


def loader_pixels(tmp_path: Path, image: bytes, size: int) -> torch.Tensor:
    """The [3, H, W] tensor in [0, 1] the evaluation loader makes of one hand-made sample."""
    shard = write_tar(tmp_path / "one.tar", {"000000001": {"png": image, "txt": b"a picture"}})
    loader = make_loader(cfg_for(str(shard), image_size=size), train=False)
    (batch,) = list(loader)
    return loader.prepare(batch, "cpu")["image"][0]


def prep_pixels(image: bytes) -> torch.Tensor:
    """What mmcl-prep stores for the same bytes, as a [3, H, W] tensor in [0, 1]."""
    data, reason = load_image(image, ImageOptions())
    assert reason is None
    return torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)), dtype=np.float32) / 255).permute(2, 0, 1)


def test_16_bit_png_decodes_as_mmcl_prep_converts_it(tmp_path: Path) -> None:
    depth = (np.arange(32 * 32).reshape(32, 32) * 60 + 500).astype(np.uint16)  # 500 .. 61880
    image = png_bytes(depth)
    assert Image.open(io.BytesIO(image)).mode.startswith("I")
    got, want = loader_pixels(tmp_path, image, 32), prep_pixels(image)
    assert torch.allclose(got, want, atol=1e-6)  # before: clipped to 255, nearly all white
    assert want.min() == 0 and want.max() == 1 and len(want.unique()) > 200  # scaled by the range


def transparent(mode: str) -> bytes:
    """A 16x16 image, left half opaque dark grey (64), right half fully transparent black."""
    alpha = np.zeros((16, 16), np.uint8)
    alpha[:, :8] = 255
    grey = np.full((16, 16), 64, np.uint8)
    if mode == "RGBA":
        return png_bytes(np.dstack([grey, grey, grey, alpha]))
    if mode == "LA":
        return png_bytes(np.dstack([grey, alpha]))
    img = Image.fromarray(np.where(alpha > 0, 1, 0).astype(np.uint8), mode="P")  # palette: 0 clear, 1 grey
    img.putpalette([0, 0, 0, 64, 64, 64])
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_pixels_are_white_as_mmcl_prep_makes_them(tmp_path: Path, mode: str) -> None:
    image = transparent(mode)
    got = loader_pixels(tmp_path, image, 16)
    assert torch.allclose(got, prep_pixels(image), atol=1e-6)
    assert torch.all(got[:, :, 8:] == 1.0)  # before: black
    assert torch.allclose(got[:, :, :8], torch.tensor(64 / 255))


def png_header(width: int, height: int) -> bytes:
    """A valid PNG of a few dozen bytes that declares ``width`` x ``height`` grey pixels (no data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_huge_declared_size_is_a_counted_skip_without_decoding(digits_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    samples = dict(list(read_tar(digits_dir / "val-000000.tar").items())[:8])
    keys = list(samples)
    samples[keys[0]]["png"] = png_header(13_000, 13_000)  # 169 MP: over the cap, under PIL's bomb error
    samples[keys[1]]["png"] = png_header(20_000, 20_000)  # 400 MP: PIL itself refuses to open it
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda img: loads.append(img.size) or real_load(img))
    loader = make_loader(cfg_for(str(write_tar(tmp_path / "huge.tar", samples))), train=False)
    got, _ = collect(loader)
    assert sorted(got) == sorted(keys[2:]) and loader.skipped == {"too_large": 2}
    assert max(w * h for w, h in loads) == 32 * 32  # the huge images were never decoded
    small = make_loader(cfg_for(str(tmp_path / "huge.tar"), max_pixels=32 * 32 - 1), train=False)
    assert collect(small)[0] == [] and small.skipped == {"too_large": 8}  # data.max_pixels, as mmcl-prep's


def test_truncated_and_unreadable_shards_count_the_samples_they_lost(digits_dir: Path, tmp_path: Path) -> None:
    # the manifest beside the shards says train-000002..4 hold 256, 256 and 233 samples
    shutil.copy(digits_dir / "manifest.json", tmp_path / "manifest.json")

    def cut(name: str, where: str) -> None:
        src = digits_dir / name
        with tarfile.open(src) as tar:
            m = tar.getmembers()[300]  # a member a good way in (each sample has three)
        at = m.offset if where == "between members" else m.offset_data + m.size // 2
        (tmp_path / name).write_bytes(src.read_bytes()[:at])

    cut("train-000002.tar", "between members")  # tarfile reads this as a whole, shorter tar
    cut("train-000003.tar", "inside a member")  # a read error
    (tmp_path / "train-000004.tar").write_bytes(b"this is not a tar file" * 100)  # nothing readable
    loader = make_loader(cfg_for(str(tmp_path / "train-{000002..000004}.tar"), batch_size=16), train=False)
    keys, _ = collect(loader)
    assert 2 * 90 < len(keys) < 2 * 110 and loader.skipped["bad_shard"] == 3
    read = len(keys) + loader.skipped["missing_caption"] + loader.skipped["missing_image"]  # incl. cut samples
    assert loader.skipped["bad_shard_samples"] == 256 + 256 + 233 - read  # before: not counted at all
    assert set(loader.skipped) <= {"bad_shard", "bad_shard_samples", "missing_caption", "missing_image"}


def test_a_duplicated_file_in_a_sample_is_counted_and_the_sample_kept(digits_dir: Path, tmp_path: Path) -> None:
    samples = dict(list(read_tar(digits_dir / "val-000000.tar").items())[:4])
    members = [(f"{key}.{ext}", data) for key, fields in samples.items() for ext, data in fields.items()]
    members.insert(1, (members[0][0], members[0][1]))  # the first sample's image, twice
    loader = make_loader(cfg_for(str(write_tar(tmp_path / "dup.tar", members))), train=False)
    got, _ = collect(loader)  # before: counted as an unreadable shard, the sample dropped
    assert sorted(got) == sorted(samples) and loader.skipped == {"duplicate_file": 1}


def test_an_extremely_elongated_image_is_cropped_before_it_is_resized() -> None:
    """A 2 x 200,000 px banner resized on its short side would be a 224 x 22.4 M px intermediate
    (15 GB); the eval transform cuts it to 32:1 first. Images within 32:1 give exactly open_clip's
    resize + centre crop."""
    import resource

    from torchvision.transforms import v2 as T

    from mmcl.data.transforms import build_transform

    norm = ((0.5,) * 3, (0.5,) * 3)
    eval_transform = functools.partial(build_transform, "eval")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert eval_transform(224, *norm)(Image.new("RGB", (200_000, 2))).shape == (3, 224, 224)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: no 15 GB intermediate
    plain = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32),
                       T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(*norm)])
    rng = np.random.default_rng(0)
    for shape in ((30, 20, 3), (41, 400, 3), (401, 40, 3), (1280, 40, 3)):
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8))
        assert torch.equal(eval_transform(32, *norm)(img), plain(img)), shape
