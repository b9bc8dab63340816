"""Two "machines" of one process each on 127.0.0.1 (``accelerate launch --num_machines 2
--machine_rank 0|1``, gloo) train as one machine of two processes: the same losses at every step,
the same weights, and each process reading the shards of its global rank (issue 22, item 1).

The real command line and the real shard loader (SimCLR on digits, 2 loader workers per process):
a rank computed per machine instead of globally would make both machines read the same shards, and
the losses would differ from the one-machine run's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from mmcl.testing.spawn import free_port

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS = 4


def command(digits_dir: Path, run: Path, port: int, machine: int | None) -> list[str]:
    """``accelerate launch`` of ``mmcl train``: 2 processes on one machine (``machine`` None), or
    machine ``machine`` of 2 with one process each."""
    sets = [f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}",
            "data.batch_size=16", "data.num_workers=2", "data.shuffle_buffer=64", f"train.steps={STEPS}",
            f"train.save_every={STEPS}", "train.log_every=1", "train.progress=false", "optim.warmup_steps=1",
            "eval.knn_train_shards=null", "eval.knn_shards=[]", "model.backbone.width=8", "model.backbone.depth=2"]
    machines = [] if machine is None else ["--num_machines", "2", "--machine_rank", str(machine)]
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", *machines,
            "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "-m", "mmcl", "train",
            "--config", str(ROOT / "configs" / "simclr_digits.yaml"), *[a for s in sets for a in ("--set", s)]]


def run_all(commands: list[list[str]], logs: list[Path]) -> None:
    """Start the commands together (the machines of one job) and wait for all; fail with the logs."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    procs = []
    for cmd, log in zip(commands, logs):
        with open(log, "w") as f:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        pytest.fail("\n".join(f"--- {log.name} (exit {c}) ---\n{log.read_text()[-3000:]}"
                              for log, c in zip(logs, codes)))


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_machines_of_one_process_train_as_one_machine_of_two(digits_dir: Path, tmp_path: Path) -> None:
    one = tmp_path / "one_machine"
    run_all([command(digits_dir, one, free_port(), None)], [tmp_path / "one.log"])
    two, port = tmp_path / "two_machines", free_port()
    run_all([command(digits_dir, two, port, m) for m in (0, 1)], [tmp_path / f"machine{m}.log" for m in (0, 1)])

    expected, got = losses(one), losses(two)
    assert list(got) == list(range(1, STEPS + 1)) and got == pytest.approx(expected, abs=1e-5)
    a, b = load_file(str(one / "final" / "model.safetensors")), load_file(str(two / "final" / "model.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    # both processes read and recorded their own data position (global ranks 0 and 1)
    state = json.loads((two / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text())
    assert len(state["positions"]) == 2
