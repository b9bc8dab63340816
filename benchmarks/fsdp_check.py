"""``train.fsdp`` on GPUs, through Accelerate as a real run takes it: FSDP2 against DDP, checkpoint and
resume, ``final/``. Prints the equality figures and exits non-zero if one is out of tolerance.

    python benchmarks/fsdp_check.py [--procs N] [--model tiny|vit_b32] [--steps 6] [--precision no|bf16]
                                    [--tol 1e-4] [--results FILE]

Builds digits shards (``mmcl-prep digits``: 32 px for the tiny open_clip ViT, 224 px JPEG for
ViT-B/32 from scratch), then in ``torchrun --nproc_per_node N`` processes (default: every GPU here;
1 GPU is enough, FSDP then still wraps, shards over one process, gathers state dicts and exports)
trains the CLIP recipe on the real loader, each run in the same processes:

- ``ddp``: ``train.fsdp: false``;
- ``fsdp``: ``train.fsdp: true``, a checkpoint at half the steps;
- ``fsdp_resume``: that checkpoint resumed under FSDP; ``ddp_from_fsdp``: resumed under DDP.

Reported: Accelerate's distributed type and the parameters' type under FSDP (``DTensor``), the losses
of every step and their largest difference (FSDP vs DDP; each resumed run vs the uninterrupted FSDP
run over the resumed steps), the largest weight difference of the final models (FSDP's read back
from ``final/`` by mmcl, and loaded by open_clip from the same folder), the peak GPU memory per
process. TF32 is off; GPU kernels are not bitwise deterministic, hence ``--tol`` (1e-4 by default;
bf16 runs differ more: FSDP2 gathers parameters and runs the towers in bf16; both reduce fp32 gradients).

The distributed tests (``tests/dist/test_fsdp.py``) check the same on 2 CPU processes, where
Accelerate's choice of FSDP has to be switched on by the test; here nothing is switched.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODELS = {  # recipe, overrides, image size of the shards
    "tiny": ("clip_digits", ["data.batch_size=8"], 32),
    "vit_b32": ("clip_vit_b32", ["data.batch_size=32", "optim.fused=false"], 224),
}


def recipe_for(args: argparse.Namespace, shards: str, out: Path, fsdp: bool) -> Any:
    from mmcl.recipe import load_recipe

    config, extra, _ = MODELS[args.model]
    half = max(1, args.steps // 2)
    return load_recipe(ROOT / "configs" / f"{config}.yaml", [
        f"data.train_shards={shards}", f"run.output_dir={out}", "data.num_workers=0", "data.shuffle_buffer=64",
        f"train.steps={args.steps}", "train.log_every=1", f"train.save_every={half}", "train.progress=false",
        "optim.warmup_steps=1", "eval.zeroshot_shards=null", f"train.mixed_precision={args.precision}",
        f"train.fsdp={str(fsdp).lower()}", "train.tf32=false", *extra])


def worker(args: argparse.Namespace) -> None:
    """One process of the check (under torchrun): every run in turn; rank 0 writes the figures."""
    import torch
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    from mmcl.dist import world
    from mmcl.hub import from_pretrained
    from mmcl.train import Trainer

    PartialState()  # one process group for every run (the trainer leaves it; TF32 is off in the recipes)
    rank, procs = world()
    runs, half = Path(args.worker), max(1, args.steps // 2)
    out: dict[str, Any] = {"procs": procs, "device": torch.cuda.get_device_name(), "torch": str(torch.__version__)}
    for name, fsdp, resume in (("ddp", False, False), ("fsdp", True, False), ("fsdp_resume", True, True),
                               ("ddp_from_fsdp", False, True)):
        AcceleratorState._reset_state()  # each run's Accelerator takes its own plugin (or none)
        os.environ.pop("ACCELERATE_USE_FSDP", None)
        folder = runs / name
        if resume and rank == 0:
            step = f"step_{half:08d}"
            shutil.copytree(runs / "fsdp" / "checkpoints" / step, folder / "checkpoints" / step)
        torch.distributed.barrier()
        torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(recipe_for(args, args.shards, folder, fsdp))
        final = trainer.fit(resume="latest" if resume else None)
        row: dict[str, Any] = {"distributed_type": str(trainer.acc.distributed_type),
                               "params": type(next(trainer.model.parameters())).__name__,
                               "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
        if rank == 0:
            lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
            row["losses"] = {r["step"]: r["loss"] for r in lines if "loss" in r}
            model = from_pretrained(final) if fsdp else trainer.unwrapped
            row["state"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            row["final"] = str(final)
        out[name] = row
        del trainer
        torch.cuda.empty_cache()
    if rank == 0:
        torch.save(out, runs / "figures.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def largest(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, str]:
    diffs = {k: (a[k].double() - b[k].double().reshape(a[k].shape)).abs().max().item() for k in a}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def report(figures: dict[str, Any], tol: float) -> tuple[dict[str, Any], bool]:
    """The figures as one row, and whether every check passed."""
    import open_clip
    import torch

    ddp, fsdp = figures["ddp"], figures["fsdp"]
    row: dict[str, Any] = {k: figures[k] for k in ("procs", "device", "torch")}
    row["fsdp_distributed_type"], row["fsdp_params"] = fsdp["distributed_type"], fsdp["params"]
    row["peak_gib"] = {k: round(figures[k]["peak_gib"], 3) for k in ("ddp", "fsdp")}
    steps = sorted(ddp["losses"])
    row["losses"] = {"ddp": [ddp["losses"][s] for s in steps], "fsdp": [fsdp["losses"][s] for s in steps]}
    row["loss_diff_fsdp_vs_ddp"] = max(abs(ddp["losses"][s] - fsdp["losses"][s]) for s in steps)
    row["weight_diff_fsdp_vs_ddp"] = largest(fsdp["state"], ddp["state"])
    for name in ("fsdp_resume", "ddp_from_fsdp"):
        run = figures[name]
        row[f"loss_diff_{name}"] = max(abs(run["losses"][s] - fsdp["losses"][s]) for s in run["losses"])
        row[f"weight_diff_{name}"] = largest(run["state"], fsdp["state"])
    oc = open_clip.create_model("local-dir:" + fsdp["final"]).state_dict()
    row["open_clip_loads_final"] = all(torch.equal(oc[k.removeprefix("clip.")], v) for k, v in fsdp["state"].items())
    ok = (fsdp["distributed_type"].endswith("FSDP") and fsdp["params"] == "DTensor" and row["open_clip_loads_final"]
          and all(row[k] <= tol for k in row if k.startswith("loss_diff"))
          and all(row[k][0] <= tol for k in row if k.startswith("weight_diff")))
    return row, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=0, help="processes (default: every GPU)")
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--precision", choices=["no", "bf16"], default="no")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--results", type=Path, help="append the row to this JSON list")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    import torch

    if not torch.cuda.is_available():
        sys.exit("fsdp_check.py: no CUDA device here; Accelerate applies its FSDP plugin to GPU processes only "
                 "(the CPU check is tests/dist/test_fsdp.py)")
    procs = args.procs or torch.cuda.device_count()
    tmp = Path(tempfile.mkdtemp())
    size = MODELS[args.model][2]
    data = tmp / "digits"
    subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", str(data), "--size", str(size),
                    *(["--format", "jpg"] if size > 32 else []), "--shard-size", "100", "--no-progress"],
                   check=True, cwd=ROOT)
    shards = sorted(p.name for p in (data).glob("train-*.tar"))
    pattern = f"{data}/train-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"
    runs = tmp / "runs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", "29533",
           __file__, "--worker", str(runs), "--shards", pattern, "--model", args.model, "--steps", str(args.steps),
           "--precision", args.precision]
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    row, ok = report(torch.load(runs / "figures.pt"), args.tol)
    row.update({"model": args.model, "precision": args.precision, "steps": args.steps, "tol": args.tol, "ok": ok})
    print(json.dumps(row, indent=1))
    if args.results:
        earlier = json.loads(args.results.read_text()) if args.results.is_file() else []
        args.results.write_text(json.dumps([*earlier, row], indent=1) + "\n")
    print("fsdp_check:", "PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
