"""img2dataset end to end: images served on 127.0.0.1, some URLs missing, ``mmcl-prep urls`` (the real
img2dataset, from its own environment), the manifest it indexes, and a few CLIP training steps on it.

    python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset     # its own environment, about 25 s
    python benchmarks/img2dataset_e2e.py --img2dataset /tmp/i2d [--images 50] [--missing 6] [--steps 6]
    python benchmarks/img2dataset_e2e.py --img2dataset /tmp/i2d --distributor pyspark --spark-master 'local[2]'

The images are scikit-learn digits upscaled to 64 px JPEGs with a caption naming the digit
("a photo of the number seven."), served by ``http.server`` on 127.0.0.1 from a temporary folder;
``--missing`` URLs name files that are not there (404) and one URL serves text instead of an image.
img2dataset downloads them at ``--size`` px into shards of ``--shard-size`` URLs; ``mmcl-prep
index`` counts the samples and sums img2dataset's failures by reason; a second ``mmcl-prep urls``
into the same folder resumes (img2dataset skips the finished shards) and indexes again; then the
real Trainer runs ``--steps`` steps of configs/clip_digits.yaml's tiny CLIP on the shards. Prints
the counts and the seconds of each stage (``--json PATH`` writes them too); exits 1 when a count
is not what the served files make it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import random
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from data_prep.cli import main as prep  # noqa: E402


class Quiet(SimpleHTTPRequestHandler):
    """Serve files without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        pass


@contextlib.contextmanager
def serve(folder: Path):
    """An HTTP server for ``folder`` on 127.0.0.1 (a free port), in a thread; yields its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def make_images(folder: Path, n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` digits as 64 px JPEGs in ``folder``: ``[(file name, caption), ...]``."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from data_prep.captions import DIGIT_NAMES

    digits = load_digits()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        pixels = (digits.images[i] * (255 / 16)).astype(np.uint8)
        img = Image.fromarray(pixels).resize((64, 64), Image.Resampling.BICUBIC).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=95)
        name = f"digit_{i:03d}.jpg"
        (folder / name).write_bytes(buf.getvalue())
        out.append((name, f"a photo of the number {DIGIT_NAMES[digits.target[i]]}."))
    rng.shuffle(out)
    return out


def write_list(path: Path, base: str, images: list[tuple[str, str]], missing: int) -> dict[str, int]:
    """The URL list (CSV: url, caption): every image, ``missing`` URLs of files that are not there,
    and one URL of a text file named .jpg; returns how many of each kind."""
    rows = [(f"{base}/{name}", caption) for name, caption in images]
    rows += [(f"{base}/gone_{i:03d}.jpg", "a photo of nothing.") for i in range(missing)]
    rows.append((f"{base}/not_an_image.jpg", "a photo of some text."))
    random.Random(1).shuffle(rows)
    with path.open("w", encoding="utf-8") as f:
        f.write("url,caption\n")
        f.writelines(f"{url},{caption}\n" for url, caption in rows)
    return {"urls": len(rows), "images": len(images), "missing": missing, "not_an_image": 1}


def urls_run(args: argparse.Namespace, url_list: Path, out: Path) -> tuple[int, float]:
    """``mmcl-prep urls`` with this benchmark's sizes; (exit status, seconds)."""
    start = time.perf_counter()
    code = prep(["urls", str(url_list), "--out", str(out), "--img2dataset", args.img2dataset,
                 "--size", str(args.size), "--shard-size", str(args.shard_size), "--processes", str(args.processes),
                 "--threads", str(args.threads), "--distributor", args.distributor,
                 *(["--spark-master", args.spark_master] if args.spark_master else []), "--", "--timeout", "5"])
    return code, time.perf_counter() - start


