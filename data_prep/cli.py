"""``mmcl-prep``: build WebDataset shards from digits, shipped photos, tables, image folders or HF datasets,
download URL lists into shards with img2dataset, index shards built elsewhere, or write labelled shards
in CLIP_benchmark's layout.

Examples::

    mmcl-prep digits --out data/digits
    mmcl-prep photos --out data/photos224 --samples 100000
    mmcl-prep table pairs.csv --out data/pairs --caption-column caption --label-column label
    mmcl-prep folder photos/ --out data/photos --split train
    mmcl-prep hf ./saved_dataset --out data/hf --image-column image --caption-column text
    mmcl-prep urls pairs.parquet --out data/web --img2dataset ~/.venvs/img2dataset -- --timeout 20
    mmcl-prep index data/laion_shards
    mmcl-prep clip-benchmark data/digits --out data/digits_cb --split test
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from data_prep import clip_benchmark, index, urls
from data_prep.images import FORMATS, MAX_PIXELS, ImageOptions
from data_prep.photos import SOURCES as PHOTO_SOURCES
from data_prep.photos import split_sizes
from data_prep.writer import Record, build_split, summary, write_manifest
from mmcl.argtypes import fraction, integer, positive_int
from mmcl.errors import DataError, run_cli

SPLIT_HELP = ("the split's name (default train), or held-out splits by share: val=0.05,test=0.05 (the rest is "
              "train; each file placed by a hash of its path, so re-runs and added files move none)")
SEED_MAX = 2**32 - 1  # scikit-learn's (and numpy's) seed range
quality = integer(1, 100)
seed = integer(0, SEED_MAX)


def split_name(text: str) -> str:
    """An argparse type: a split name usable in shard file names (``{split}-000000.tar``)."""
    if not text or text.startswith(".") or any(c in text for c in "/\\{},") or text != text.strip():
        raise argparse.ArgumentTypeError(
            f"must be a split name such as train or val, without / \\ {{ }} , or a leading dot (got {text!r})")
    return text


def split_spec(text: str) -> str | dict[str, float]:
    """An argparse type: one split's name (``train``), or held-out splits by share of the samples
    (``val=0.05,test=0.05``: the rest is ``train``), each sample placed by a hash of its key."""
    if "=" not in text:
        return split_name(text)
    shares: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = split_name(name.strip())
        try:
            shares[name] = fraction(value.strip())
        except (argparse.ArgumentTypeError, ValueError):
            raise argparse.ArgumentTypeError(f"{name}: the share must be a number between 0 and 1 (got {value!r})") \
                from None
    if "train" in shares or sum(shares.values()) >= 1:
        raise argparse.ArgumentTypeError(f"the held-out shares must add up to less than 1 and the rest is train "
                                         f"(got {text!r})")
    return shares


def split_by_key(records: list[Record], shares: dict[str, float]) -> dict[str, list[Record]]:
    """``records`` dealt into ``train`` and the held-out splits by a hash of each record's key (its
    source path): the same file lands in the same split on every run, and adding files moves none."""
    out: dict[str, list[Record]] = {"train": [], **{name: [] for name in shares}}
    for r in records:
        point = int.from_bytes(hashlib.sha256(str(r.source).encode()).digest()[:8], "big") / 2**64
        for name, share in shares.items():
            if point < share:
                out[name].append(r)
                break
            point -= share
        else:
            out["train"].append(r)
    return out


def choose_format(records: list[Record]) -> tuple[str, str]:
    """The image format for shards of ``records`` (``--format`` not given) and why: JPEG when the
    source images are JPEG (PNG shards of photographs are about twice the size, for no gain over the
    source), else PNG, lossless as its sources."""
    sampled = [next(iter(r.images.values())) for r in records[:64]]
    kinds = {_kind(s) for s in sampled}
    if kinds == {"jpg"}:
        return "jpg", "the source images are JPEG"
    return "png", "the source images are not all JPEG: stored lossless"


def _kind(source: Any) -> str:
    """``jpg`` for a JPEG source (file, bytes or decoded image), else ``other``."""
    if isinstance(source, (str, Path)):
        return "jpg" if Path(source).suffix.lower() in (".jpg", ".jpeg") else "other"
    if isinstance(source, bytes):
        return "jpg" if source[:2] == b"\xff\xd8" else "other"
    return "jpg" if getattr(source, "format", None) == "JPEG" else "other"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json")
    p.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard (default %(default)s)")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help="resize so the longer side is at most this many pixels")
    p.add_argument("--format", choices=sorted(FORMATS), default=None,
                   help="image format in the shards (default: jpg for JPEG sources, png for the others)")
    p.add_argument("--quality", type=quality, default=95, help="JPEG/WebP quality, 1 to 100 (default %(default)s)")
    p.add_argument("--workers", type=positive_int, default=min(4, os.cpu_count() or 1),
                   help="worker processes (1: convert in this process)")
    p.add_argument("--max-pixels", type=positive_int, default=MAX_PIXELS,
                   help="skip images with more pixels than this (decompression bombs)")
    p.add_argument("--seed", type=seed, default=0,
                   help=f"seed for splits, crops and caption templates (0 to {SEED_MAX})")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def parser() -> argparse.ArgumentParser:
    """The ``mmcl-prep`` argument parser."""
    ap = argparse.ArgumentParser(prog="mmcl-prep", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="source", required=True)

    p = sub.add_parser("digits", help="scikit-learn digits: train/val/test/test-shifted")
    _common(p)
    p.add_argument("--size", type=positive_int, default=32, help="upscaled image side in pixels (default 32)")
    p.add_argument("--val-fraction", type=fraction, default=0.1, help="between 0 and 1 (default 0.1)")
    p.add_argument("--test-fraction", type=fraction, default=0.2,
                   help="between 0 and 1; with --val-fraction below 1 (default 0.2)")
    p.add_argument("--edges", action="store_true",
                   help="also store each image's Sobel edge map as an 'edges' field (multi-view methods: CMC)")
    p.set_defaults(shard_size=256)

    p = sub.add_parser("photos", help="random crops of the photos scikit-learn and scikit-image ship: 224 px "
                                      "JPEG image-text train/test, for GPU throughput benchmarks")
    _common(p)
    p.add_argument("--samples", type=positive_int, default=10_000,
                   help="samples in all, train and test (default %(default)s)")
    p.add_argument("--size", type=positive_int, default=224, help="image side in pixels (default %(default)s)")
    p.add_argument("--test-fraction", type=fraction, default=0.1,
                   help="share of the samples in the test split, between 0 and 1 (default %(default)s)")
    p.add_argument("--min-scale", type=fraction, default=0.25,
                   help="smallest crop, as a share of the photo's area (default %(default)s: crops of the "
                        "427x640 photos are then about 224 px or larger, so hardly ever upscaled)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="never flip a crop left-right")
    p.add_argument("--source", dest="photo_sources", action="append", choices=PHOTO_SOURCES, default=None,
                   help="photos of this package; repeatable (default: all, scikit-image's only if installed)")
    p.set_defaults(shard_size=256, format="jpg",  # quality 95, as img2dataset encodes by default
                   format_because="photographs: JPEG at --quality, as img2dataset encodes them")

    p = sub.add_parser("table", help="CSV/TSV/JSONL rows: image path(s), caption, optional label")
    p.add_argument("file", type=Path)
    _common(p)
    p.add_argument("--image-column", action="append", default=None,
                   help="image path column; repeat for multi-field samples (default: image)")
    p.add_argument("--caption-column", default="caption")
    p.add_argument("--label-column", default=None)
    p.add_argument("--no-captions", action="store_true", help="images only (for self-supervised data)")
    p.add_argument("--split", type=split_spec, default="train", help=SPLIT_HELP)

    p = sub.add_parser("folder", help="one subfolder per class")
    p.add_argument("dir", type=Path)
    _common(p)
    p.add_argument("--split", type=split_spec, default="train", help=SPLIT_HELP)

    p = sub.add_parser("hf", help="a Hugging Face datasets dataset (saved to disk or by name)")
    p.add_argument("name_or_path")
    _common(p)
    p.add_argument("--split", type=split_name, default=None, help="one split (default: all)")
    p.add_argument("--image-column", default="image")
    p.add_argument("--caption-column", default=None)
    p.add_argument("--label-column", default=None)

    p = sub.add_parser("urls", help="download a URL list into WebDataset shards with img2dataset, run from an "
                                    "environment of its own, then index them",
                       usage="%(prog)s LIST --out DIR [options] [-- IMG2DATASET_OPTION ...]",
                       description=urls.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("list", type=Path, help="the URL list: .txt (a URL a line), .csv, .tsv, .json, .jsonl, .parquet "
                                           "(also .gz), or a folder of such files")
    p.add_argument("--out", required=True, type=Path, help="output folder for shards and manifest.json (on a "
                                                           "filesystem every machine shares, with pyspark or ray)")
    p.add_argument("--img2dataset", default=None, metavar="PATH",
                   help="img2dataset's executable, its virtual environment, or 'pipx' (default: img2dataset on the "
                        "PATH, else pipx run img2dataset)")
    p.add_argument("--distributor", choices=urls.DISTRIBUTORS, default="multiprocessing",
                   help="how img2dataset spreads the work (default %(default)s: this machine's processes; pyspark "
                        "and ray need those installed in img2dataset's environment, see docs/scaling.md)")
    p.add_argument("--spark-master", default=None, metavar="URL",
                   help="with --distributor pyspark: the Spark cluster to run on, e.g. spark://10.0.0.1:7077 "
                        "(without it img2dataset runs Spark on this machine, local[--processes])")
    p.add_argument("--size", type=positive_int, default=224, help="image side in pixels (default %(default)s)")
    p.add_argument("--resize-mode", choices=urls.RESIZE_MODES, default="center_crop",
                   help="img2dataset's resize mode (default %(default)s: short side to --size, centre cropped)")
    p.add_argument("--quality", type=quality, default=95, help="JPEG quality, 1 to 100 (default %(default)s)")
    p.add_argument("--shard-size", type=positive_int, default=10_000,
                   help="URLs per shard, so at most that many samples (default %(default)s)")
    p.add_argument("--processes", type=positive_int, default=os.cpu_count() or 1,
                   help="img2dataset processes (default: this machine's CPUs, %(default)s)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="download threads per process (default: img2dataset's, 256)")
    p.add_argument("--input-format", choices=urls.INPUT_FORMATS, default=None,
                   help="the URL list's format (default: from its file name)")
    p.add_argument("--url-col", default="url", help="URL column of a table (default %(default)s)")
    p.add_argument("--caption-col", default=None, help="caption column of a table (default: caption; a .txt list "
                                                       "has none)")
    p.add_argument("--no-captions", action="store_true", help="images only (for self-supervised data)")
    p.add_argument("--split", type=split_name, default="train", help="the split's name in manifest.json")

    p = sub.add_parser("index", help="write manifest.json for WebDataset shards built elsewhere (img2dataset's or "
                                     "any): samples per shard, formats, img2dataset's failures by reason",
                       description=index.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="the folder of .tar shards (all of them form one split)")
    p.add_argument("--split", type=split_name, default="train", help="the split's name (default %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="replace a manifest.json that another mmcl-prep command wrote (its class names and skip "
                        "counts are lost)")
    p = sub.add_parser("clip-benchmark", help="labelled shards in CLIP_benchmark's WebDataset layout: "
                                              "OUT/{split}/0.tar ..., nshards.txt, classnames.txt, templates",
                       description=clip_benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path, help="the --out folder of mmcl-prep digits, photos, table, folder or hf")
    p.add_argument("--out", required=True, type=Path,
                   help="the dataset root to write (clip_benchmark eval --dataset_root); its folder name makes a "
                        "good --dataset wds/NAME")
    p.add_argument("--split", type=split_name, action="append", default=None,
                   help="a split to convert; repeatable (default: every split in the manifest)")
    p.add_argument("--classes", type=Path, default=None,
                   help="text file, one class name a line, line i for label i (default: the manifest's)")
    p.add_argument("--templates", type=Path, default=None,
                   help="text file, one prompt a line, {} or {c} where the class name goes (default: the "
                        "templates the source's captions were written from: digits, photos, folder)")
    p.add_argument("--shard-size", type=positive_int, default=1000,
                   help="samples per shard, at most (default %(default)s)")
    p.add_argument("--min-shards", type=positive_int, default=4,
                   help="shards per split, at least, when it has the samples (default %(default)s: clip_benchmark "
                        "eval's default --num_workers; a data worker given no shard stops it)")
    ap.sources = sub.choices  # type: ignore[attr-defined]  # name -> subcommand parser, for parse_args
    return ap


def _sources(args: argparse.Namespace) -> tuple[dict[str, Iterable[Record]], list[str] | None,
                                                 dict[str, int | None], bool, dict[str, Any]]:
    """(records per split, class names, sizes, captions required, source description)."""
    if args.source == "digits":
        from data_prep.digits import digits_records

        recs, names = digits_records(args.size, args.val_fraction, args.test_fraction, args.seed, args.edges)
        return recs, names, {k: len(v) for k, v in recs.items()}, True, \
            {"type": "digits", "size": args.size, "seed": args.seed, "edges": args.edges}
    if args.source == "photos":
        from data_prep.photos import describe, load_photos, photos_records

        explicit = args.photo_sources is not None
        photos, notes = load_photos(args.photo_sources or PHOTO_SOURCES, args.size, explicit=explicit)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        recs, names = photos_records(photos, args.samples, size=args.size, test_fraction=args.test_fraction,
                                     min_scale=args.min_scale, flip=args.flip, seed=args.seed)
        return recs, names, {k: len(v) for k, v in recs.items()}, True, \
            describe(photos, notes, samples=args.samples, size=args.size, seed=args.seed,
                     test_fraction=args.test_fraction, min_scale=args.min_scale, flip=args.flip)
    if args.source == "table":
        from data_prep.table import table_records

        cols = args.image_column or ["image"]
        caption = None if args.no_captions else args.caption_column
        recs, names = table_records(args.file, cols, caption, args.label_column)
        splits = _split(recs, args.split)
        return splits, names, {k: len(v) for k, v in splits.items()}, caption is not None, \
            {"type": "table", "file": str(args.file), "image_columns": cols, **_split_note(args.split)}
    if args.source == "folder":
        from data_prep.folder import folder_records

        recs, names = folder_records(args.dir, args.seed)
        splits = _split(recs, args.split)
        return splits, names, {k: len(v) for k, v in splits.items()}, True, \
            {"type": "folder", "dir": str(args.dir), **_split_note(args.split)}
    from data_prep.hf import hf_records, load_hf

    recs, names, sizes = hf_records(load_hf(args.name_or_path, args.split), args.image_column,
                                    args.caption_column, args.label_column)
    return recs, names, dict(sizes), args.caption_column is not None, \
        {"type": "hf", "name": args.name_or_path}


def _split(records: list[Record], split: str | dict[str, float]) -> dict[str, list[Record]]:
    return split_by_key(records, split) if isinstance(split, dict) else {split: records}


def _split_note(split: str | dict[str, float]) -> dict[str, Any]:
    return {"held_out": {**split, "by": "sha256 of each file's path"}} if isinstance(split, dict) else {}


def run(args: argparse.Namespace) -> int:
    """Build every split of the chosen source (or download, or index); return the process exit status."""
    if args.source == "urls":
        return urls.run(args)
    if args.source == "index":
        return index.run(args)
    if args.source == "clip-benchmark":
        return clip_benchmark.run(args)
    start = time.perf_counter()
    records, class_names, sizes, need_caption, source = _sources(args)
    fmt, why = args.format, getattr(args, "format_because", "--format")
    if fmt is None:  # from the source images when they are listed up front; else lossless
        listed = next((r for r in records.values() if isinstance(r, list) and r), None)
        fmt, why = choose_format(listed) if listed is not None else (
            "png", "images made as they are written: stored lossless (--format jpg for photographs)")
    source = {**source, "image_format_because": why}
    opts = ImageOptions(fmt=fmt, quality=args.quality, max_side=args.max_side, max_pixels=args.max_pixels)
    entries = {}
    for split, recs in records.items():
        entries[split] = build_split(args.out, split, recs, opts=opts, shard_size=args.shard_size,
                                     workers=args.workers, require_caption=need_caption,
                                     class_names=class_names, total=sizes.get(split),
                                     progress=not args.no_progress)
    manifest = write_manifest(args.out, entries, source=source, opts=opts, class_names=class_names)
    print(summary(manifest, entries))
    written = sum(e["total"] for e in entries.values())
    seconds = time.perf_counter() - start
    print(f"wrote {written} samples to {args.out} in {seconds:.1f}s ({written / max(seconds, 1e-9):.0f} samples/s)")
    if written == 0:
        print("error: no valid sample was written; see the skip reasons above", file=sys.stderr)
        return 1
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check the command line; a bad value exits 2 with argparse's one-line error."""
    top = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if argv[:1] == ["urls"] and "--" in argv:  # what follows -- is img2dataset's
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    args = top.parse_args(argv)
    ap = top.sources[args.source]  # errors show the subcommand's usage line
    if args.source == "urls":
        args.extra = extra
        if args.spark_master and args.distributor != "pyspark":
            ap.error(f"argument --spark-master: needs --distributor pyspark (got --distributor {args.distributor})")
    out = getattr(args, "out", None)
    if out is not None and out.exists() and not out.is_dir():
        ap.error(f"argument --out: {str(args.out)!r} is a file; give a folder")
    if args.source == "digits" and args.val_fraction + args.test_fraction >= 1:
        ap.error(f"arguments --val-fraction and --test-fraction: must add up to less than 1 "
                 f"(got {args.val_fraction} + {args.test_fraction})")
    columns = getattr(args, "image_column", None)
    if isinstance(columns, list) and len(set(columns)) != len(columns):
        ap.error(f"argument --image-column: each column may be given once (got {', '.join(columns)})")
    if args.source == "clip-benchmark" and args.split and len(set(args.split)) != len(args.split):
        ap.error(f"argument --split: each split may be given once (got {', '.join(args.split)})")
    if args.source == "photos":
        if args.photo_sources and len(set(args.photo_sources)) != len(args.photo_sources):
            ap.error(f"argument --source: each source may be given once (got {', '.join(args.photo_sources)})")
        try:
            split_sizes(args.samples, args.test_fraction)
        except DataError as e:
            ap.error(f"arguments --samples and --test-fraction: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``mmcl-prep``."""
    return run_cli(run, parse_args(argv))
