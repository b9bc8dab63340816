"""``mmcl-prep clip-benchmark SRC --out DIR``: labelled shards that mmcl-prep wrote, in the WebDataset layout
CLIP_benchmark reads, so ``clip_benchmark eval --dataset wds/NAME --dataset_root DIR`` evaluates on them.

The layout, as ``build_wds_dataset`` in CLIP_benchmark's ``clip_benchmark/datasets/builder.py`` reads it
(and its ``clip_benchmark_export_wds`` writes it; checked against version 1.6.2)::

    DIR/classnames.txt                          one class name a line, line i for label i
    DIR/zeroshot_classification_templates.txt   one prompt a line, {c} where the class name goes
    DIR/{split}/nshards.txt                     the number of shards, N
    DIR/{split}/0.tar ... {N-1}.tar             each sample: an image (.webp, .png, .jpg or .jpeg) and
                                                its label in .cls (decimal digits, as webdataset writes
                                                and reads an int)

No ``dataset_type.txt``: without one the dataset is read for classification. CLIP_benchmark strips
each line of the two text files and fills a template with ``template.format(c=name)``.

Every sample keeps the members mmcl-prep wrote (the image bytes as they are, ``.txt``, ``.json``) and
gains ``.cls``, so both evaluations decode the same pixels, and each split folder gets an mmcl
``manifest.json`` (sample counts, class names): ``mmcl eval zeroshot --shards DIR/test --templates
DIR/zeroshot_classification_templates.txt`` reads the same shards and prompts. A sample with no label,
or a label with no class name, is left out and counted (``missing_label``, ``unknown_class``, the
reasons ``mmcl eval zeroshot`` would skip it for), so the two evaluations see the same samples.

The prompts are by default the templates the source's captions were written from (``digits``,
``photos``, ``folder``); ``--templates FILE`` gives others, ``{}`` or ``{c}`` where the class name goes.
A split is cut into at least ``--min-shards`` (4) shards of at most ``--shard-size`` (1000) samples:
``clip_benchmark eval`` stops when one of its ``--num_workers`` (4) data workers gets no shard.
"""

from __future__ import annotations

import json
import string
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.captions import CLASS_TEMPLATES, DIGIT_TEMPLATES, PHOTO_TEMPLATES
from data_prep.writer import MANIFEST, ShardWriter, write_json
from mmcl.errors import DataError
from mmcl.files import write_atomic
from mmcl.tarfiles import IMAGE_KEYS, sample_key

CLASSNAMES = "classnames.txt"
TEMPLATES = "zeroshot_classification_templates.txt"
NSHARDS = "nshards.txt"
SHARD_NAME = "{n}.tar"  # CLIP_benchmark's pattern: {split}/{0..N-1}.tar
MADE_BY = "mmcl-prep clip-benchmark"
# The templates each mmcl-prep source wrote its captions from (photos also records its own in the manifest).
CAPTION_TEMPLATES = {"digits": DIGIT_TEMPLATES, "photos": PHOTO_TEMPLATES, "folder": CLASS_TEMPLATES}
MISSING_LABEL, UNKNOWN_CLASS, MISSING_IMAGE = "missing_label", "unknown_class", "missing_image"
BAD_JSON, BAD_LABEL = "bad_json", "bad_label"


