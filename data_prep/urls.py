"""``mmcl-prep urls LIST --out DIR``: img2dataset downloads a URL list into WebDataset shards, then
``mmcl-prep index`` writes their manifest.

img2dataset is what web-scale datasets (LAION and the like) are built with, on one machine or spread
over Spark or Ray. It pins ``webdataset < 0.3`` and mmcl needs ``>= 1.0``, so it lives in an
environment of its own and runs here as a command, never imported: ``--img2dataset`` names its
executable or its virtual environment (or ``pipx`` to run it through pipx); else ``img2dataset`` on
the PATH, else ``pipx run img2dataset``.

mmcl's defaults are those of ``mmcl-prep photos``: 224 px JPEG at quality 95, square (the short side
resized, then the centre cropped, as mmcl's evaluation preprocessing does); a caption column
``caption`` for tables (a ``.txt`` list holds URLs only). Anything after ``--`` goes to img2dataset
as it is (``-- --timeout 20 --retries 2``), and replaces mmcl's value of the same option.

``--distributor`` is passed on. With ``pyspark``, img2dataset's command line makes a Spark session
of its own on this machine (``local[processes]``); ``--spark-master URL`` runs it on a cluster
instead: img2dataset's Python starts the session on that master, then runs img2dataset. Setups
for several machines: docs/scaling.md.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from data_prep.index import check_replaceable, report, write_index
from data_prep.writer import MANIFEST
from mmcl.errors import DataError

INSTALL = "python -m venv ~/.venvs/img2dataset && ~/.venvs/img2dataset/bin/pip install img2dataset"
DISTRIBUTORS = ("multiprocessing", "pyspark", "ray")
RESIZE_MODES = ("center_crop", "border", "keep_ratio", "keep_ratio_largest", "no")
# img2dataset's input formats (its reader); a folder LIST holds files of one of them.
INPUT_FORMATS = ("txt", "txt.gz", "csv", "csv.gz", "tsv", "tsv.gz", "json", "json.gz", "jsonl", "jsonl.gz",
                 "parquet")
URLS_ONLY = ("txt", "txt.gz")
# With --spark-master: img2dataset's Python starts the Spark session, then runs img2dataset's own command
# line, which uses the active session (from the command line alone it makes a local[processes] one).
SPARK_DRIVER = """import sys
from pyspark.sql import SparkSession
SparkSession.builder.master(sys.argv[1]).appName("mmcl-prep urls").getOrCreate()
from img2dataset.main import main
sys.argv = ["img2dataset", *sys.argv[2:]]
main()
"""
# Options mmcl-prep sets from LIST and --out, and the output format that indexing reads.
FIXED = {"url_list": "LIST", "output_folder": "--out", "output_format": "webdataset, which mmcl-prep index reads"}


def input_format(path: Path) -> str:
    """img2dataset's ``input_format`` for a URL list file, or for a folder of such files."""
    def of(name: str) -> str | None:
        lower = name.lower()
        return next((f for f in sorted(INPUT_FORMATS, key=len, reverse=True) if lower.endswith(f".{f}")), None)

    if path.is_dir():
        found = sorted({f for p in path.iterdir() if p.is_file() and (f := of(p.name))})
        if len(found) == 1:
            return found[0]
        what = f"files of several kinds ({', '.join(found)})" if found else "no URL list file"
        raise DataError(f"{path} holds {what}; give --input-format (one of {', '.join(INPUT_FORMATS)})")
    fmt = of(path.name)
    if fmt is None:
        raise DataError(f"cannot tell the format of {path.name!r} from its name; give --input-format "
                        f"(one of {', '.join(INPUT_FORMATS)})")
    return fmt


def check_columns(path: Path, fmt: str, columns: list[str]) -> None:
    """For a plain CSV, TSV or JSON-lines file, check its first row names the columns img2dataset
    will read (its own error would be a traceback); other formats are left to img2dataset."""
    if path.is_dir() or fmt not in ("csv", "tsv", "jsonl"):
        return
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:  # as pandas, which img2dataset reads it with
            if fmt == "jsonl":
                line = f.readline()
                have = sorted(json.loads(line)) if line.strip() else []
            else:
                have = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), [])
    except (UnicodeDecodeError, ValueError, TypeError) as e:
        raise DataError(f"{path}: cannot read its first row ({e})") from None
    for col in columns:
        if col not in have:
            raise DataError(f"{path} has no column {col!r}; its columns are {', '.join(map(str, have)) or 'none'} "
                            "(name them with --url-col and --caption-col, or --no-captions)")


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_img2dataset(given: str | None) -> list[str]:
    """The command that runs img2dataset: ``given`` (an executable, its virtual environment, a command
    name, or ``pipx``), else ``img2dataset`` on the PATH, else ``pipx run img2dataset``."""
    how = f"install it in an environment of its own (it pins webdataset < 0.3, which mmcl cannot share):\n  {INSTALL}"
    if given == "pipx" or given is None:
        found = shutil.which("img2dataset") if given is None else None
        if found:
            return [found]
        pipx = shutil.which("pipx")
        if pipx:
            return [pipx, "run", "img2dataset"]
        if given == "pipx":
            raise DataError(f"--img2dataset pipx: pipx is not on the PATH; install pipx, or {how}\n"
                            "and pass --img2dataset ~/.venvs/img2dataset")
        raise DataError(f"img2dataset was not found (not on the PATH, and no pipx to run it); {how}\n"
                        "then pass --img2dataset ~/.venvs/img2dataset")
    path = Path(given).expanduser()
    if path.is_dir():  # a virtual environment, or its bin folder
        for candidate in (path / "bin" / "img2dataset", path / "Scripts" / "img2dataset.exe", path / "img2dataset"):
            if _executable(candidate):
                return [str(candidate)]
        raise DataError(f"--img2dataset {given}: no img2dataset executable in it (looked for "
                        f"{path / 'bin' / 'img2dataset'}); {how}")
    if _executable(path):
        return [str(path)]
    found = shutil.which(given)
    if found:
        return [found]
    raise DataError(f"--img2dataset {given}: not an executable, a virtual environment or a command on the PATH; "
                    f"{how}")


