"""Every self-supervised method on digits, one small CNN, a few CPU minutes each: kNN / linear-probe table.

    python benchmarks/ssl_digits.py [--methods simclr,byol] [--steps N] [--data data/digits] [--seeds 0,1,2]

For each method, trains ``configs/<method>_digits.yaml`` with ``mmcl train`` (a subprocess, as a
user would) for the recipe's ``train.steps`` (or ``--steps``), then evaluates the saved encoder
and the same encoder at its initialisation (same seed, no training) with kNN (k 20, T 0.07) on
the test and test-shifted splits and a linear probe on the test split. With ``--seeds``, once per
seed (``run.seed``), the scores averaged and each seed's kept (the table shows the lowest and
highest beside the mean). Writes
``benchmarks/results/ssl_digits.json`` (one entry per method, stamped with the date and command of
the run that measured it; a run of a subset of methods replaces those entries and keeps the rest)
and prints a Markdown table of the methods measured by this run, then, apart, the entries kept from
earlier runs with their dates and commands. CMC reads digits shards with an edge-map field (built
beside ``--data`` with ``mmcl-prep digits --edges``); CPC's per-k prediction accuracies are recorded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from data_prep.cli import main as prep
from mmcl.evaluate.run import frozen_feature_evals
from mmcl.hub import from_pretrained
from mmcl.recipe import Recipe, load_recipe
from mmcl.registry import build, plugin_name

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["simclr", "simclr_v2", "moco_v1", "moco_v2", "moco_v3", "byol", "simsiam", "invaspread", "instdisc", "cmc",
           "cpc", "swav", "dino", "nnclr", "dcl", "barlow_twins", "vicreg"]


def describe_views(recipe: Recipe) -> str:
    """What the method compares, read off its recipe (recorded with each result)."""
    d, m, objective = recipe.data, recipe.model, plugin_name("objective", recipe.objective)
    if d.view_fields:
        return f"one image field per encoder: {', '.join(d.view_fields)}"
    if objective == "cpc":
        g = (d.image_size - m.patch_size) // m.patch_stride + 1
        return (f"{g}×{g} grid of {m.patch_size} px patches every {m.patch_stride} px (one augmented view), "
                f"rows 1..{recipe.objective.steps} ahead predicted")
    if d.multi_crop:
        mc = d.multi_crop
        return f"{d.views} global {d.image_size} px + {mc.local_crops} local {mc.local_size} px crops"
    if objective == "instdisc":
        return "one augmented view against the memory bank"
    return f"{d.views} augmented views of the image"


def scores(model: torch.nn.Module, data: Path, preprocess: dict) -> dict[str, float]:
    """kNN top-1 on test and test-shifted, linear-probe top-1 on test."""
    test, shifted = f"{data}/test-{{000000..000001}}.tar", f"{data}/test-shifted-{{000000..000001}}.tar"
    res = frozen_feature_evals(model, f"{data}/train-{{000000..000004}}.tar", [test, shifted], linear=True,
                               preprocess=preprocess, num_workers=2)
    get = lambda task, shards: next(r["metrics"]["top1"] for r in res  # noqa: E731
                                    if r["task"] == task and r["dataset"]["shards"] == shards)
    return {"knn_test": get("knn", test), "knn_shifted": get("knn", shifted), "linear_test": get("linear", test),
            "linear_shifted": get("linear", shifted)}


def run(method: str, steps: int | None, data: Path, out: Path, seed: int | None = None) -> dict[str, object]:
    """Train ``method``'s digits recipe (with ``run.seed`` set to ``seed`` unless None) and score it."""
    config = ROOT / "configs" / f"{method}_digits.yaml"
    folder = out / method if seed is None else out / method / f"seed_{seed}"
    sets = [f"run.output_dir={folder}", *([f"train.steps={steps}"] if steps else []), "train.progress=false",
            f"data.train_shards={data}/train-{{000000..000004}}.tar", "eval.knn_train_shards=null",
            "eval.knn_shards=[]", *([f"run.seed={seed}"] if seed is not None else [])]
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "mmcl", "train", "--config", str(config)] + [a for s in sets for a in ("--set", s)]
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    std = [r["embedding_std"] for r in rows if "embedding_std" in r][-1]
    last = [r for r in rows if "loss" in r][-1]
    trained_model = from_pretrained(folder / "final")
    trained = scores(trained_model, data, trained_model.mmcl_config["preprocess"])
    recipe = load_recipe(config, sets)
    torch.manual_seed(recipe.run.seed)  # the trainer's set_seed: the very initialisation training started from
    initial = build("model", recipe.model).eval()
    random = scores(initial, data, recipe.data.preprocess())
    return {"method": method, **{k: round(v, 4) for k, v in trained.items()},
            "random_knn_test": round(random["knn_test"], 4), "random_knn_shifted": round(random["knn_shifted"], 4),
            "random_linear_test": round(random["linear_test"], 4), "wall_s": round(wall, 1),
            "steps": recipe.train.steps,
            "embedding_std": round(std, 4), "embedding_dim": int(initial.embed_dim),
            "views": describe_views(recipe),
            **({"cpc_acc": {k: round(v, 4) for k, v in last.items() if k.startswith("acc_k")}}
               if method == "cpc" else {})}


