"""CLIP_benchmark against ``mmcl eval zeroshot``: the same model, shards and prompts, the same top-1?

    python -m venv /tmp/cbvenv     # CLIP_benchmark in an environment of its own, about 2 minutes
    /tmp/cbvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 clip_benchmark==1.6.2 requests 'numpy<2.4'
    python benchmarks/clip_benchmark_check.py --clip-benchmark /tmp/cbvenv [--model RUN/final] [--json PATH]

clip_benchmark 1.6.2 imports ``requests`` without declaring it, and its accuracy (``float()`` of a
one-element array) fails under numpy 2.4: hence the two extra requirements.

Steps, each run as a user runs it from the shell: ``mmcl-prep digits``; unless ``--model`` is given,
``configs/clip_digits.yaml`` trained with ``accelerate launch`` (about 2.5 minutes on 2 cores);
``mmcl-prep clip-benchmark`` writing the ``test`` and ``test-shifted`` splits in CLIP_benchmark's
layout; then on each split ``clip_benchmark eval`` (the model loaded by open_clip as
``local-dir:RUN/final``, ``--no_amp``) and ``mmcl eval zeroshot`` on the same shard folder with the
same ``classnames.txt`` and ``zeroshot_classification_templates.txt``, its model loaded by mmcl
and by open_clip (``local-dir:``). One more ``clip_benchmark eval`` per split with its default
mixed precision (bfloat16 autocast on a CPU) is shown, not compared. Prints a table of top-1, top-5
and mean per-class recall; exits 1 unless the compared evaluations saw the same number of images,
got the same number right at top-1 and top-5, and the same mean per-class recall (to 1e-6: mmcl
takes per-class recall in float32).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("test", "test-shifted")
# mmcl and mmcl-prep from this checkout; clip_benchmark runs in its own environment, without it.
MMCL_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
OWN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(cmd: list[str], env: dict[str, str] = MMCL_ENV) -> tuple[str, float]:
    """Run ``cmd``; its standard output and seconds. A failure stops the benchmark with its error output."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit status {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
    return proc.stdout, time.perf_counter() - t0


def executable(venv_or_exe: str) -> str:
    """``clip_benchmark``'s executable: the path given, or the one in the virtual environment given."""
    path = Path(venv_or_exe)
    found = path / "bin" / "clip_benchmark" if path.is_dir() else path
    if not found.is_file():
        sys.exit(f"--clip-benchmark {venv_or_exe}: no clip_benchmark executable there; install it as the "
                 "docstring says")
    return str(found)


def train(data: Path, run_dir: Path) -> Path:
    """``configs/clip_digits.yaml`` trained on ``data``'s train split; the model's ``final/`` folder."""
    out, secs = run([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                     str(ROOT / "accelerate_config.yaml"), "-m", "mmcl", "train",
                     "--config", str(ROOT / "configs" / "clip_digits.yaml"), "--set", f"run.output_dir={run_dir}",
                     "--set", "train.progress=false", "--set", f"data.train_shards={data}/train-{{000000..000004}}.tar",
                     "--set", f"eval.zeroshot_shards={data}/val-000000.tar"])
    print(f"trained configs/clip_digits.yaml in {secs:.0f} s: {out.strip().splitlines()[-2]}")
    return run_dir / "final"


def clip_benchmark(exe: str, model: Path, root: Path, split: str, out: Path, amp: bool) -> dict[str, Any]:
    """``clip_benchmark eval`` on ``root``'s ``split``: its metrics and seconds."""
    result = out / f"clip_benchmark_{split}_{'amp' if amp else 'fp32'}.json"
    cmd = [exe, "eval", "--model_type", "open_clip", "--model", f"local-dir:{model}", "--pretrained", "none",
           "--dataset", f"wds/{root.name}", "--dataset_root", str(root), "--split", split,
           "--task", "zeroshot_classification", "--batch_size", "256", "--num_workers", "2", "--output", str(result)]
    stdout, secs = run(cmd + ([] if amp else ["--no_amp"]), env=OWN_ENV)
    m = json.loads(result.read_text())["metrics"]
    seen = re.search(r"^\s*accuracy\s+[0-9.]+\s+(\d+)$", stdout, re.M)  # its classification report's support
    return {"top1": m["acc1"], "top5": m["acc5"], "mean_per_class": m["mean_per_class_recall"],
            "n": int(seen.group(1)) if seen else None, "s": secs}