def interpreter(command: list[str]) -> str:
    """The Python of the environment an installed img2dataset runs in: beside its (resolved) script, or the
    one the script's first line names."""
    if len(command) == 1:
        script = Path(command[0]).resolve()
        beside = [script.parent / name for name in ("python", "python3", "python.exe")]
        found = next((str(p) for p in beside if _executable(p)), None)
        if found:
            return found
        with script.open("rb") as f:
            first = f.readline().decode("utf-8", "replace")
        if first.startswith("#!") and "python" in first and _executable(Path(first[2:].split()[0])):
            return first[2:].split()[0]
    raise DataError(f"--spark-master runs img2dataset's own Python, so img2dataset must be installed in an "
                    f"environment (not run by {' '.join(command)}): {INSTALL}, then pass --img2dataset "
                    "~/.venvs/img2dataset")


def _option(token: str) -> str | None:
    """The img2dataset option a ``--name[=value]`` token names (fire takes dashes or underscores)."""
    return token[2:].split("=", 1)[0].replace("-", "_") if token.startswith("--") and len(token) > 2 else None


def img2dataset_args(args: Any) -> list[str]:
    """img2dataset's options: mmcl's defaults and the choices on the command line, then the extra
    arguments, which replace mmcl's value of an option they name."""
    fmt = args.input_format or input_format(args.list)
    caption = None if args.no_captions else args.caption_col or (None if fmt in URLS_ONLY else "caption")
    if caption and fmt in URLS_ONLY:
        raise DataError(f"a .{fmt} URL list holds URLs only, no captions; use a .csv/.tsv/.parquet/.jsonl list "
                        "with a caption column, or leave out --caption-col")
    check_columns(args.list, fmt, [args.url_col] + ([caption] if caption else []))
    ours: dict[str, Any] = {
        "url_list": args.list, "output_folder": args.out, "output_format": "webdataset", "input_format": fmt,
        "url_col": args.url_col, "caption_col": caption, "image_size": args.size, "resize_mode": args.resize_mode,
        "encode_format": "jpg", "encode_quality": args.quality, "number_sample_per_shard": args.shard_size,
        "processes_count": args.processes, "thread_count": args.threads, "distributor": args.distributor,
    }
    extra = list(args.extra)
    named = {o for t in extra if (o := _option(t))}
    fixed = sorted(named & set(FIXED))
    if fixed:
        raise DataError(f"img2dataset's --{fixed[0]} is set by mmcl-prep urls from {FIXED[fixed[0]]}; leave it out "
                        "of the arguments after --")
    return [f"--{k}={v}" for k, v in ours.items() if v is not None and k not in named] + extra


def run(args: Any) -> int:
    """Download with img2dataset, then index the shards; return the process exit status."""
    if not args.list.exists():
        raise DataError(f"URL list {str(args.list)!r} does not exist")
    check_replaceable(args.out)  # before downloading: a folder another mmcl-prep command wrote is left alone
    head = shown = find_img2dataset(args.img2dataset)
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", **os.environ}  # albumentations asks the network for news otherwise
    if args.spark_master:
        python = interpreter(head)
        head = [python, "-c", SPARK_DRIVER, args.spark_master]
        shown = [python, "-c", "<data_prep.urls.SPARK_DRIVER>", args.spark_master]
        env.setdefault("PYSPARK_PYTHON", python)  # Spark's workers run img2dataset with it too
    options = img2dataset_args(args)
    command, shown = head + options, shlex.join(shown + options)
    args.out.mkdir(parents=True, exist_ok=True)
    # img2dataset resumes by reading every *.json in the folder as a shard's stats: our manifest would stop it.
    (args.out / MANIFEST).unlink(missing_ok=True)
    print(f"running: {shown}", flush=True)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, check=False, env=env)
    except OSError as e:
        raise DataError(f"img2dataset could not start ({e}); the command was: {shown}") from None
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        hint = (" With --distributor pyspark, img2dataset's environment needs pyspark (and Spark needs Java)."
                if args.distributor == "pyspark" else "")
        raise DataError(f"img2dataset failed (exit status {done.returncode}; its messages are above).{hint} "
                        f"The command was: {shown}")
    if not any(p.is_file() for p in args.out.glob("*.tar")):
        hint = (" With --distributor ray, img2dataset does nothing when ray is not installed in its environment "
                "(pip install ray there)." if args.distributor == "ray" else "")
        raise DataError(f"img2dataset wrote no .tar shard in {args.out}.{hint} The command was: {shown}")
    print(f"img2dataset took {seconds:.1f}s", flush=True)
    return report(write_index(args.out, args.split), args.out / MANIFEST)
