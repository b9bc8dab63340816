"""``mmcl-prep index`` and ``mmcl-prep urls``: img2dataset-shaped shards get mmcl's manifest and train
as they are; a shard cut short is counted as the loader reads it and reported; img2dataset runs from
its own environment with mmcl's defaults (here a stand-in executable; the real one end to end when
it is installed, see the last test)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import manifest
from PIL import Image

from data_prep.cli import main as prep_main
from data_prep.urls import INSTALL, find_img2dataset, input_format
from mmcl.errors import DataError

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
        "shards": [{"name": n, "samples": k, "bytes": (shards / n).stat().st_size}
                   for n, k in (("00000.tar", 18), ("00001.tar", 17), ("00002.tar", 6))],
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


# --- mmcl-prep urls, with a stand-in for img2dataset ----------------------------------------------

FAKE = """#!{python}
import json, os, shutil, sys
from pathlib import Path
args = sys.argv[1:]
Path(os.environ["FAKE_I2D_LOG"]).write_text(json.dumps(args))
out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("--output_folder=")))
if any(p.name == "manifest.json" for p in out.iterdir()):
    sys.exit("ValueError: invalid literal for int() with base 10: 'manifest.json'")  # what img2dataset does
if os.environ.get("FAKE_I2D_SHARDS"):
    for p in Path(os.environ["FAKE_I2D_SHARDS"]).iterdir():
        shutil.copy(p, out / p.name)
sys.exit(int(os.environ.get("FAKE_I2D_EXIT", "0")))
"""


@pytest.fixture
def fake_venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A virtual environment whose ``bin/img2dataset`` logs its arguments and copies prepared shards."""
    exe = tmp_path / "venv" / "bin" / "img2dataset"
    exe.parent.mkdir(parents=True)
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(0o755)
    monkeypatch.setenv("FAKE_I2D_LOG", str(tmp_path / "argv.json"))
    monkeypatch.setenv("FAKE_I2D_SHARDS", str(img2dataset_folder(tmp_path / "prepared", LAYOUT[2:])))
    return exe.parent.parent


def logged(tmp_path: Path) -> list[str]:
    return json.loads((tmp_path / "argv.json").read_text())


def test_urls_runs_img2dataset_with_mmcl_defaults_then_indexes(tmp_path: Path, fake_venv: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "pairs.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a cat\n")
    out = tmp_path / "out"
    assert prep_main(["urls", str(tmp_path / "pairs.csv"), "--out", str(out), "--img2dataset", str(fake_venv)]) == 0
    assert logged(tmp_path) == [
        f"--url_list={tmp_path / 'pairs.csv'}", f"--output_folder={out}", "--output_format=webdataset",
        "--input_format=csv", "--url_col=url", "--caption_col=caption", "--image_size=224",
        "--resize_mode=center_crop", "--encode_format=jpg", "--encode_quality=95", "--number_sample_per_shard=10000",
        f"--processes_count={os.cpu_count()}", "--distributor=multiprocessing"]
    printed = capsys.readouterr().out
    assert f"running: {fake_venv / 'bin' / 'img2dataset'} --url_list=" in printed
    assert "train: 6 samples in 1 shard(s)" in printed
    m = manifest(out)
    assert m["splits"]["train"]["total"] == 6 and m["splits"]["train"]["img2dataset"]["count"] == 6

    # a second run resumes into the same folder: the manifest is moved out of img2dataset's way first;
    # options and the distributor pass on, and what follows -- goes as it is, replacing mmcl's value
    assert prep_main(["urls", str(tmp_path / "pairs.csv"), "--out", str(out), "--img2dataset",
                      str(fake_venv / "bin" / "img2dataset"), "--distributor", "ray", "--processes", "3",
                      "--threads", "16", "--size", "64", "--split", "web", "--caption-col", "caption",
                      "--", "--timeout", "20", "--resize-mode=border"]) == 0
    argv = logged(tmp_path)
    assert "--distributor=ray" in argv and "--processes_count=3" in argv and "--thread_count=16" in argv
    assert "--image_size=64" in argv and not any(a.startswith("--resize_mode") for a in argv)
    assert argv[-3:] == ["--timeout", "20", "--resize-mode=border"]
    assert list(manifest(out)["splits"]) == ["web"]