SCORES = ("knn_test", "knn_shifted", "linear_test", "linear_shifted", "random_knn_test", "random_knn_shifted",
          "random_linear_test", "wall_s", "embedding_std")


def aggregate(runs: list[dict], seeds: list[int]) -> dict:
    """One entry for runs of one method under several seeds: each score's mean, its values per seed
    under ``per_seed``, and the seeds (single 250-step runs differ by several points between seeds).

    >>> a = {"method": "m", "knn_shifted": 0.5, "random_knn_shifted": 0.25, "steps": 2, "views": "v"}
    >>> e = aggregate([a, {**a, "knn_shifted": 0.7}], [0, 1])
    >>> e["knn_shifted"], e["per_seed"]["knn_shifted"], e["seeds"], e["steps"]
    (0.6, [0.5, 0.7], [0, 1], 2)
    """
    entry = dict(runs[0])
    entry["per_seed"] = {}
    for key in SCORES:
        if key in entry:
            values = [r[key] for r in runs]
            entry[key] = round(sum(values) / len(values), 4)
            entry["per_seed"][key] = values
    entry["seeds"] = seeds
    return entry


def merge(earlier: list[dict], measured: list[dict]) -> list[dict]:
    """The results file after a run: one entry per method, this run's replacing earlier ones in place.

    >>> merge([{"method": "a", "x": 1}, {"method": "b", "x": 1}], [{"method": "b", "x": 2}, {"method": "c", "x": 2}])
    [{'method': 'a', 'x': 1}, {'method': 'b', 'x': 2}, {'method': 'c', 'x': 2}]
    """
    entries = {e["method"]: e for e in earlier}
    entries.update({e["method"]: e for e in measured})
    return list(entries.values())


def spread(values: list[float], scale: float = 1.0, fmt: str = ".3f") -> str:
    """The mean of ``values`` and, when there are several (seeds), their lowest and highest.

    >>> spread([0.5]), spread([0.5, 0.7]), spread([0.1, 0.2], 100, "+.1f")
    ('0.500', '0.600 (0.500–0.700)', '+15.0 (+10.0–+20.0)')
    """
    mean = sum(values) / len(values) * scale
    if len(values) < 2:
        return f"{mean:{fmt}}"
    return f"{mean:{fmt}} ({min(values) * scale:{fmt}}–{max(values) * scale:{fmt}})"


