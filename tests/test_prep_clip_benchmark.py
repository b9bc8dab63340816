"""``mmcl-prep clip-benchmark``: labelled shards in CLIP_benchmark's WebDataset layout.

The layout is checked against what CLIP_benchmark 1.6.2 reads (``build_wds_dataset`` in
``clip_benchmark/datasets/builder.py``): its file names, ``nshards.txt``, the ``{0..N-1}.tar`` pattern
and ``.cls`` labels, read back with the very webdataset pipeline it builds (webdataset is an mmcl
dependency; clip_benchmark itself is not, and ``benchmarks/clip_benchmark_check.py`` runs the real
one). ``mmcl eval zeroshot`` on the converted shards must give what it gives on the originals.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import png_bytes
from PIL import Image

from data_prep.cli import main as prep_main
from data_prep.clip_benchmark import CLASSNAMES, NSHARDS, TEMPLATES, clip_benchmark_template
from mmcl.errors import DataError
from mmcl.evaluate.templates import fill, template_set
from mmcl.prompts import DIGIT_NAMES, DIGIT_TEMPLATES


def source_samples(folder: Path, split: str) -> list[tuple[str, dict[str, bytes]]]:
    """Every sample of an mmcl-prep split, in shard order: (key, {extension: bytes})."""
    entry = json.loads((folder / "manifest.json").read_text())["splits"][split]
    out = []
    for shard in entry["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if not out or out[-1][0] != key:
                    out.append((key, {}))
                out[-1][1][ext] = tar.extractfile(m).read()
    return out


def clip_benchmark_read(root: Path, split: str) -> tuple[list[tuple[Image.Image, int]], list[str], list[str]]:
    """(image, label) pairs, class names and templates, read as CLIP_benchmark 1.6.2's ``build_wds_dataset``
    reads a local dataset root (its code, less the HTTP branch)."""
    import webdataset as wds

    nshards = int((root / split / NSHARDS).read_text())
    pattern = os.path.join(root, split, f"{{0..{nshards - 1}}}.tar")  # its "{0..%d}.tar" % (nshards - 1)
    ds = (wds.WebDataset(pattern, nodesplitter=lambda src: src, shardshuffle=False)
          .decode(wds.autodecode.ImageHandler("pil", extensions=["webp", "png", "jpg", "jpeg"]))
          .to_tuple(["webp", "png", "jpg", "jpeg"], "cls").map_tuple(None, None))
    classes = [line.strip() for line in (root / CLASSNAMES).read_text().splitlines()]
    templates = [line.strip() for line in (root / TEMPLATES).read_text().splitlines()]
    return list(ds), classes, templates


@pytest.fixture(scope="module")
def digits_cb(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits test and test-shifted splits in CLIP_benchmark's layout, 100 samples a shard (at least 3
    shards would make 120)."""
    out = tmp_path_factory.mktemp("cb") / "digits"
    assert prep_main(["clip-benchmark", str(digits_dir), "--out", str(out), "--split", "test",
                      "--split", "test-shifted", "--shard-size", "100", "--min-shards", "3"]) == 0
    return out


def test_the_layout_is_clip_benchmarks(digits_cb: Path) -> None:
    assert sorted(p.name for p in digits_cb.iterdir()) == [CLASSNAMES, "test", "test-shifted", TEMPLATES]
    assert (digits_cb / CLASSNAMES).read_text() == "".join(f"{n}\n" for n in DIGIT_NAMES)
    assert (digits_cb / TEMPLATES).read_text().splitlines() == [t.replace("{}", "{c}") for t in DIGIT_TEMPLATES]
    for split in ("test", "test-shifted"):
        assert (digits_cb / split / NSHARDS).read_text() == "4\n"  # 360 samples, 100 a shard
        assert sorted(p.name for p in (digits_cb / split).iterdir()) == \
            ["0.tar", "1.tar", "2.tar", "3.tar", "manifest.json", NSHARDS]