def test_urls_input_formats_and_captions(tmp_path: Path, fake_venv: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "list.txt").write_text("http://127.0.0.1/a.jpg\n")
    assert prep_main(["urls", str(tmp_path / "list.txt"), "--out", str(tmp_path / "o1"),
                      "--img2dataset", str(fake_venv)]) == 0
    argv = logged(tmp_path)
    assert "--input_format=txt" in argv and not any(a.startswith("--caption_col") for a in argv)
    assert prep_main(["urls", str(tmp_path / "list.txt"), "--out", str(tmp_path / "o2"), "--caption-col", "text",
                      "--img2dataset", str(fake_venv)]) == 2
    assert "holds URLs only, no captions" in capsys.readouterr().err
    (tmp_path / "pairs.tsv").write_text("link\ttext\nhttp://127.0.0.1/a.jpg\ta cat\n")
    assert prep_main(["urls", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "o3"),
                      "--img2dataset", str(fake_venv)]) == 2
    assert "has no column 'url'; its columns are link, text (name them with --url-col" in capsys.readouterr().err
    assert prep_main(["urls", str(tmp_path / "pairs.tsv"), "--out", str(tmp_path / "o3"), "--url-col", "link",
                      "--caption-col", "text", "--img2dataset", str(fake_venv)]) == 0
    assert {"--input_format=tsv", "--url_col=link", "--caption_col=text"} <= set(logged(tmp_path))
    (tmp_path / "excel.csv").write_text("\ufeffurl,caption\nhttp://127.0.0.1/a.jpg,a cat\n", encoding="utf-8")
    assert prep_main(["urls", str(tmp_path / "excel.csv"), "--out", str(tmp_path / "o5"),  # a byte-order mark
                      "--img2dataset", str(fake_venv)]) == 0
    (tmp_path / "pairs.jsonl").write_text('{"url": "http://127.0.0.1/a.jpg"}\n')
    assert prep_main(["urls", str(tmp_path / "pairs.jsonl"), "--out", str(tmp_path / "o4"), "--no-captions",
                      "--img2dataset", str(fake_venv)]) == 0
    assert not any(a.startswith("--caption_col") for a in logged(tmp_path))

    assert input_format(Path("x/laion_part.parquet")) == "parquet" and input_format(Path("A.CSV.GZ")) == "csv.gz"
    assert input_format(Path("a.jsonl")) == "jsonl" and input_format(Path("a.json")) == "json"
    (tmp_path / "parts").mkdir()
    for name in ("part-0.parquet", "part-1.parquet", "_SUCCESS"):
        (tmp_path / "parts" / name).write_bytes(b"")
    assert input_format(tmp_path / "parts") == "parquet"
    (tmp_path / "parts" / "extra.csv").write_text("url\n")
    with pytest.raises(DataError, match=r"files of several kinds \(csv, parquet\); give --input-format"):
        input_format(tmp_path / "parts")
    with pytest.raises(DataError, match="cannot tell the format of 'urls.xlsx'"):
        input_format(Path("urls.xlsx"))


