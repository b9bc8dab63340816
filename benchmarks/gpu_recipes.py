"""The full-size recipes on one GPU: samples/s and peak memory, fp32 vs bf16, through the real path.

    python benchmarks/gpu_recipes.py [--recipes simclr,dino] [--precisions no,bf16] [--steps 30] [--photos N]

Each recipe (``configs/<name>.yaml`` or ``configs/<name>_imagenet.yaml``, with its own per-process
batch and model; ``clip_vit_b32`` for CLIP) is trained by
``accelerate launch --num_processes 1 --mixed_precision P -m mmcl train`` on 224 px digits shards
(JPEG, 100 images a shard), or with ``--photos N`` on N crops of real photographs
(``mmcl-prep photos``: 224 px JPEG, 256 a shard; upscaled 8x8 digits are smooth and decode faster
than photos, so they flatter the loader), resampled so no epoch boundary interrupts the workers,
then evaluated on the test split as the recipe's end-of-training evaluation would (kNN; zero-shot
for CLIP recipes, with the captions' own templates). Throughput is the ``samples_per_s`` of the
logged windows (images per second; each image gives the recipe's views), so it includes the
loader; ``data_wait`` is the share of that time the trainer waited for a batch, and "without the
wait" divides it out: the step throughput the GPU would give with a loader that keeps up.
Throughput and wait are means of the windows after the first third of the steps (after the first
window for short runs): at the start every worker decodes at full speed to fill its queue of
prefetched batches (``prefetch_factor`` 4), taking CPU time from the main process that launches
the GPU's work, and only then settles to the pace of training. Each row also keeps every window
(``windows``: step, samples/s, wait), the first ones included. Needs a GPU; on a machine without
one it says so and stops, unless ``--cpu-smoke`` asks for a run of the same path on the CPU at a
tiny size (8 samples a batch, 32 px, the tiny open_clip ViT for CLIP recipes): a check that the
script works, not a measurement.

With ``--results FILE`` every row is appended to the JSON list in FILE as soon as it is measured,
with what identifies its run: date, command, device, torch version, loader workers and steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = "simclr,moco_v2,moco_v3,byol,simsiam,instdisc,cmc,cpc,swav,dino"


def recipe_file(recipe: str) -> Path:
    """``configs/<recipe>.yaml`` (e.g. clip_vit_b32), else the full-size ``configs/<recipe>_imagenet.yaml``."""
    own = ROOT / "configs" / f"{recipe}.yaml"
    return own if own.is_file() else ROOT / "configs" / f"{recipe}_imagenet.yaml"


def data_spec(data: Path) -> tuple[str, str, str, str]:
    """Train and test shard patterns, zero-shot templates and a one-line description of the shards
    in ``data``, from the manifest ``mmcl-prep`` wrote there (digits or photos)."""
    path = data / "manifest.json"
    if not path.is_file():
        sys.exit(f"gpu_recipes.py: no {path}; give --data a folder that mmcl-prep digits or photos wrote")
    m = json.loads(path.read_text())
    source, splits = m.get("source") or {}, m["splits"]
    if not {"train", "test"} <= splits.keys():
        sys.exit(f"gpu_recipes.py: {path} has no train and test splits; build them with mmcl-prep digits or photos")
    # photos: the templates their captions were written from, as a YAML list for --set; digits: the named set
    templates = json.dumps(source["templates"]) if source.get("templates") else "digits"
    about = (f"{source.get('type', data.name)}: {splits['train']['total']} train / {splits['test']['total']} test, "
             f"{len(m.get('class_names') or [])} classes, {source.get('size', '?')} px {m.get('image_format')}")
    return f"{data}/{splits['train']['pattern']}", f"{data}/{splits['test']['pattern']}", templates, about


SMOKE = {"data.batch_size": 8, "data.image_size": 32}  # --cpu-smoke; CLIP recipes also get the tiny ViT


def run(recipe: str, precision: str, data: Path, out: Path, steps: int, workers: int,
        overrides: list[str] = (), smoke: bool = False) -> dict:
    run_dir = out / (f"{recipe}_{precision}" + "".join(f"_{kv}".replace("/", "-") for kv in overrides))
    train, test, templates, _ = data_spec(data)
    sets = {"run.output_dir": run_dir, "data.train_shards": train, "data.num_workers": workers,
            "data.resample": "true", "data.epoch_samples": 10**6, "train.mixed_precision": repr(precision),
            "train.steps": steps, "train.log_every": 10, "train.save_every": 0, "train.progress": "false",
            "optim.warmup_steps": steps, "eval.num_workers": workers}
    config = recipe_file(recipe)
    clip = "image_text" in config.read_text()
    if clip:  # CLIP recipes: zero-shot on the test split
        sets.update({"eval.zeroshot_shards": test, "eval.templates": templates})
    else:
        sets.update({"eval.knn_train_shards": train, "eval.knn_shards": f"['{test}']"})
    if smoke:
        sets.update({**SMOKE, **({"model.open_clip_model": "null", "model.open_clip_config": "mmcl-tiny-vit"}
                                 if clip else {})})
    # --set values are YAML: train.mixed_precision is quoted, since a bare `no` reads as false
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           *(["--cpu"] if smoke else []), "--mixed_precision", precision, "--dynamo_backend", "no",
           "-m", "mmcl", "train", "--config", str(config)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for kv in overrides:
        cmd += ["--set", kv]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
        return {"recipe": recipe, "precision": precision, "overrides": list(overrides), "error": "\n".join(tail)}
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logs = [r for r in rows if "samples_per_s" in r]
    steady = [r for r in logs[1:] if r["step"] > steps // 3] or logs[-1:]
    evals = {k: v for r in rows for k, v in r.items() if k.startswith(("knn", "zeroshot"))}
    return {"recipe": recipe, "precision": precision, "overrides": list(overrides), "batch": _batch(run_dir),
            "samples_per_s": _mean(r["samples_per_s"] for r in steady),
            "data_wait": _mean(r["data_wait"] for r in steady),
            "step_samples_per_s": _mean(r["samples_per_s"] / max(1e-6, 1 - r["data_wait"]) for r in steady),
            # every window, the first included: the loader's start and its workers' filling their queues show
            "windows": [[r["step"], round(r["samples_per_s"], 1), round(r["data_wait"], 3)] for r in logs],
            "gpu_mem_gb": max(r.get("gpu_mem_gb", 0.0) for r in logs), "last_loss": logs[-1].get("loss", math.nan),
            "finite": all(math.isfinite(r.get("loss", math.nan)) for r in logs), "wall_s": round(wall, 1), **evals}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / max(1, len(values))


def _batch(run_dir: Path) -> int:
    import yaml

    return yaml.safe_load((run_dir / "recipe.yaml").read_text())["data"]["batch_size"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", default=RECIPES)
    ap.add_argument("--precisions", default="no,bf16")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--data", type=Path, default=None,
                    help="shards with train and test splits from mmcl-prep digits or photos (built if not given)")
    ap.add_argument("--photos", type=int, default=0,
                    help="build N samples of 224 px photo crops (mmcl-prep photos) instead of 224 px digits")
    ap.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=VALUE",
                    help="a recipe key for every run (repeatable), e.g. data.decode=device")
    ap.add_argument("--out", type=Path, default=None, help="run folders (default: a temporary folder)")
    ap.add_argument("--results", type=Path, default=None,
                    help="append the rows, each with its run's date and command, to the JSON list in this file")
    ap.add_argument("--cpu-smoke", action="store_true",
                    help="run on the CPU at a tiny size: checks that the script works, measures nothing")
    args = ap.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        sys.exit("gpu_recipes.py: no CUDA device here; this benchmark measures GPU training (--cpu-smoke checks "
                 "the script on the CPU)")
    earlier = json.loads(args.results.read_text()) if args.results and args.results.is_file() else []
    if not isinstance(earlier, list):
        sys.exit(f"gpu_recipes.py: {args.results} does not hold a JSON list of rows; give another --results file")
    if args.photos < 0 or (args.data and args.photos):
        sys.exit("gpu_recipes.py: --photos takes a number of samples, and goes without --data")
    data = args.data
    if data is None and args.photos:
        data = Path(tempfile.mkdtemp()) / "photos224"
        subprocess.run([sys.executable, "-m", "data_prep", "photos", "--out", str(data), "--samples", str(args.photos),
                        "--size", "224", "--workers", str(os.cpu_count() or 1), "--no-progress"], check=True, cwd=ROOT)
    elif data is None:
        data = Path(tempfile.mkdtemp()) / "digits224"
        subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", str(data), "--size", "224",
                        "--format", "jpg", "--shard-size", "100", "--no-progress"], check=True, cwd=ROOT)
    about = data_spec(data)[3]
    device = "cpu (smoke test)" if args.cpu_smoke else torch.cuda.get_device_name()
    this_run = {"command": shlex.join(["python", *sys.argv]), "device": device,
                "torch": torch.__version__, "workers": args.workers, "steps": args.steps, "data": about}
    out = args.out or Path(tempfile.mkdtemp())
    print(f"{device}, torch {torch.__version__}, {args.workers} loader workers, "
          f"{args.steps} steps per run; data {about}")
    rows = []
    for recipe in args.recipes.split(","):
        for precision in args.precisions.split(","):
            row = run(recipe, precision, data, out, args.steps, args.workers, args.overrides, args.cpu_smoke)
            rows.append({**row, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **this_run})
            if args.results:  # after every run, so a run cut short keeps what it measured
                args.results.parent.mkdir(parents=True, exist_ok=True)
                args.results.write_text(json.dumps(earlier + rows, indent=2) + "\n")
            if "error" in row:
                print(f"{recipe:9s} {precision:4s} FAILED\n{row['error']}", flush=True)
                continue
            knn = " ".join(f"{k}={v:.3f}" for k, v in row.items() if k.startswith(("knn", "zeroshot")))
            print(f"{recipe:9s} {precision:4s} {' '.join(args.overrides)} batch {row['batch']:4d}  "
                  f"{row['samples_per_s']:6.0f} samples/s "
                  f"(waiting for data {row['data_wait']:4.0%}; {row['step_samples_per_s']:6.0f} without the wait)  "
                  f"{row['gpu_mem_gb']:5.1f} GiB  loss {row['last_loss']:.3f} finite={row['finite']}  "
                  f"{row['wall_s']:.0f} s  {knn}", flush=True)
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
