"""SLIP against CLIP on digits at equal steps: zero-shot top-1 on the test split, and kNN top-1 of the
image tower's frozen features on test-shifted (train split as the reference set).

    python benchmarks/slip_digits.py [--steps 500] [--seed 0] [--out runs/slip_bench] [--json FILE]

Trains ``configs/clip_digits.yaml`` and ``configs/slip_digits.yaml`` one after the other (same seed,
data, steps and batch), then evaluates both final models the same way; prints one row per recipe.
On 2 CPU cores the pair takes about 15 minutes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mmcl
from data_prep.cli import main as prep
from mmcl.evaluate.run import frozen_feature_evals, zeroshot

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: str, data: Path, out: Path, steps: int, seed: int, overrides: list[str]) -> dict:
    """Train one recipe and evaluate its final model; the row of the table."""
    start = time.time()
    final = mmcl.fit(ROOT / "configs" / f"{recipe}.yaml", [
        f"data.train_shards={data}/train-{{000000..000004}}.tar", f"run.output_dir={out / recipe}",
        f"train.steps={steps}", f"run.seed={seed}", "train.progress=false", "eval.zeroshot_shards=null",
        *(overrides if recipe != "clip_digits" else [])])
    wall = time.time() - start
    model = mmcl.from_pretrained(final)
    pre = model.mmcl_config["preprocess"]
    row = {"recipe": recipe, "steps": steps, "seed": seed, "wall_s": round(wall, 1),
           "overrides": overrides if recipe != "clip_digits" else []}
    for split in ("test", "test-shifted"):
        res = zeroshot(model, f"{data}/{split}-{{000000..000001}}.tar", preprocess=pre, templates="digits",
                       num_workers=0)
        row[f"zeroshot_{split}"] = round(res["top1"], 4)
    for r in frozen_feature_evals(model, f"{data}/train-{{000000..000004}}.tar",
                                  [f"{data}/test-{{000000..000001}}.tar",
                                   f"{data}/test-shifted-{{000000..000001}}.tar"],
                                  preprocess=pre, num_workers=0):
        row[f"knn_{r['dataset']['name'].split('/')[-1]}"] = round(r["metrics"]["top1"], 4)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/slip_bench"))
    parser.add_argument("--json", type=Path, default=None, help="write the rows here")
    parser.add_argument("--recipes", default="clip_digits,slip_digits", help="comma-separated")
    parser.add_argument("--set", action="append", default=[], dest="overrides",
                        help="KEY=VALUE for the SLIP recipe (repeatable)")
    args = parser.parse_args()
    data = args.out / "digits"
    if not (data / "manifest.json").is_file():
        prep(["digits", "--out", str(data), "--no-progress"])
    rows = [run(recipe, data, args.out, args.steps, args.seed, args.overrides) for recipe in args.recipes.split(",")]
    keys = ["recipe", "zeroshot_test", "zeroshot_test-shifted", "knn_test", "knn_test-shifted", "wall_s"]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