def clip_benchmark_template(template: str) -> str:
    """``template`` in CLIP_benchmark's form: ``{c}`` where the class name goes (mmcl's ``{}`` rewritten,
    literal braces kept escaped). Any other field (``{name}``, ``{0}``, ``{:>5}``) is an error: CLIP_benchmark
    fills only ``c`` and would fail on it mid-evaluation."""
    text = template.strip()
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise DataError(f"template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    out, fields = [], 0
    for literal, field, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field not in ("", "c") or spec or conversion:
            raise DataError(f"template {template!r}: only {{}} or {{c}} may stand for the class name "
                            "(write a literal brace as {{ or }})")
        out.append("{c}")
        fields += 1
    if not fields:
        raise DataError(f"template {template!r} has no {{}} or {{c}} where the class name goes")
    return "".join(out)


def read_lines(path: Path, what: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file, stripped (as CLIP_benchmark and ``mmcl eval`` read them)."""
    if not path.is_file():
        raise DataError(f"{what} file {str(path)!r} does not exist")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    if not lines:
        raise DataError(f"{path}: no {what} in it (one a line)")
    return lines


def read_manifest(src: Path) -> dict[str, Any]:
    """``SRC/manifest.json``, as an mmcl-prep command wrote it."""
    path = src / MANIFEST
    if not src.is_dir():
        raise DataError(f"{str(src)!r} is not a folder; give the --out folder of an mmcl-prep command")
    if not path.is_file():
        raise DataError(f"no {MANIFEST} in {src}; give the --out folder of mmcl-prep digits, photos, table, "
                        "folder or hf (shards built elsewhere need their labels and class names first)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path} is not readable JSON: {e}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise DataError(f"{path} is not an mmcl-prep manifest (no splits)")
    return manifest


def class_names_for(manifest: dict[str, Any], splits: list[str], classes_file: Path | None) -> list[str]:
    """The class names, in label order: ``--classes`` FILE, else the manifest's (one list for every split
    converted: CLIP_benchmark has one ``classnames.txt`` per dataset)."""
    if classes_file is not None:
        names = read_lines(classes_file, "class names")
    else:
        found = {tuple(manifest["splits"][s].get("class_names") or manifest.get("class_names") or ()) for s in splits}
        if len(found) > 1:
            raise DataError(f"the splits {', '.join(splits)} have different class names in the manifest; convert "
                            "them one at a time into different --out folders, or pass --classes FILE")
        names = list(found.pop())
        if not names:
            raise DataError("the manifest has no class names (the source had no class names, e.g. integer labels "
                            "in a table); pass --classes FILE, one name a line, line i for label i")
    bad = [n for n in names if not isinstance(n, str) or not n.strip() or n != n.strip() or "\n" in n]
    if bad:
        raise DataError(f"class names {bad[:3]!r}: CLIP_benchmark reads one stripped name a line, so a name must "
                        "be non-empty, on one line, without leading or trailing spaces")
    if len(set(names)) != len(names):
        dupes = sorted(n for n, k in Counter(names).items() if k > 1)
        raise DataError(f"class names given more than once: {', '.join(dupes[:5])}")
    return names


def templates_for(manifest: dict[str, Any], templates_file: Path | None) -> list[str]:
    """The prompts in CLIP_benchmark's form: ``--templates`` FILE, else the ones the source's captions were
    written from (recorded in the manifest, or known for its source type)."""
    if templates_file is not None:
        given = read_lines(templates_file, "templates")
    else:
        source = manifest.get("source") or {}
        given = source.get("templates") or list(CAPTION_TEMPLATES.get(source.get("type"), ()))
        if not given:
            raise DataError(f"no caption templates are known for source {source.get('type')!r}; pass "
                            "--templates FILE, one prompt a line with {} or {c} where the class name goes")
    return [clip_benchmark_template(t) for t in given]


def samples(path: Path, read_all: bool = True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {extension: bytes})`` for each sample of a tar shard, members grouped as webdataset groups
    them (consecutive members sharing a key). With ``read_all`` false only ``.json`` is read; the other
    members are there, empty (the data of a member not read is skipped, not read)."""
    key, members = None, {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                found = sample_key(member.name) if member.isreg() else None
                if found is None:
                    continue
                if found[0] != key:
                    if key is not None:
                        yield key, members
                    key, members = found[0], {}
                data = tar.extractfile(member) if read_all or found[1] == "json" else None
                members[found[1]] = data.read() if data is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not readable as a tar shard ({e}); rebuild it with mmcl-prep") from None
    if key is not None:
        yield key, members


def label_of(members: dict[str, bytes], n_classes: int) -> int | str:
    """The sample's label from its ``.json``, or the reason to leave it out."""
    if not any(ext in members for ext in IMAGE_KEYS):
        return MISSING_IMAGE
    try:
        meta = json.loads(members["json"]) if "json" in members else {}
    except (ValueError, RecursionError):
        return BAD_JSON
    if not isinstance(meta, dict):
        return BAD_JSON
    label = meta.get("label")
    if label is None:
        return MISSING_LABEL
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        return BAD_LABEL
    return label if label < n_classes else UNKNOWN_CLASS


def shard_paths(src: Path, entry: dict[str, Any]) -> list[Path]:
    """The split's shards, as its manifest entry lists them; a missing one is an error."""
    paths = [src / shard["name"] for shard in entry["shards"]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"{missing[0]}: listed in {src / MANIFEST} but missing; rebuild the shards with mmcl-prep")
    return paths


def usable(paths: list[Path], n_classes: int) -> tuple[int, Counter[str]]:
    """How many samples of ``paths`` have a label with a class name, and the others by reason (only each
    sample's ``.json`` is read)."""
    found: Counter[str] = Counter()
    for path in paths:
        for _, members in samples(path, read_all=False):
            label = label_of(members, n_classes)
            found[label if isinstance(label, str) else "usable"] += 1
    return found.pop("usable", 0), found


def convert_split(paths: list[Path], out: Path, n_classes: int,
                  shard_size: int) -> dict[str, Any]:
    """Write one split's samples with a ``.cls`` into ``out/0.tar, ...``; its manifest entry (shards,
    total, skipped by reason with the first keys)."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "", shard_size, name=SHARD_NAME)
    skipped: dict[str, dict[str, Any]] = {}
    try:
        for path in paths:
            for key, members in samples(path):
                label = label_of(members, n_classes)
                if isinstance(label, str):
                    info = skipped.setdefault(label, {"count": 0, "first_keys": []})
                    info["count"] += 1
                    info["first_keys"] = (info["first_keys"] + [key])[:5]
                    continue
                writer.write(key, {**members, "cls": str(label).encode("ascii")})
    except BaseException:
        writer.abort()
        raise
    shards = writer.close()
    return {"shards": shards, "pattern": f"{{0..{len(shards) - 1}}}.tar" if shards else None,
            "total": sum(s["samples"] for s in shards), "skipped": dict(sorted(skipped.items()))}


def remove_stale(folder: Path, keep: int) -> None:
    """Remove shards ``{keep}.tar`` and above, left by an earlier, larger conversion into the same folder."""
    for path in folder.glob("*.tar"):
        if path.stem.isdigit() and str(int(path.stem)) == path.stem and int(path.stem) >= keep:
            path.unlink()


def shard_size_for(samples: int, shard_size: int, min_shards: int) -> int:
    """Samples per shard: at most ``shard_size``, and few enough that ``samples`` make at least
    ``min_shards`` shards (or one a sample). ``clip_benchmark eval`` reads with ``--num_workers`` data
    workers (4 by default), and webdataset stops a worker given no shard ("No samples found in dataset;
    perhaps you have fewer shards than workers"): a small test split in one shard fails there unless
    ``--num_workers 1``."""
    return max(1, min(shard_size, -(-samples // min_shards)))


def convert(src: Path, out: Path, *, splits: list[str] | None = None, classes_file: Path | None = None,
            templates_file: Path | None = None, shard_size: int = 1000,
            min_shards: int = 4) -> dict[str, dict[str, Any]]:
    """Write ``src``'s splits (default: all) in CLIP_benchmark's layout under ``out``; the manifest entry of
    each split. Every mistake found in the source is found before anything is written; every file is
    written under a temporary name and renamed into place, a split's ``nshards.txt`` after its shards."""
    manifest = read_manifest(src)
    available = list(manifest["splits"])
    splits = splits or available
    unknown = [s for s in splits if s not in manifest["splits"]]
    if unknown:
        raise DataError(f"no split {', '.join(unknown)} in {src / MANIFEST}; it has {', '.join(available)}")
    names = class_names_for(manifest, splits, classes_file)
    templates = templates_for(manifest, templates_file)
    plans = {}
    for split in splits:
        paths = shard_paths(src, manifest["splits"][split])
        count, left_out = usable(paths, len(names))
        if not count:
            raise DataError(f"split {split}: no sample has a label with a class name (left out: {dict(left_out)}); "
                            "CLIP_benchmark's classification needs labelled samples")
        plans[split] = paths, shard_size_for(count, shard_size, min_shards)
    source = {"type": (manifest.get("source") or {}).get("type") or src.name, "made_by": MADE_BY,
              "from": str(src), "templates": templates}
    entries = {}
    for split, (paths, size) in plans.items():
        folder = out / split
        entry = {**convert_split(paths, folder, len(names), size), "class_names": names}
        write_atomic(folder / NSHARDS, f"{len(entry['shards'])}\n")
        remove_stale(folder, len(entry["shards"]))
        write_json(folder / MANIFEST, {  # mmcl's manifest: sample counts and class names for mmcl eval
            "format": "mmcl-shards/1", "splits": {split: entry}, "source": source,
            "image_format": manifest.get("image_format"), "max_side": manifest.get("max_side"),
            "class_names": names, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        entries[split] = entry
    write_atomic(out / CLASSNAMES, "".join(f"{n}\n" for n in names))
    write_atomic(out / TEMPLATES, "".join(f"{t}\n" for t in templates))
    return entries


def run(args: Any) -> int:
    """``mmcl-prep clip-benchmark``: convert, print what was written and how to evaluate it; the exit status."""
    entries = convert(args.src, args.out, splits=args.split, classes_file=args.classes,
                      templates_file=args.templates, shard_size=args.shard_size, min_shards=args.min_shards)
    for split, e in entries.items():
        print(f"{split}: {e['total']} samples in {len(e['shards'])} shard(s) ({args.out / split}/"
              f"{e['pattern']}, {NSHARDS})")
        for reason, info in e["skipped"].items():
            print(f"  left out {info['count']}: {reason} (e.g. {', '.join(info['first_keys'])})", file=sys.stderr)
    names = next(iter(entries.values()))["class_names"]
    print(f"classes ({len(names)}): {args.out / CLASSNAMES}; prompts: {args.out / TEMPLATES}")
    split = "test" if "test" in entries else next(iter(entries))
    workers = min(4, min(len(e["shards"]) for e in entries.values()))
    print(f"evaluate: clip_benchmark eval --dataset wds/{args.out.name} --dataset_root {args.out} --split {split} "
          f"--task zeroshot_classification --model local-dir:MODEL_FOLDER --pretrained none --output result.json"
          + (f" --num_workers {workers}" if workers < 4 else "")
          + "  (at most as many --num_workers as a split has shards)")
    return 0
