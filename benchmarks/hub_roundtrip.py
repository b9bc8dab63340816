"""Push a trained model to a local Hub stand-in and evaluate it four ways; print a table.

    make demo && python benchmarks/hub_roundtrip.py [--model runs/clip_digits/final]

Runs, each as a user would from the shell (HF_ENDPOINT/HF_TOKEN/HF_HOME pointing at the stand-in):
``mmcl push``, then ``mmcl eval zeroshot`` on the local folder, the Hub repo id (mmcl's loader),
``hf-hub:ORG/NAME`` and ``local-dir:FOLDER`` (open_clip's own loader). Exits 1 if the zero-shot
accuracies differ.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from mmcl.testing.hub_standin import HubStandIn

TOKEN = "hf_roundtrip_token"


def run(cmd: list[str], env: dict[str, str]) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return proc.stdout, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/clip_digits/final")
    ap.add_argument("--shards", default="data/digits/test-{000000..000001}.tar")
    ap.add_argument("--templates", default="digits")
    ap.add_argument("--repo-id", default="mmcl-user/clip-digits")
    args = ap.parse_args()
    mmcl = [sys.executable, "-m", "mmcl"]
    with tempfile.TemporaryDirectory() as tmp, HubStandIn({TOKEN: args.repo_id.split("/")[0]}) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HOME": f"{tmp}/hf",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
        out, secs = run(mmcl + ["push", "--model", args.model, "--repo-id", args.repo_id], env)
        files = hub.repos[args.repo_id].files("main")[1]
        print(out.strip())
        print(f"push: {len(files)} files, {sum(map(len, files.values())) / 1e6:.1f} MB in {secs:.1f} s: "
              + ", ".join(sorted(files)))
        rows = []
        for how, spec in (("mmcl, local folder", args.model), ("mmcl, Hub repo id", args.repo_id),
                          ("open_clip, hf-hub:", f"hf-hub:{args.repo_id}"),
                          ("open_clip, local-dir:", f"local-dir:{args.model}")):
            out, secs = run(mmcl + ["eval", "zeroshot", "--model", spec, "--shards", args.shards, "--templates",
                                    args.templates, "--no-record", "--out", f"{tmp}/eval"], env)
            top1 = float(re.search(r"zero-shot top-1: ([0-9.]+) on (\d+)", out).group(1))
            top5 = float(re.search(r"zero-shot top-5: ([0-9.]+)", out).group(1))
            rows.append((how, spec, top1, top5, secs))
        print("\n| loaded with | model | top-1 | top-5 | eval s |\n|---|---|---|---|---|")
        for how, spec, top1, top5, secs in rows:
            print(f"| {how} | `{spec}` | {top1:.3f} | {top5:.3f} | {secs:.1f} |")
        if len({r[2] for r in rows}) != 1:
            sys.exit("zero-shot accuracies differ between loaders")


if __name__ == "__main__":
    main()