def test_clip_benchmarks_reader_gets_every_sample_its_label_and_pixels(digits_dir: Path, digits_cb: Path) -> None:
    """Read back as CLIP_benchmark reads: the source's samples in order, each label from ``.cls`` equal to
    the one mmcl-prep recorded, line ``label`` of classnames.txt naming its class, the same pixels."""
    for split in ("test", "test-shifted"):
        pairs, classes, templates = clip_benchmark_read(digits_cb, split)
        source = source_samples(digits_dir, split)
        assert len(pairs) == len(source) == 360
        assert classes == list(DIGIT_NAMES)
        assert [t.format(c="seven") for t in templates] == [t.format("seven") for t in DIGIT_TEMPLATES]
        for (image, label), (_, members) in zip(pairs, source):
            meta = json.loads(members["json"])
            assert label == meta["label"] and classes[label] == meta["class_name"]
            assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(members["png"])).convert("RGB")))
        assert len({label for _, label in pairs}) == 10


def test_samples_keep_their_members_and_gain_cls(digits_dir: Path, digits_cb: Path) -> None:
    written = source_samples(digits_cb / "test", "test")
    source = source_samples(digits_dir, "test")
    assert [k for k, _ in written] == [k for k, _ in source]
    for (_, new), (_, old) in zip(written, source):
        assert new == {**old, "cls": str(json.loads(old["json"])["label"]).encode()}
    m = json.loads((digits_cb / "test" / "manifest.json").read_text())
    assert m["class_names"] == list(DIGIT_NAMES) and m["source"]["type"] == "digits"
    assert [s["samples"] for s in m["splits"]["test"]["shards"]] == [100, 100, 100, 60]
    assert m["splits"]["test"]["total"] == 360 and m["splits"]["test"]["skipped"] == {}


def test_mmcl_eval_zeroshot_reads_the_layout_as_the_original_shards(digits_dir: Path, digits_cb: Path,
                                                                    tmp_path: Path, capsys) -> None:
    """``mmcl eval zeroshot`` on the converted split, with its classnames.txt and ``{c}`` templates (and
    with the class names from its manifest), gives the confusion matrix it gives on the source shards."""
    import torch

    from mmcl.cli import main as mmcl_main
    from mmcl.hub import save_pretrained
    from mmcl.models.clip import ClipModel, ClipModelConfig

    torch.manual_seed(0)
    model = save_pretrained(ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit")),
                            tmp_path / "m", name="clip", preprocess={"image_size": 32, "mean": [0.5] * 3,
                                                                     "std": [0.5] * 3})

    def evaluate(name: str, *args: str) -> dict:
        assert mmcl_main(["eval", "zeroshot", "--model", str(model), "--no-record", "--workers", "0",
                          "--out", str(tmp_path / name), *args]) == 0
        return json.loads((tmp_path / name / "zeroshot.json").read_text())

    original = evaluate("original", "--shards", f"{digits_dir}/test-{{000000..000001}}.tar", "--templates", "digits")
    converted = evaluate("converted", "--shards", str(digits_cb / "test"), "--templates",
                         str(digits_cb / TEMPLATES), "--classes", str(digits_cb / CLASSNAMES))
    from_manifest = evaluate("manifest", "--shards", f"{digits_cb}/test/{{0..3}}.tar", "--templates",
                             str(digits_cb / TEMPLATES))
    for res in (converted, from_manifest):
        assert res["n"] == original["n"] == 360 and res["skipped"] == {}
        assert res["confusion"] == original["confusion"] and res["top1"] == original["top1"]
        assert res["class_names"] == list(DIGIT_NAMES)
    capsys.readouterr()


def test_unlabelled_samples_and_labels_without_a_class_are_left_out_and_counted(tmp_path: Path, capsys) -> None:
    (tmp_path / "img").mkdir()
    rows = ["image,caption,label"]
    for i, label in enumerate(["0", "1", "", "5", "1", "0"]):
        (tmp_path / "img" / f"{i}.png").write_bytes(png_bytes(np.full((8, 8, 3), 30 * i, np.uint8)))
        rows.append(f"img/{i}.png,picture {i},{label}")
    (tmp_path / "t.csv").write_text("\n".join(rows) + "\n")
    src, out = tmp_path / "src", tmp_path / "cb"
    assert prep_main(["table", str(tmp_path / "t.csv"), "--out", str(src), "--label-column", "label",
                      "--split", "test", "--no-progress"]) == 0
    # integer labels: the manifest has no class names
    assert prep_main(["clip-benchmark", str(src), "--out", str(out)]) == 2
    assert "the manifest has no class names" in capsys.readouterr().err
    (tmp_path / "names.txt").write_text("circle\n\nsquare\n")
    (tmp_path / "prompts.txt").write_text("a drawing of a {}.\n  a {c} shape  \n")
    assert prep_main(["clip-benchmark", str(src), "--out", str(out), "--classes", str(tmp_path / "names.txt"),
                      "--templates", str(tmp_path / "prompts.txt")]) == 0
    err = capsys.readouterr().err
    assert "left out 1: missing_label (e.g. 000000002)" in err and "left out 1: unknown_class (e.g. 000000003)" in err
    pairs, classes, templates = clip_benchmark_read(out, "test")
    assert [label for _, label in pairs] == [0, 1, 1, 0] and classes == ["circle", "square"]
    assert templates == ["a drawing of a {c}.", "a {c} shape"]
    assert (out / "test" / NSHARDS).read_text() == "4\n"  # 4 usable samples, at least 4 shards: clip_benchmark's
    # 4 data workers would stop on a worker given no shard
    skipped = json.loads((out / "test" / "manifest.json").read_text())["splits"]["test"]["skipped"]
    assert {k: v["count"] for k, v in skipped.items()} == {"missing_label": 1, "unknown_class": 1}