def train(shards: Path, run: Path, steps: int, batch: int) -> dict[str, Any]:
    """``steps`` steps of the tiny CLIP recipe on ``shards``; what the run says about its data."""
    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    recipe = load_recipe(ROOT / "configs" / "clip_digits.yaml", [
        f"data.train_shards={shards}", f"run.output_dir={run}", f"data.batch_size={batch}", "data.num_workers=0",
        "data.shuffle_buffer=50", f"train.steps={steps}", "train.log_every=1", "optim.warmup_steps=2",
        "train.progress=false", "eval.zeroshot_shards=null"])
    trainer = Trainer(recipe)
    start = time.perf_counter()
    trainer.fit()
    seconds = time.perf_counter() - start
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    summary = json.loads((run / "summary.json").read_text())
    return {"seconds": round(seconds, 1), "steps": len(losses), "epoch_samples": trainer.loader.stream.epoch_samples,
            "train_samples": summary["data"]["train_samples"],
            "epochs": sorted({r["epoch"] for r in rows if "epoch" in r}), "first_loss": round(losses[0], 3),
            "last_loss": round(losses[-1], 3), "skipped": summary["data"]["skipped"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--img2dataset", required=True, help="img2dataset's executable or virtual environment")
    ap.add_argument("--images", type=int, default=50, help="images served (default %(default)s)")
    ap.add_argument("--missing", type=int, default=6, help="URLs of files that are not there (default %(default)s)")
    ap.add_argument("--size", type=int, default=32, help="img2dataset's --image_size (default %(default)s)")
    ap.add_argument("--shard-size", type=int, default=20, help="URLs per shard (default %(default)s)")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--distributor", default="multiprocessing", help="multiprocessing, pyspark or ray (the last "
                                                                     "two installed in img2dataset's environment)")
    ap.add_argument("--spark-master", default=None, help="with pyspark: the master URL, e.g. 'local[2]'")
    ap.add_argument("--steps", type=int, default=6, help="CLIP training steps (default %(default)s)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the served files, the shards and the run (default: a new temporary one, kept)")
    args = ap.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="img2dataset_e2e_"))
    served, out = work / "served", work / "shards"
    images = make_images(served, args.images)
    (served / "not_an_image.jpg").write_text("this is text, not an image\n")
    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["benchmarks/img2dataset_e2e.py",
                                                                                         *(argv or sys.argv[1:])])}
    with serve(served) as base:
        url_list = work / "urls.csv"
        figures["served"] = write_list(url_list, base, images, args.missing)
        code, seconds = urls_run(args, url_list, out)
        if code != 0:
            print(f"mmcl-prep urls failed (exit status {code})", file=sys.stderr)
            return 1
        first = json.loads((out / "manifest.json").read_text())
        again, resumed = urls_run(args, url_list, out)  # img2dataset resumes: every shard is done
    split = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    figures["urls_s"], figures["resume_s"], figures["resume_exit"] = round(seconds, 1), round(resumed, 1), again
    figures["index"] = {"shards": {s["name"]: s["samples"] for s in split["shards"]}, "total": split["total"],
                        "formats": split["formats"], "img2dataset": split.get("img2dataset"), "faults": split["faults"]}
    figures["same_after_resume"] = first["splits"] == json.loads((out / "manifest.json").read_text())["splits"]
    figures["train"] = train(out, work / "run", args.steps, args.batch)
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    i2d = split.get("img2dataset") or {}
    expected = {"total": args.images, "successes": args.images, "count": figures["served"]["urls"],
                "failed": args.missing + 1, "epoch_samples": args.images, "resume_exit": 0}
    got = {"total": split["total"], "successes": i2d.get("successes"), "count": i2d.get("count"),
           "failed": i2d.get("failed_to_download", 0) + i2d.get("failed_to_resize", 0),
           "epoch_samples": figures["train"]["epoch_samples"], "resume_exit": again}
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    if wrong or not figures["same_after_resume"]:
        print(f"unexpected (got, expected): {wrong}, same manifest after resuming: {figures['same_after_resume']}",
              file=sys.stderr)
        return 1
    print(f"ok: {split['total']} of {figures['served']['urls']} URLs became samples; work folder {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
