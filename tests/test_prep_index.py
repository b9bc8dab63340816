"""``mmcl-prep index``: img2dataset-shaped shards get mmcl's manifest and train as they are; a shard
cut short is counted as the loader reads it and reported."""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import manifest
from PIL import Image

from data_prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]
SHARD_URLS = 20  # img2dataset's --number_sample_per_shard here
# Per shard: (URLs, indices that failed to download (404), indices that failed to resize).
LAYOUT = [(20, {3, 11}, set()), (20, {0, 7}, {15}), (6, set(), set())]  # 46 URLs, 41 samples


def digit_jpeg(i: int) -> tuple[bytes, str]:
    """scikit-learn digit ``i`` as a 32 px JPEG, and a caption naming it."""
    from sklearn.datasets import load_digits

    from data_prep.captions import DIGIT_NAMES

    d = load_digits()
    img = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8)).resize((32, 32)).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue(), f"a photo of the number {DIGIT_NAMES[d.target[i]]}."


def img2dataset_folder(folder: Path, layout=LAYOUT) -> Path:
    """Shards as img2dataset 1.47 writes them with --output_format webdataset: ``00000.tar`` holding
    ``{key}.jpg``, ``.json``, ``.txt`` (webdataset's TarWriter writes a sample's members in sorted
    order) for each URL that succeeded, keys numbered by URL (failed URLs leave gaps), and
    ``00000_stats.json`` with the shard's counts and its failures by reason."""
    folder.mkdir(parents=True, exist_ok=True)
    width = math.ceil(math.log10(SHARD_URLS))  # img2dataset's compute_key
    n = 0
    for shard, (urls, not_found, bad) in enumerate(layout):
        status: Counter[str] = Counter()
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for i in range(urls):
                if i in not_found or i in bad:
                    status["HTTP Error 404: Not Found" if i in not_found else "Image decoding error"] += 1
                    continue
                status["success"] += 1
                key = f"{10 ** width * shard + i:0{width + 5}d}"
                jpg, caption = digit_jpeg(n)
                n += 1
                meta = {"url": f"http://127.0.0.1:8000/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": 32, "height": 32, "original_width": 64,
                        "original_height": 64, "exif": "{}", "sha256": "0" * 64}
                for ext, data in (("jpg", jpg), ("json", json.dumps(meta, indent=4).encode()),
                                  ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        stats = {"count": urls, "successes": status["success"], "failed_to_download": len(not_found),
                 "failed_to_resize": len(bad), "duration": 1.5, "start_time": 0.0, "end_time": 1.5,
                 "status_dict": dict(status)}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
        (folder / f"{shard:05d}.parquet").write_bytes(b"PAR1")  # beside every shard; indexing ignores it
    return folder


def test_index_img2dataset_shards_then_train_clip_on_them(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The manifest's numbers are the shards' and img2dataset's, and the real Trainer trains on the shards
    as they are: its epoch is the manifest's 41 samples (5 batches of 8), summary and card say 41."""
    from mmcl.data import count_samples, describe, expand_shards
    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    shards = img2dataset_folder(tmp_path / "web")
    assert prep_main(["index", str(shards)]) == 0
    printed = capsys.readouterr()
    m = manifest(shards)
    assert m["source"] == {"type": "img2dataset", "made_by": "mmcl-prep index"}
    assert (m["format"], m["image_format"], m["class_names"]) == ("mmcl-shards/1", "jpg", None)
    assert m["splits"] == {"train": {
        "shards": [{"name": "00000.tar", "samples": 18}, {"name": "00001.tar", "samples": 17},
                   {"name": "00002.tar", "samples": 6}],
        "pattern": "{00000..00002}.tar", "total": 41, "skipped": {}, "formats": {"jpg": 41, "json": 41, "txt": 41},
        "img2dataset": {"shards": 3, "count": 46, "successes": 41, "failed_to_download": 4, "failed_to_resize": 1,
                        "failed_by_reason": {"HTTP Error 404: Not Found": 4, "Image decoding error": 1}},
        "faults": {}}}
    assert "train: 41 samples in 3 shard(s) (jpg 41, json 41, txt 41)" in printed.out
    assert "img2dataset: 46 URLs, 41 downloaded, 4 failed to download, 1 failed to resize" in printed.out
    assert "failed 4: HTTP Error 404: Not Found" in printed.out and not printed.err
    urls = expand_shards(str(shards))  # a folder stands for its *.tar
    assert count_samples(urls) == 41
    assert describe(str(shards / m["splits"]["train"]["pattern"])) == {
        "name": "img2dataset/train", "shards": str(shards / "{00000..00002}.tar"), "samples": 41}

    run = tmp_path / "run"
    recipe = load_recipe(ROOT / "configs" / "clip_digits.yaml", [
        f"data.train_shards={shards}", f"run.output_dir={run}", "data.batch_size=8", "data.num_workers=0",
        "data.shuffle_buffer=20", "train.steps=6", "train.log_every=1", "optim.warmup_steps=2",
        "train.progress=false", "eval.zeroshot_shards=null"])
    trainer = Trainer(recipe)
    trainer.fit()
    assert trainer.loader.stream.epoch_samples == 41
    assert "train.steps 6 = 48 samples = 1.2 epochs of 41 training samples" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = {r["step"]: r["epoch"] for r in rows if "loss" in r}
    assert epochs == {1: 0, 2: 0, 3: 0, 4: 0, 5: 0, 6: 1}  # 41 samples: 5 whole batches of 8 an epoch
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in rows if "loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data"]["train_samples"] == 41 and summary["data"]["skipped"] == {}
    assert "(41 samples)" in (run / "final" / "README.md").read_text()


def cut(path: Path, member: str, into: int) -> None:
    """Cut a tar file ``into`` bytes into the data of ``member`` (a download or copy that stopped)."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(member).offset_data
    path.write_bytes(path.read_bytes()[: offset + into])


def test_a_shard_cut_short_is_counted_as_the_loader_reads_it_and_reported(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    from mmcl.data import make_loader
    from mmcl.data.shards import expand_shards, samples_per_shard
    from mmcl.recipe import load_recipe

    shards = img2dataset_folder(tmp_path / "web")
    cut(shards / "00001.tar", "0000109.jpg", 100)  # 0000101..0000108 whole (7 samples), 0000109 lost
    (shards / "00002_stats.json").unlink()  # img2dataset stopped before finishing shard 2
    assert prep_main(["index", str(shards)]) == 0
    err = capsys.readouterr().err
    split = manifest(shards)["splits"]["train"]
    assert [s["samples"] for s in split["shards"]] == [18, 7, 6] and split["total"] == 31
    assert split["img2dataset"]["shards"] == 2 and split["img2dataset"]["successes"] == 35
    assert set(split["faults"]) == {"00001.tar", "00002.tar"}
    assert split["faults"]["00001.tar"].startswith("cut short: 0000109.jpg ends ")
    assert split["faults"]["00002.tar"].startswith("no 00002_stats.json: img2dataset had not finished")
    assert "warning: 00001.tar: cut short: 0000109.jpg" in err and "warning: 00002.tar: no 00002_stats.json" in err

    # the loader reads exactly the counted samples: the cut shard is one bad_shard, no sample counted as lost
    urls = expand_shards(str(shards))
    assert samples_per_shard(urls) == {str(shards / "00000.tar"): 18, str(shards / "00001.tar"): 7,
                                       str(shards / "00002.tar"): 6}
    recipe = load_recipe(ROOT / "configs" / "clip_digits.yaml", [
        f"data.train_shards={shards}", "data.batch_size=1", "data.num_workers=0"])
    loader = make_loader(recipe.data, train=False)
    assert sum(len(b["key"]) for b in loader) == 31
    assert loader.skipped == {"bad_shard": 1}

    # a header cut in two, a file that is no tar, an unfinished shard without end blocks
    (shards / "00002_stats.json").write_text("{not json")
    with tarfile.open(shards / "00000.tar") as tar:
        third = tar.getmembers()[2].offset  # the header of 0000000.txt
    (shards / "00000.tar").write_bytes((shards / "00000.tar").read_bytes()[: third + 100])
    (shards / "00003.tar").write_bytes(b"<html>404</html>")
    assert prep_main(["index", str(shards)]) == 0
    split = manifest(shards)["splits"]["train"]
    assert [s["samples"] for s in split["shards"]] == [1, 7, 6, 0] and split["pattern"] == "{00000..00003}.tar"
    assert split["faults"]["00000.tar"].startswith("unreadable data after 0000000.json")
    assert split["faults"]["00003.tar"].startswith("not readable as a tar file: ")
    assert split["faults"]["00002_stats.json"].startswith("img2dataset stats not readable")


def test_plain_webdataset_shards_index_to_mmcl_prep_s_own_counts(digits_dir: Path, tmp_path: Path) -> None:
    """Shards with no stats (any WebDataset folder): the counts are those mmcl-prep wrote them with."""
    built = manifest(digits_dir)["splits"]["train"]
    for s in built["shards"]:
        shutil.copy(digits_dir / s["name"], tmp_path / s["name"])
    assert prep_main(["index", str(tmp_path), "--split", "digits-train"]) == 0
    m = manifest(tmp_path)
    split = m["splits"]["digits-train"]
    assert split["shards"] == built["shards"] and split["total"] == built["total"] == 1257
    assert split["pattern"] == built["pattern"] and split["formats"] == {"json": 1257, "png": 1257, "txt": 1257}
    assert m["source"]["type"] == "webdataset" and "img2dataset" not in split and split["faults"] == {}


def test_index_replaces_only_its_own_manifest_unless_forced(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = img2dataset_folder(tmp_path / "web", LAYOUT[:1])
    (shards / "manifest.json").write_text(json.dumps({"format": "mmcl-shards/1", "source": {"type": "table"},
                                                      "splits": {}}))
    assert prep_main(["index", str(shards)]) == 2
    err = capsys.readouterr().err
    assert "was written by mmcl-prep table, not by mmcl-prep index" in err and "--force" in err
    assert "Traceback" not in err and manifest(shards)["source"] == {"type": "table"}
    assert prep_main(["index", str(shards), "--force"]) == 0
    assert prep_main(["index", str(shards), "--split", "web"]) == 0  # its own: replaced without --force
    assert list(manifest(shards)["splits"]) == ["web"]
    (shards / "manifest.json").write_text("{")
    assert prep_main(["index", str(shards)]) == 2 and "not readable JSON" in capsys.readouterr().err
    assert prep_main(["index", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert prep_main(["index", str(tmp_path / "empty")]) == 2 and "no .tar shard in" in capsys.readouterr().err
    (tmp_path / "empty" / "00000.tar").write_bytes(b"")
    assert prep_main(["index", str(tmp_path / "empty")]) == 1
    assert "error: the shards hold no sample" in capsys.readouterr().err