def test_urls_errors_are_one_line_messages(tmp_path: Path, fake_venv: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture) -> None:
    csv = tmp_path / "pairs.csv"
    csv.write_text("url,caption\nhttp://127.0.0.1/a.jpg,a cat\n")

    def urls(*args: str) -> tuple[int, str]:
        code = prep_main(["urls", *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return code, err

    code, err = urls(str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"), "--img2dataset", str(fake_venv))
    assert code == 2 and "URL list" in err and "does not exist" in err
    monkeypatch.setenv("FAKE_I2D_EXIT", "3")
    code, err = urls(str(csv), "--out", str(tmp_path / "o"), "--img2dataset", str(fake_venv))
    assert code == 2 and "error: img2dataset failed (exit status 3; its messages are above). The command was: " in err
    monkeypatch.setenv("FAKE_I2D_EXIT", "0")
    monkeypatch.delenv("FAKE_I2D_SHARDS")
    code, err = urls(str(csv), "--out", str(tmp_path / "none"), "--img2dataset", str(fake_venv), "--distributor", "ray")
    assert code == 2 and "img2dataset wrote no .tar shard" in err and "ray is not installed" in err
    code, err = urls(str(csv), "--out", str(tmp_path / "o"), "--img2dataset", str(fake_venv), "--",
                     "--output_folder=/elsewhere")
    assert code == 2 and "img2dataset's --output_folder is set by mmcl-prep urls from --out" in err
    (tmp_path / "made").mkdir()
    (tmp_path / "made" / "manifest.json").write_text(json.dumps({"source": {"type": "digits"}}))
    (tmp_path / "argv.json").unlink(missing_ok=True)
    code, err = urls(str(csv), "--out", str(tmp_path / "made"), "--img2dataset", str(fake_venv))
    assert code == 2 and "written by mmcl-prep digits" in err and not (tmp_path / "argv.json").exists()
    code, err = urls(str(csv), "--out", str(tmp_path / "o"), "--img2dataset", str(tmp_path))
    assert code == 2 and "no img2dataset executable in it" in err and INSTALL in err

    # finding img2dataset: on the PATH, else pipx run, else how to install it in its own environment
    bare = tmp_path / "path"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))
    with pytest.raises(DataError, match="img2dataset was not found") as e:
        find_img2dataset(None)
    assert INSTALL in str(e.value) and "--img2dataset ~/.venvs/img2dataset" in str(e.value)
    with pytest.raises(DataError, match="--img2dataset pipx: pipx is not on the PATH"):
        find_img2dataset("pipx")
    pipx = bare / "pipx"
    pipx.write_text("#!/bin/sh\n")
    pipx.chmod(0o755)
    assert find_img2dataset(None) == [str(pipx), "run", "img2dataset"] == find_img2dataset("pipx")
    shutil.copy(fake_venv / "bin" / "img2dataset", bare / "img2dataset")
    assert find_img2dataset(None) == [str(bare / "img2dataset")] == find_img2dataset("img2dataset")


FAKE_PYSPARK = """import json, os
class _Builder:
    def master(self, url):
        self.url = url
        return self
    def appName(self, name):
        return self
    def getOrCreate(self):
        with open(os.environ["FAKE_SPARK_LOG"], "w") as f:
            json.dump({"master": self.url, "PYSPARK_PYTHON": os.environ.get("PYSPARK_PYTHON")}, f)
class SparkSession:
    builder = _Builder()
"""


def test_urls_on_a_spark_cluster_starts_the_session_in_img2dataset_s_python(
        tmp_path: Path, fake_venv: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """--spark-master: img2dataset's own Python (here the stand-in's, named on its first line) starts the
    session on that master, then runs img2dataset's command line with the same options, so img2dataset
    finds the session instead of making a local one; Spark's workers get that Python too."""
    from data_prep.urls import interpreter

    mods = tmp_path / "mods"
    main = "import os, runpy\n\ndef main():\n    runpy.run_path(os.environ['FAKE_I2D_SCRIPT'], run_name='__main__')\n"
    for name, text in (("pyspark/__init__.py", ""), ("pyspark/sql.py", FAKE_PYSPARK), ("img2dataset/__init__.py", ""),
                       ("img2dataset/main.py", main)):
        (mods / name).parent.mkdir(parents=True, exist_ok=True)
        (mods / name).write_text(text)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(mods), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("FAKE_SPARK_LOG", str(tmp_path / "spark.json"))
    monkeypatch.setenv("FAKE_I2D_SCRIPT", str(fake_venv / "bin" / "img2dataset"))
    monkeypatch.delenv("PYSPARK_PYTHON", raising=False)
    (tmp_path / "pairs.csv").write_text("url,caption\nhttp://127.0.0.1/a.jpg,a cat\n")
    out = tmp_path / "out"
    assert prep_main(["urls", str(tmp_path / "pairs.csv"), "--out", str(out), "--img2dataset", str(fake_venv),
                      "--distributor", "pyspark", "--spark-master", "spark://10.0.0.1:7077"]) == 0
    python = interpreter([str(fake_venv / "bin" / "img2dataset")])
    assert python == sys.executable  # no python beside the script: the one its first line names
    assert json.loads((tmp_path / "spark.json").read_text()) == {"master": "spark://10.0.0.1:7077",
                                                                  "PYSPARK_PYTHON": python}
    argv = logged(tmp_path)
    assert argv[0] == f"--url_list={tmp_path / 'pairs.csv'}" and "--distributor=pyspark" in argv
    assert f"running: {python} -c '<data_prep.urls.SPARK_DRIVER>' spark://10.0.0.1:7077 --url_list=" in \
        capsys.readouterr().out
    assert manifest(out)["splits"]["train"]["total"] == 6
    with pytest.raises(DataError, match="img2dataset must be installed in an environment"):
        interpreter(["/usr/bin/pipx", "run", "img2dataset"])


BAD_OPTIONS = [
    (["urls", "l.csv", "--out", "o", "--size", "0"], "--size", "a positive integer (got 0)"),
    (["urls", "l.csv", "--out", "o", "--quality", "101"], "--quality", "an integer from 1 to 100"),
    (["urls", "l.csv", "--out", "o", "--processes", "0"], "--processes", "a positive integer"),
    (["urls", "l.csv", "--out", "o", "--threads", "-1"], "--threads", "a positive integer"),
    (["urls", "l.csv", "--out", "o", "--shard-size", "0"], "--shard-size", "a positive integer"),
    (["urls", "l.csv", "--out", "o", "--distributor", "spark"], "--distributor", "invalid choice: 'spark'"),
    (["urls", "l.csv", "--out", "o", "--resize-mode", "crop"], "--resize-mode", "invalid choice: 'crop'"),
    (["urls", "l.csv", "--out", "o", "--input-format", "xlsx"], "--input-format", "invalid choice: 'xlsx'"),
    (["urls", "l.csv", "--out", "o", "--split", "a/b"], "--split", "a split name"),
    (["urls", "l.csv", "--out", "o", "--spark-master", "spark://h:7077"], "--spark-master",
     "needs --distributor pyspark (got --distributor multiprocessing)"),
    (["index", "d", "--split", ""], "--split", "a split name"),
]


@pytest.mark.parametrize(("args", "option", "allowed"), BAD_OPTIONS, ids=[" ".join(c[0]) for c in BAD_OPTIONS])
def test_out_of_range_options_are_one_line_usage_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture, args: list[str], option: str,
                                                        allowed: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        prep_main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}: " in err and allowed in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def _real_img2dataset() -> str | None:
    given = os.environ.get("MMCL_IMG2DATASET")
    if given:
        return given
    return shutil.which("img2dataset")


@pytest.mark.skipif(_real_img2dataset() is None,
                    reason="img2dataset is not installed here (not on the PATH, MMCL_IMG2DATASET unset): it is no "
                           "test dependency, since it pins webdataset < 0.3 and needs an environment of its own. To "
                           f"run this end-to-end check, install it ({INSTALL}) and set "
                           "MMCL_IMG2DATASET=~/.venvs/img2dataset")
def test_real_img2dataset_end_to_end(tmp_path: Path) -> None:
    """benchmarks/img2dataset_e2e.py, small: served digits with missing URLs, the real img2dataset,
    the index, a resumed run, two CLIP steps; it exits 1 when a count is not what it served."""
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "img2dataset_e2e.py"), "--img2dataset",
                           _real_img2dataset(), "--images", "20", "--missing", "3", "--steps", "2", "--batch", "8",
                           "--json", str(tmp_path / "figures.json"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads((tmp_path / "figures.json").read_text())
    assert figures["index"]["total"] == 20 and figures["index"]["img2dataset"]["failed_to_download"] == 3


def test_a_gzipped_shard_is_counted_as_the_loader_reads_it(digits_dir: Path, tmp_path: Path) -> None:
    """A gzip-compressed tar (the loader reads one whatever its name) was reported unreadable with 0
    samples, and the loader then trusted that count. Now it is counted, whole or cut short anywhere,
    exactly as the loader reads it."""
    import gzip

    from mmcl.data import DataConfig, make_loader

    whole = gzip.compress((digits_dir / "train-000000.tar").read_bytes())
    folder = tmp_path / "gz"
    folder.mkdir()
    for fraction in (1.0, 0.9, 0.5, 0.1, 0.01):
        shard = folder / "00000.tar"
        shard.write_bytes(whole[: int(len(whole) * fraction)])
        assert prep_main(["index", str(folder), "--force"]) == 0
        split = manifest(folder)["splits"]["train"]
        loader = make_loader(DataConfig(train_shards=str(shard), image_size=32, batch_size=1, num_workers=0),
                             train=False, tokenizer=lambda texts: texts)
        read = sum(len(b["key"]) for b in loader)
        assert split["total"] == read, (fraction, split, read)
        if fraction == 1.0:
            assert read == 256 and split["faults"] == {} and split["formats"] == {"json": 256, "png": 256, "txt": 256}
        else:
            assert split["faults"]["00000.tar"].startswith(("read error after", "not readable as a gzipped tar"))
            assert loader.skipped == {"bad_shard": 1}
