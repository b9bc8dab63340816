"""mmcl-prep: digits splits, every source, bad inputs counted by reason, atomic shards."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import manifest, png_bytes
from PIL import Image

from data_prep.cli import main as prep_main
from data_prep.images import ImageOptions, load_image
from data_prep.writer import Record, build_split


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    """All samples of a tar shard: key -> {extension: bytes}."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, ext = m.name.partition(".")
            out.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return out


def test_digits_splits_ids_and_manifest(digits_dir: Path) -> None:
    m = manifest(digits_dir)
    splits = m["splits"]
    assert {k: v["total"] for k, v in splits.items()} == {"train": 1257, "val": 180, "test": 360,
                                                          "test-shifted": 360}
    assert m["class_names"][7] == "seven"
    assert splits["train"]["pattern"] == "train-{000000..000004}.tar"
    assert [s["samples"] for s in splits["train"]["shards"]] == [256, 256, 256, 256, 233]
    ids, samples = [], {}
    for split in splits:
        for shard in splits[split]["shards"]:
            for key, s in read_tar(digits_dir / shard["name"]).items():
                meta = json.loads(s["json"])
                assert meta["id"] == int(key)
                ids.append(meta["id"])
                samples[(split, meta.get("source_id", meta["id"]))] = (s, meta)
    assert len(ids) == len(set(ids)) == 2157  # unique across the whole dataset
    # a test image and its shifted copy: same label and caption, different pixels, RGB 32x32
    first = min(i for split, i in samples if split == "test")
    (orig, om), (shifted, sm) = samples[("test", first)], samples[("test-shifted", first)]
    assert om["label"] == sm["label"] and orig["txt"] == shifted["txt"] and sm["id"] == 1797 + first
    a, b = (np.asarray(Image.open(io.BytesIO(x["png"]))) for x in (orig, shifted))
    assert a.shape == b.shape == (32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5
    assert b"digit" in orig["txt"] or b"number" in orig["txt"] or b"handwritten" in orig["txt"]


def test_digits_build_is_reproducible(tmp_path: Path, digits_dir: Path) -> None:
    assert prep_main(["digits", "--out", str(tmp_path), "--workers", "2", "--no-progress"]) == 0
    for name in ("train-000000.tar", "test-shifted-000001.tar"):
        assert (tmp_path / name).read_bytes() == (digits_dir / name).read_bytes()


def make_bad_images(folder: Path) -> dict[str, str]:
    """Write one file per bad-input case; return file name -> expected outcome."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    (folder / "ok.png").write_bytes(png_bytes(rgb))
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    (folder / "ok.jpg").write_bytes(buf.getvalue())
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 200, dtype=np.uint8)))
    (folder / "text.png").write_bytes(b"this is not an image at all")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((20, 30), 128, np.uint8)])).save(folder / "alpha.png")
    Image.fromarray((rng.integers(0, 65535, (20, 30))).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    Image.new("RGB", (300, 300)).save(folder / "huge.png")
    return {"ok.png": "ok", "ok.jpg": "ok", "palette.png": "ok", "alpha.png": "ok", "sixteen.png": "ok",
            "gray.png": "ok", "truncated.jpg": "truncated image", "empty.png": "empty file",
            "corrupt.png": "not an image or corrupt", "text.png": "not an image or corrupt",
            "huge.png": "too many pixels (decompression bomb)", "nope.png": "missing file"}


def test_load_image_converts_or_names_the_reason(tmp_path: Path) -> None:
    cases = make_bad_images(tmp_path)
    opts = ImageOptions(max_pixels=50_000, max_side=16)
    for name, expected in cases.items():
        data, reason = load_image(tmp_path / name, opts)
        if expected == "ok":
            img = Image.open(io.BytesIO(data))
            assert reason is None and img.mode == "RGB" and max(img.size) == 16, name
        else:
            assert data is None and reason == expected, name
    # alpha is composited on white; 16-bit is rescaled, not clipped to white
    alpha = np.asarray(Image.open(io.BytesIO(load_image(tmp_path / "alpha.png", ImageOptions())[0])))
    assert alpha.min() >= 127
    sixteen = np.asarray(Image.open(io.BytesIO(load_image(tmp_path / "sixteen.png", ImageOptions())[0])))
    assert 60 < sixteen.mean() < 200


def test_table_with_bad_rows_counts_skips_by_reason(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = make_bad_images(tmp_path / "img")
    rows = [{"image": f"img/{name}", "caption": f"picture {name}", "label": "a" if i % 2 else "b"}
            for i, name in enumerate(cases)]
    rows.append({"image": "img/ok.png", "caption": "  ", "label": "a"})  # empty caption
    rows.append({"image": "img/ok.png", "label": "b"})  # missing caption
    table = tmp_path / "pairs.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "shards"
    assert prep_main(["table", str(table), "--out", str(out), "--label-column", "label", "--max-pixels",
                      "50000", "--shard-size", "4", "--workers", "2", "--no-progress"]) == 0
    m = manifest(out)["splits"]["train"]
    assert m["total"] == 6 and m["class_names"] == ["a", "b"]
    assert {k: v["count"] for k, v in m["skipped"].items()} == {
        "empty file": 1, "missing file": 1, "missing or empty caption": 2, "not an image or corrupt": 2,
        "too many pixels (decompression bomb)": 1, "truncated image": 1}
    assert [s["samples"] for s in m["shards"]] == [4, 2]
    printed = capsys.readouterr().out
    assert "skipped 2: missing or empty caption" in printed
    written = {**read_tar(out / "train-000000.tar"), **read_tar(out / "train-000001.tar")}
    assert all(Image.open(io.BytesIO(s["png"])).mode == "RGB" for s in written.values())
    assert {json.loads(s["json"])["class_name"] for s in written.values()} == {"a", "b"}


def test_csv_tsv_and_multi_field_rows(tmp_path: Path) -> None:
    make_bad_images(tmp_path)
    (tmp_path / "t.tsv").write_text("rgb\tdepth\tcaption\nok.png\tgray.png\ttwo fields\n")
    assert prep_main(["table", str(tmp_path / "t.tsv"), "--out", str(tmp_path / "o"), "--image-column", "rgb",
                      "--image-column", "depth", "--no-progress"]) == 0
    (sample,) = read_tar(tmp_path / "o" / "train-000000.tar").values()
    assert set(sample) == {"rgb.png", "depth.png", "txt", "json"}
    (tmp_path / "t.csv").write_text("path,text\nok.png,hello\n")
    assert prep_main(["table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "c"), "--image-column",
                      "path", "--caption-column", "text", "--format", "jpg", "--no-progress"]) == 0
    (sample,) = read_tar(tmp_path / "c" / "train-000000.tar").values()
    assert sample["txt"] == b"hello" and "jpg" in sample


def test_user_mistakes_exit_nonzero_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert prep_main(["table", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "t.csv").write_text("img,caption\nx.png,a\n")
    assert prep_main(["table", str(tmp_path / "t.csv"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no column 'image'; the columns are caption, img" in capsys.readouterr().err
    (tmp_path / "u.csv").write_text("image,caption\nx.png,a\n")  # every row bad -> nothing written
    assert prep_main(["table", str(tmp_path / "u.csv"), "--out", str(tmp_path / "o"), "--no-progress"]) == 1
    assert "no valid sample was written" in capsys.readouterr().err


def test_folder_source(tmp_path: Path) -> None:
    for cls, n in (("cat", 2), ("sea_lion", 3)):
        (tmp_path / "in" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "in" / cls / f"{i}.png").write_bytes(png_bytes(np.full((8, 8, 3), i * 40, np.uint8)))
    (tmp_path / "in" / "cat" / "bad.jpg").write_bytes(b"garbage")
    assert prep_main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o"), "--no-progress"]) == 0
    m = manifest(tmp_path / "o")
    assert m["class_names"] == ["cat", "sea_lion"] and m["splits"]["train"]["total"] == 5
    assert m["splits"]["train"]["skipped"]["not an image or corrupt"]["count"] == 1
    captions = [s["txt"].decode() for s in read_tar(tmp_path / "o" / "train-000000.tar").values()]
    assert sum("sea lion" in c for c in captions) == 3


def test_hf_dataset_saved_to_disk(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    imgs = [Image.fromarray(np.full((10, 10, 3), i * 60, np.uint8)) for i in range(4)]
    features = datasets.Features({"img": datasets.Image(), "text": datasets.Value("string"),
                                  "y": datasets.ClassLabel(names=["no", "yes"])})
    ds = datasets.Dataset.from_dict({"img": imgs, "text": ["a", "b", "", "d"], "y": [0, 1, 0, 1]},
                                    features=features)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "ds"))
    assert prep_main(["hf", str(tmp_path / "ds"), "--out", str(tmp_path / "o"), "--image-column", "img",
                      "--caption-column", "text", "--label-column", "y", "--no-progress"]) == 0
    m = manifest(tmp_path / "o")
    assert m["splits"]["train"]["total"] == 3 and m["splits"]["test"]["total"] == 2
    assert m["class_names"] == ["no", "yes"]
    assert m["splits"]["train"]["skipped"]["missing or empty caption"]["count"] == 1
    test_ids = {json.loads(s["json"])["id"] for s in read_tar(tmp_path / "o" / "test-000000.tar").values()}
    assert test_ids == {4, 5}  # ids continue after the train split: unique across the dataset


def test_interrupted_build_leaves_only_whole_shards(tmp_path: Path) -> None:
    def records():
        for i in range(10):
            if i == 7:
                raise KeyboardInterrupt
            yield Record(sample_id=i, images={"image": np.zeros((4, 4, 3), np.uint8)}, caption="x")

    with pytest.raises(KeyboardInterrupt):
        build_split(tmp_path, "train", records(), opts=ImageOptions(), shard_size=3, progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["train-000000.tar", "train-000001.tar"]  # shard 2 was in progress: gone, no .tmp
    assert all(len(read_tar(tmp_path / n)) == 3 for n in names)


# A value per mmcl-prep option (and subcommand) that cannot be right, and what the error says is allowed.
BAD_OPTIONS = [
    (["digits", "--max-side", "0"], "--max-side", "a positive integer (got 0)"),
    (["digits", "--max-side", "-1"], "--max-side", "a positive integer (got -1)"),
    (["digits", "--max-side", "big"], "--max-side", "a positive integer (got 'big')"),
    (["digits", "--shard-size", "0"], "--shard-size", "a positive integer"),
    (["digits", "--workers", "0"], "--workers", "a positive integer"),
    (["digits", "--max-pixels", "-5"], "--max-pixels", "a positive integer"),
    (["digits", "--quality", "0"], "--quality", "an integer from 1 to 100"),
    (["digits", "--quality", "101"], "--quality", "an integer from 1 to 100"),
    (["digits", "--seed", "-1"], "--seed", "an integer from 0 to 4294967295"),
    (["digits", "--seed", str(2**32)], "--seed", "an integer from 0 to 4294967295"),
    (["digits", "--size", "0"], "--size", "a positive integer"),
    (["digits", "--val-fraction", "0"], "--val-fraction", "a number between 0 and 1, exclusive"),
    (["digits", "--test-fraction", "1"], "--test-fraction", "a number between 0 and 1, exclusive"),
    (["digits", "--test-fraction", "nan"], "--test-fraction", "a number between 0 and 1, exclusive"),
    (["digits", "--val-fraction", "0.5", "--test-fraction", "0.5"], "--val-fraction and --test-fraction",
     "add up to less than 1"),
    (["table", "t.csv", "--split", ""], "--split", "a split name"),
    (["table", "t.csv", "--image-column", "a", "--image-column", "a"], "--image-column", "once"),
    (["folder", "in", "--split", "../train"], "--split", "a split name"),
    (["folder", "in", "--max-side", "0"], "--max-side", "a positive integer"),
    (["hf", "ds", "--split", "a/b"], "--split", "a split name"),
    (["hf", "ds", "--workers", "-2"], "--workers", "a positive integer"),
    (["photos", "--size", "0"], "--size", "a positive integer (got 0)"),
    (["photos", "--samples", "0"], "--samples", "a positive integer (got 0)"),
    (["photos", "--source", "flickr"], "--source", "invalid choice: 'flickr'"),
    (["photos", "--source", "sklearn", "--source", "sklearn"], "--source", "once"),
    (["photos", "--min-scale", "0"], "--min-scale", "a number between 0 and 1, exclusive"),
    (["photos", "--samples", "4"], "--samples and --test-fraction", "rounds to 0 test samples of 4"),
    (["photos", "--samples", "10", "--test-fraction", "0.99"], "--samples and --test-fraction",
     "rounds to 10 test samples of 10"),
]


@pytest.mark.parametrize(("args", "option", "allowed"), BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_out_of_range_options_are_one_line_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                        args: list[str], option: str, allowed: str) -> None:
    """A value that cannot be right (``--max-side 0`` wrote every image as 1x1) stops mmcl-prep
    before any work: exit 2 and argparse's one-line error naming the option and what is allowed."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        prep_main([*args, "--out", str(out), "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument{'s' if ' and ' in option else ''} {option}: " in err and allowed in err
    assert "Traceback" not in err and not out.exists()


def test_out_must_be_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        prep_main(["digits", "--out", str(tmp_path / "file")])
    assert e.value.code == 2 and "argument --out: " in capsys.readouterr().err


def test_digits_fractions_too_small_for_every_class_are_an_error(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert prep_main(["digits", "--out", str(tmp_path / "o"), "--test-fraction", "0.001", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--test-fraction 0.001" in err and "fewer samples than the 10 classes" in err and "Traceback" not in err


def test_shard_writer_rejects_a_non_positive_shard_size(tmp_path: Path) -> None:
    from data_prep.writer import ShardWriter

    with pytest.raises(ValueError, match="shard_size must be a positive integer"):
        ShardWriter(tmp_path, "train", 0)


def test_rebuild_removes_stale_shards_of_a_split_with_glob_characters(tmp_path: Path) -> None:
    """A split such as ``train[:10%]`` (a Hugging Face slice) is a literal name, not a glob."""
    def records(n: int) -> list[Record]:
        return [Record(sample_id=i, images={"image": np.zeros((4, 4, 3), np.uint8)}, caption="x") for i in range(n)]

    for n in (3, 1):
        build_split(tmp_path, "train[:1]", records(n), opts=ImageOptions(), shard_size=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train[:1]-000000.tar"]


# --- mmcl-prep photos: random crops of the photos installed packages ship -------------------------

PHOTO_ARGS = ["--samples", "40", "--shard-size", "16", "--source", "sklearn", "--no-progress"]


@pytest.fixture(scope="module")
def photos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 crops (36 train, 4 test) of scikit-learn's two photos, built by two worker processes."""
    out = tmp_path_factory.mktemp("photos")
    assert prep_main(["photos", "--out", str(out), "--workers", "2", *PHOTO_ARGS]) == 0
    return out


def test_photos_are_224_px_jpegs_of_the_photo_their_caption_and_label_name(photos_dir: Path) -> None:
    import webdataset as wds
    from sklearn.datasets import load_sample_images

    from data_prep.captions import PHOTO_TEMPLATES

    m = manifest(photos_dir)
    assert m["class_names"] == ["pagoda", "flower"] and m["image_format"] == "jpg"
    assert {k: (v["total"], v["pattern"], v["class_names"]) for k, v in m["splits"].items()} == {
        "train": (36, "train-{000000..000002}.tar", ["pagoda", "flower"]),
        "test": (4, "test-{000000..000000}.tar", ["pagoda", "flower"])}
    assert m["source"]["type"] == "photos" and m["source"]["templates"] == list(PHOTO_TEMPLATES)
    originals = [Image.fromarray(a) for a in load_sample_images().images]  # china.jpg, flower.jpg
    labels: dict[str, list[int]] = {}
    for split in ("train", "test"):
        for s in wds.WebDataset(str(photos_dir / m["splits"][split]["pattern"]), shardshuffle=False):
            meta, caption = json.loads(s["json"]), s["txt"].decode()
            img = Image.open(io.BytesIO(s["jpg"]))
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (224, 224))
            assert meta["id"] == int(s["__key__"]) and meta["class_name"] == m["class_names"][meta["label"]]
            assert meta["source"] == ["sklearn/china.jpg", "sklearn/flower.jpg"][meta["label"]]
            assert caption in {t.format(meta["class_name"]) for t in PHOTO_TEMPLATES}
            labels.setdefault(split, []).append(meta["label"])
            # the pixels are the named photo's crop (JPEG round-off apart), not the other photo's
            diffs = []
            for photo in originals:
                crop = photo.resize((224, 224), Image.Resampling.BILINEAR, box=tuple(meta["crop"]))
                if meta["flip"]:
                    crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                diffs.append(np.abs(np.asarray(img, np.float32) - np.asarray(crop, np.float32)).mean())
            assert diffs[meta["label"]] < 8 < 25 < diffs[1 - meta["label"]], (s["__key__"], diffs)
    assert sorted(labels["train"]) == [0] * 18 + [1] * 18 and sorted(labels["test"]) == [0, 0, 1, 1]  # balanced
    assert labels["train"] != sorted(labels["train"])  # and shuffled


def test_photos_build_is_the_same_bytes_for_a_seed_whatever_the_workers(tmp_path: Path, photos_dir: Path) -> None:
    assert prep_main(["photos", "--out", str(tmp_path / "again"), "--workers", "1", *PHOTO_ARGS]) == 0
    tars = sorted(p.name for p in photos_dir.glob("*.tar"))
    assert len(tars) == 4 and sorted(p.name for p in (tmp_path / "again").glob("*.tar")) == tars
    for name in tars:
        assert (tmp_path / "again" / name).read_bytes() == (photos_dir / name).read_bytes(), name
    assert prep_main(["photos", "--out", str(tmp_path / "other"), "--workers", "1", "--seed", "1", *PHOTO_ARGS]) == 0
    other = read_tar(tmp_path / "other" / "train-000000.tar")
    same = read_tar(photos_dir / "train-000000.tar")
    assert other.keys() == same.keys()
    assert sum(other[k]["jpg"] != same[k]["jpg"] for k in same) == len(same)  # every crop differs


def test_clip_vit_b32_recipe_loader_reads_photo_shards(photos_dir: Path) -> None:
    """The CLIP ViT-B/32 recipe's own preprocessing (224 px, its transform, mean and std) streams
    the shards, and zero-shot evaluation finds the photos' class names in the manifest."""
    import torch

    from mmcl.data import class_names, expand_shards, make_loader
    from mmcl.recipe import load_recipe

    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "clip_vit_b32.yaml", [
        f"data.train_shards={photos_dir}/train-{{000000..000002}}.tar", "data.batch_size=8",
        "data.num_workers=0", "data.shuffle_buffer=16"])
    loader = make_loader(recipe.data, tokenizer=lambda texts: torch.tensor([len(t) for t in texts]))
    batches = list(loader)
    assert len(batches) == 4  # 36 samples, partial batch dropped
    assert batches[0]["image"].dtype == torch.uint8  # normalised on the device (data.normalize: device)
    b = loader.prepare(batches[0], "cpu")
    assert b["image"].shape == (8, 3, 224, 224) and b["image"].dtype == torch.float32
    assert b["image"].min() < -1 and b["image"].max() > 1  # normalised with CLIP's mean and std
    assert set(b["label"].tolist()) <= {0, 1} and all("pagoda" in c or "flower" in c for c in b["caption"])
    assert not loader.skipped
    test = str(photos_dir / "test-000000.tar")
    keys = [k for batch in make_loader(recipe.data, test, train=False, tokenizer=None) for k in batch["key"]]
    assert keys == ["000000036", "000000037", "000000038", "000000039"]
    assert class_names(expand_shards(test)) == ["pagoda", "flower"]


def test_crop_box_draws_in_range_and_falls_back_to_a_centred_crop() -> None:
    import random

    from data_prep.photos import crop_box

    rng = random.Random(0)
    for _ in range(500):
        x0, y0, x1, y1 = crop_box(rng, 640, 427, 0.25)
        w, h = x1 - x0, y1 - y0
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 427
        assert 0.24 <= w * h / (640 * 427) <= 1 and 0.74 <= w / h <= 1.34
    assert crop_box(rng, 1000, 10, 0.9) == (493, 0, 506, 10)  # no allowed crop fits: centred, ratio 4/3


def test_photos_without_scikit_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture) -> None:
    """scikit-image missing (here made so: its import fails) leaves its photos out with a note, or,
    asked for by name, is a one-line error."""
    from data_prep.photos import load_photos
    from mmcl.errors import DataError

    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    photos, notes = load_photos(["sklearn", "skimage"], 224)
    assert [p.class_name for p in photos] == ["pagoda", "flower"]
    assert notes == ["skimage photos left out: scikit-image is not installed (pip install 'mmcl[photos]' "
                     "adds its 8 photos)"]
    with pytest.raises(DataError, match="--source skimage: scikit-image is not installed"):
        load_photos(["sklearn", "skimage"], 224, explicit=True)
    with pytest.raises(DataError, match="unknown photo source 'flickr'; the sources are sklearn, skimage"):
        load_photos(["flickr"], 224)

    assert prep_main(["photos", "--out", str(tmp_path / "o"), "--samples", "10", "--workers", "1",
                      "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "note: skimage photos left out: scikit-image is not installed" in captured.err
    assert "classes (2): pagoda, flower" in captured.out and "samples/s)" in captured.out
    assert manifest(tmp_path / "o")["source"]["left_out"] == notes
    assert prep_main(["photos", "--out", str(tmp_path / "p"), "--source", "skimage", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == ("error: --source skimage: scikit-image is not installed (pip install 'mmcl[photos]' "
                           "adds its 8 photos)")
    assert not (tmp_path / "p").exists()


def test_scikit_image_photos_load_offline() -> None:
    pytest.importorskip("skimage")
    from data_prep.photos import PHOTOS, load_photos

    photos, notes = load_photos(["skimage"], 224)
    assert notes == [] and [p.name for p in photos] == [name for name, _ in PHOTOS["skimage"]]
    assert all(max(p.width, p.height) <= 640 and min(p.width, p.height) >= 300 for p in photos)


def jpeg_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG")
    return buf.getvalue()


def test_folder_split_by_key_is_stable_and_jpeg_sources_stay_jpeg(tmp_path: Path, capsys) -> None:
    """``--split val=0.2,test=0.2`` deals 60 files into train/val/test by a hash of each path: about
    the shares asked, the same on a re-run, and adding files moves none. JPEG sources give JPEG
    shards (PNG shards of photographs are about twice the size); PNG sources keep PNG."""
    def add(i: int) -> None:
        folder = tmp_path / "in" / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:03d}.jpg").write_bytes(jpeg_bytes(np.full((8, 8, 3), i * 2, np.uint8)))

    def splits(out: str) -> dict[str, set[str]]:
        assert prep_main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / out), "--split", "val=0.2,test=0.2",
                          "--workers", "1", "--no-progress"]) == 0
        m = manifest(tmp_path / out)
        assert m["image_format"] == "jpg" and m["source"]["image_format_because"] == "the source images are JPEG"
        assert m["source"]["held_out"] == {"val": 0.2, "test": 0.2, "by": "sha256 of each file's path"}
        return {split: {json.loads(s["json"])["source"] for shard in sorted((tmp_path / out).glob(f"{split}-*.tar"))
                        for s in read_tar(shard).values()} for split in m["splits"]}

    for i in range(60):
        add(i)
    first = splits("o1")
    assert sorted(first) == ["test", "train", "val"] and sum(map(len, first.values())) == 60
    assert all(6 <= len(first[s]) <= 18 for s in ("val", "test"))
    assert splits("o2") == first  # the same on a re-run
    for i in range(60, 90):
        add(i)
    more = splits("o3")
    assert all(first[s] <= more[s] for s in first)  # the first 60 stayed where they were
    (tmp_path / "png" / "c").mkdir(parents=True)
    (tmp_path / "png" / "c" / "0.png").write_bytes(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert prep_main(["folder", str(tmp_path / "png"), "--out", str(tmp_path / "o4"), "--no-progress"]) == 0
    assert manifest(tmp_path / "o4")["image_format"] == "png"
    with pytest.raises(SystemExit):
        prep_main(["folder", str(tmp_path / "in"), "--out", str(tmp_path / "o5"), "--split", "val=0.6,test=0.5"])
    assert "the held-out shares must add up to less than 1" in capsys.readouterr().err