def table(entries: list[dict], provenance: bool = False) -> list[str]:
    """Markdown rows of ``entries``; with ``provenance``, each entry's date and command (or "not
    recorded" for entries written before they were stored)."""
    head = ("| method | steps | kNN test | kNN test-shifted | random-init kNN shifted | gain | linear test | wall s | "
            "embedding std (1/√d) |")
    lines = [head + (" measured | command |" if provenance else ""), "|---" * (9 + 2 * provenance) + "|"]
    for e in entries:
        runs = e.get("per_seed", {})
        gains = [a - b for a, b in zip(runs.get("knn_shifted", []), runs.get("random_knn_shifted", []))]
        gain = spread(gains or [e["knn_shifted"] - e["random_knn_shifted"]], 100, "+.1f")
        method = e["method"] + (f" ({len(e['seeds'])} seeds)" if len(e.get("seeds", [])) > 1 else "")
        cells = {k: spread(runs.get(k, [e[k]])) for k in ("knn_test", "knn_shifted", "random_knn_shifted",
                                                           "linear_test")}
        line = (f"| {method} | {e['steps']} | {cells['knn_test']} | {cells['knn_shifted']} | "
                f"{cells['random_knn_shifted']} | {gain} | {cells['linear_test']} | {e['wall_s']:.0f} | "
                f"{e['embedding_std']:.3f} ({e['embedding_dim'] ** -0.5:.3f}) |")
        if provenance:
            command = f"`{e['command']}`" if e.get("command") else "not recorded"
            line += f" {e.get('date', 'not recorded')} | {command} |"
        lines.append(line)
    return lines


def report(measured: list[dict], earlier: list[dict], results: Path) -> str:
    """This run's table, then (apart, dated) the entries of ``results`` this run did not measure.

    >>> row = dict(steps=2, knn_test=0.5, knn_shifted=0.4, random_knn_shifted=0.3, linear_test=0.6, wall_s=9,
    ...            embedding_std=0.1, embedding_dim=64)
    >>> old = [{**row, "method": "byol"}, {**row, "method": "simclr", "date": "2026-01-01T00:00:00+00:00",
    ...                                    "command": "python benchmarks/ssl_digits.py"}]
    >>> text = report([{**row, "method": "simclr", "date": "2026-12-01T00:00:00+00:00", "command": "x"}], old,
    ...               Path("r.json"))
    >>> print("\\n".join(line for line in text.splitlines() if "---" not in line and "| method |" not in line))
    ... # doctest: +ELLIPSIS
    Measured by this run:
    | simclr | 2 | 0.500 | 0.400 | 0.300 | +10.0 | 0.600 | 9 | 0.100 (0.125) |
    <BLANKLINE>
    Not measured by this run: earlier entries kept in r.json, each with the run that measured it:
    | byol | 2 | 0.500 | ... | 0.100 (0.125) | not recorded | not recorded |
    """
    lines = ["Measured by this run:", *table(measured)]
    done = {e["method"] for e in measured}
    kept = [e for e in earlier if e["method"] not in done]
    if kept:
        lines += ["", f"Not measured by this run: earlier entries kept in {results}, each with the run that "
                      "measured it:", *table(kept, provenance=True)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="override every recipe's train.steps")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "digits")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ssl_digits")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "ssl_digits.json")
    ap.add_argument("--seeds", default=None, help="comma-separated run.seed values: each method trained once per "
                                                  "seed, the scores averaged, the lowest and highest shown "
                                                  "(default: the recipe's seed, one run)")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else None
    edges = args.data.with_name(args.data.name + "_edges")
    if not (args.data / "manifest.json").is_file():
        prep(["digits", "--out", str(args.data)])
    if "cmc" in args.methods.split(",") and not (edges / "manifest.json").is_file():
        prep(["digits", "--out", str(edges), "--edges"])
    earlier = json.loads(args.results.read_text()) if args.results.is_file() else []
    command = shlex.join(["python", *sys.argv])
    measured: list[dict] = []
    for method in args.methods.split(","):
        data = edges if method == "cmc" else args.data
        entry = (aggregate([run(method, args.steps, data, args.out, seed) for seed in seeds], seeds) if seeds
                 else run(method, args.steps, data, args.out))
        measured.append({**entry, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         "command": command})
        args.results.parent.mkdir(parents=True, exist_ok=True)  # after every method: a cut run keeps its rows
        args.results.write_text(json.dumps(merge(earlier, measured), indent=2) + "\n")
    print(report(measured, earlier, args.results))


if __name__ == "__main__":
    main()