def mmcl_zeroshot(model: str, root: Path, split: str, out: Path) -> dict[str, Any]:
    """``mmcl eval zeroshot`` on the same shard folder, class names and prompts: its metrics and seconds."""
    report = out / f"mmcl_{split}_{'local-dir' if model.startswith('local-dir:') else 'mmcl'}"
    stdout, secs = run([sys.executable, "-m", "mmcl", "eval", "zeroshot", "--model", model,
                        "--shards", str(root / split), "--classes", str(root / "classnames.txt"),
                        "--templates", str(root / "zeroshot_classification_templates.txt"),
                        "--no-record", "--out", str(report)])
    res = json.loads((report / "zeroshot.json").read_text())
    per_class = list(res["per_class"].values())
    assert re.search(rf"zero-shot top-1: {res['top1']:.3f} on {res['n']} ", stdout), stdout
    return {"top1": res["top1"], "top5": res["top5"], "mean_per_class": sum(per_class) / len(per_class),
            "n": res["n"], "skipped": res["skipped"], "s": secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip-benchmark", required=True, help="clip_benchmark's executable or virtual environment")
    ap.add_argument("--model", type=Path, default=None,
                    help="a trained CLIP model folder (RUN/final; default: train configs/clip_digits.yaml)")
    ap.add_argument("--work", type=Path, default=None,
                    help="folder for the shards, the run and the reports (default: a new temporary one, kept)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    exe = executable(args.clip_benchmark)
    work = args.work or Path(tempfile.mkdtemp(prefix="clip_benchmark_check_"))
    data, root = work / "digits", work / "digits_cb"
    run([sys.executable, "-m", "data_prep", "digits", "--out", str(data), "--no-progress"])
    model = (args.model or train(data, work / "run")).resolve()
    out, _ = run([sys.executable, "-m", "data_prep", "clip-benchmark", str(data), "--out", str(root),
                  *[a for s in SPLITS for a in ("--split", s)]])
    print(out.strip())
    rows, agree = [], True
    for split in SPLITS:
        n = json.loads((root / split / "manifest.json").read_text())["splits"][split]["total"]
        measured = {"clip_benchmark (open_clip local-dir:, --no_amp)": clip_benchmark(exe, model, root, split, work,
                                                                                       amp=False),
                    "mmcl eval zeroshot (mmcl's loader)": mmcl_zeroshot(str(model), root, split, work),
                    "mmcl eval zeroshot (open_clip local-dir:)": mmcl_zeroshot(f"local-dir:{model}", root, split,
                                                                               work)}
        counts = {(m["n"], round(m["top1"] * n), round(m["top5"] * n)) for m in measured.values()}
        recalls = [m["mean_per_class"] for m in measured.values()]  # mmcl's per-class recalls are float32
        same = len(counts) == 1 and max(recalls) - min(recalls) < 1e-6
        measured["clip_benchmark, default AMP (bf16 on CPU; not compared)"] = clip_benchmark(exe, model, root, split,
                                                                                            work, amp=True)
        agree &= same
        rows += [{"split": split, "split_n": n, "how": how, **m, "s": round(m["s"], 1), "agree": same}
                 for how, m in measured.items()]
    print("\n| split | evaluated by | images | top-1 (right) | top-5 | mean per-class recall | eval s |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['split']} | {r['how']} | {r['n']} | {r['top1']:.4f} ({round(r['top1'] * r['split_n'])}) "
              f"| {r['top5']:.4f} | {r['mean_per_class']:.4f} | {r['s']:.1f} |")
    print("\nclip_benchmark and mmcl eval zeroshot "
          + ("agree: the same images, the same number right at top-1 and top-5, the same mean per-class recall"
             if agree else "DIFFER: see the table") + f"; work folder {work}")
    if args.json:
        figures = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(),
                   "command": " ".join(["benchmarks/clip_benchmark_check.py", *(argv or sys.argv[1:])]),
                   "model": str(model), "rows": rows, "agree": agree}
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if agree else 1


if __name__ == "__main__":
    raise SystemExit(main())