def test_a_second_conversion_removes_the_shards_it_no_longer_writes(digits_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cb"
    assert prep_main(["clip-benchmark", str(digits_dir), "--out", str(out), "--split", "val", "--min-shards",
                      "6"]) == 0
    assert sorted(p.name for p in (out / "val").glob("*.tar")) == [f"{i}.tar" for i in range(6)]
    assert prep_main(["clip-benchmark", str(digits_dir), "--out", str(out), "--split", "val", "--min-shards",
                      "1"]) == 0
    assert sorted(p.name for p in (out / "val").glob("*.tar")) == ["0.tar"]
    assert (out / "val" / NSHARDS).read_text() == "1\n"
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert len(clip_benchmark_read(out, "val")[0]) == 180


@pytest.mark.parametrize("given, expected, filled", [
    ("a photo of a {}.", "a photo of a {c}.", "a photo of a cat."),
    ("a photo of a {c}.", "a photo of a {c}.", "a photo of a cat."),
    ("  {} and {c}  ", "{c} and {c}", "cat and cat"),
    ("a {{set}} of {}", "a {{set}} of {c}", "a {set} of cat"),
])
def test_templates_are_rewritten_for_clip_benchmark_and_read_by_mmcl(given: str, expected: str, filled: str) -> None:
    converted = clip_benchmark_template(given)
    assert converted == expected and converted.format(c="cat") == filled  # as CLIP_benchmark fills it
    assert fill(template_set([converted])[0], "cat") == filled  # mmcl eval zeroshot reads {c} too


@pytest.mark.parametrize("bad, says", [
    ("a photo", "has no {} or {c}"), ("a {name}", "only {} or {c}"), ("a {0}", "only {} or {c}"),
    ("a {:>5}", "only {} or {c}"), ("a {c!r}", "only {} or {c}"), ("a { photo", "literal brace"),
])
def test_templates_clip_benchmark_could_not_fill_are_refused(bad: str, says: str) -> None:
    with pytest.raises(DataError, match=r".*" + says.replace("{", r"\{").replace("}", r"\}")):
        clip_benchmark_template(bad)


def test_user_mistakes_are_one_line_errors(digits_dir: Path, tmp_path: Path, capsys) -> None:
    def fails(*args: str) -> str:
        assert prep_main(["clip-benchmark", *args, "--out", str(tmp_path / "cb")]) == 2
        return capsys.readouterr().err

    assert "no manifest.json in" in fails(str(tmp_path))
    assert "no split nope in" in fails(str(digits_dir), "--split", "nope")
    assert "does not exist" in fails(str(digits_dir), "--classes", str(tmp_path / "missing.txt"))
    (tmp_path / "p.txt").write_text("a {label}\n")
    assert "only {} or {c} may stand for the class name" in fails(str(digits_dir), "--templates",
                                                                   str(tmp_path / "p.txt"))
    (tmp_path / "dupes.txt").write_text("a\nb\na\n")
    assert "class names given more than once: a" in fails(str(digits_dir), "--classes", str(tmp_path / "dupes.txt"))
    with pytest.raises(SystemExit) as e:
        prep_main(["clip-benchmark", str(digits_dir), "--out", str(tmp_path / "cb"), "--split", "test",
                   "--split", "test"])
    assert e.value.code == 2 and "each split may be given once" in capsys.readouterr().err
    assert not (tmp_path / "cb").exists()  # nothing written before the mistake was found
