"""A 2-process run through the real command line (``accelerate launch ... -m mmcl train``) that is
killed after a checkpoint and resumed with ``--resume latest`` ends with the same weights as the
same run left alone (MoCo v2 on digits: BatchNorm encoder, key queue, momentum encoder, data
position of both processes, optimizer, RNG, shuffle-BN permutations)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
ACCELERATE = Path(sys.executable).with_name("accelerate")
STEPS, SAVE_EVERY = 24, 4


def command(digits_dir: Path, run: Path, *extra: str) -> list[str]:
    """``accelerate launch`` of ``mmcl train`` in 2 CPU processes on a tiny MoCo v2 digits recipe."""
    sets = [f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}",
            "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=64", f"train.steps={STEPS}",
            f"train.save_every={SAVE_EVERY}", "train.log_every=1", "train.progress=false", "optim.warmup_steps=1",
            "eval.knn_train_shards=null", "eval.knn_shards=[]", "model.backbone.width=8", "model.backbone.depth=3",
            "objective.queue_size=64"]
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", "-m", "mmcl",
            "train", "--config", str(ROOT / "configs" / "moco_v2_digits.yaml"),
            *[a for s in sets for a in ("--set", s)], *extra]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: int = 240) -> str:
    proc.wait(timeout=timeout)
    out = log.read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def records(run: Path) -> list[dict]:
    """The training records of metrics.jsonl, in order (a torn last line is ignored)."""
    path = run / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "loss" in record:
            out.append(record)
    return out


def logged(run: Path) -> dict[int, float]:
    """Loss by step (the last record of a step wins)."""
    return {r["step"]: r["loss"] for r in records(run)}


def checkpoints(run: Path) -> list[int]:
    """Steps of the ``RUN/checkpoints/step_*`` folders."""
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step_*") if p.is_dir())


def kill_after_checkpoint(proc: subprocess.Popen, run: Path, timeout: float = 240) -> list[int]:
    """SIGKILL the launcher and every process under it once a checkpoint exists and a later step
    was logged; returns the checkpoint steps at the moment of the kill."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no checkpoint followed by a logged step"
        saved = checkpoints(run)
        if saved and max(logged(run), default=0) > saved[0]:
            break
        time.sleep(0.01)
    launcher = psutil.Process(proc.pid)
    workers = launcher.children(recursive=True)  # torchrun starts them in sessions of their own
    for p in workers:
        p.kill()
    launcher.kill()
    proc.wait(timeout=60)
    psutil.wait_procs(workers, timeout=60)
    return saved


def test_killed_two_process_cli_run_resumes_to_the_uninterrupted_weights(digits_dir: Path, tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    finish(start(command(digits_dir, full), tmp_path / "full.log"), tmp_path / "full.log")
    reference = logged(full)
    assert sorted(reference) == list(range(1, STEPS + 1))

    proc = start(command(digits_dir, part), tmp_path / "killed.log")
    saved = kill_after_checkpoint(proc, part)
    assert not (part / "final").exists()
    latest = checkpoints(part)[-1]
    assert latest < STEPS and latest in saved + [s for s in range(SAVE_EVERY, STEPS, SAVE_EVERY)]

    finish(start(command(digits_dir, part, "--resume", "latest"), tmp_path / "resumed.log"), tmp_path / "resumed.log")
    # the log holds each step once: what the killed run logged after its checkpoint is dropped
    assert [r["step"] for r in records(part)] == list(range(1, STEPS + 1)), (latest, records(part))
    resumed = records(part)[latest:]  # what the resumed run logged: it went on from the checkpoint
    for r in resumed:
        assert r["loss"] == pytest.approx(reference[r["step"]], abs=1e-6), (r, latest, reference)
    a, b = (load_file(run / "final" / "model.safetensors") for run in (full, part))
    assert set(a) == set(b) and len(a) > 5
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a if a[k].numel())
    assert diff <= 1e-6, diff
    assert all(torch.equal(a[k], b[k]) for k in a), f"equal to {diff:.1e} but not bitwise"


def simclr_command(digits_dir: Path, run: Path, *extra: str) -> list[str]:
    """A tiny SimCLR digits recipe with fused AdamW, whose bad-step vote stays on the device."""
    sets = [f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}",
            "data.batch_size=16", "data.num_workers=1", "data.shuffle_buffer=64", "train.log_every=3",
            "train.progress=false", "eval.knn_train_shards=null", "eval.knn_shards=[]", "eval.linear=false",
            "model.backbone.width=8", "model.backbone.depth=3", "optim.fused=true", "train.vote=device"]
    return [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "0", "-m", "mmcl",
            "train", "--config", str(ROOT / "configs" / "simclr_digits.yaml"),
            *[a for s in sets for a in ("--set", s)], *extra]


@pytest.mark.parametrize("vote", ["host", "device"])
def test_sigterm_to_a_two_process_launch_saves_at_one_step_and_resume_goes_on(vote: str, digits_dir: Path,
                                                                              tmp_path: Path) -> None:
    """A scheduler's SIGTERM to ``accelerate launch``: torchrun's agent passes it to both processes
    (and their loader workers, which let it pass: before, they died first and the run stopped with a
    worker-death error and no checkpoint). Both processes agree on one step (in the step's vote with
    MoCo v2's SGD; at a logging step with SimCLR's fused AdamW, whose vote stays on the device),
    write its checkpoint together and say so; ``--resume latest`` goes on from there."""
    run = tmp_path / "run"
    make = command if vote == "host" else simclr_command
    proc = start(make(digits_dir, run, "--set", "train.steps=400", "--set", "train.save_every=0"),
                 tmp_path / "stopped.log")
    deadline = time.monotonic() + 240
    while len(records(run)) < 3:
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stopped.log").read_text()[-3000:]
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = (tmp_path / "stopped.log").read_text()
    [step] = checkpoints(run)
    assert out.count(f"stopped: SIGTERM at step {step} of 400: checkpoint") == 2, out[-3000:]
    assert "loader worker died" not in out
    files = {p.name for p in (run / "checkpoints" / f"step_{step:08d}").iterdir()}
    assert {"manifest.json", "process_0.safetensors", "process_1.safetensors"} <= files
    if vote == "device":
        assert step % 3 == 0  # the processes compared notes at a logging step
    finish(start(make(digits_dir, run, "--set", f"train.steps={step + 3}", "--resume", "latest"),
                 tmp_path / "resumed.log"), tmp_path / "resumed.log")
    assert [r["step"] for r in records(run)][-1] == step + 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs Accelerate sees every torchrun process")
def test_torchrun_without_accelerate_cpu_flag_is_a_clear_error(digits_dir: Path, tmp_path: Path) -> None:
    """Plain torchrun on a CPU machine: Accelerate sees 1 process, torch.distributed 2, and the
    processes would train unsynchronised; both stop with the fix named instead."""
    from mmcl.testing.spawn import free_port

    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "mmcl", "train",
           "--config", str(ROOT / "configs" / "clip_digits.yaml"),
           "--set", f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar",
           "--set", f"run.output_dir={tmp_path}", "--set", "eval.zeroshot_shards=null"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert proc.returncode != 0
    message = "error: the launcher started 2 processes but Accelerate sees 1: on CPU machines set ACCELERATE_USE_CPU=1"
    assert (proc.stdout + proc.stderr).count(message) == 2, proc.stderr[-3000:]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with GPUs the FSDP launch makes one process group")
def test_fsdp_launch_without_gpus_is_a_clear_error(digits_dir: Path, tmp_path: Path) -> None:
    """``accelerate launch --use_fsdp`` on a machine without GPUs: Accelerate's own error (a traceback
    from inside its FSDP plugin) becomes one line with the fix."""
    cmd = [str(ACCELERATE), "launch", "--use_fsdp", "--num_processes", "2", "--main_process_port", "0", "-m", "mmcl",
           "train", "--config", str(ROOT / "configs" / "clip_digits.yaml"),
           "--set", f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar",
           "--set", f"run.output_dir={tmp_path}", "--set", "eval.zeroshot_shards=null"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**env, "OMP_NUM_THREADS": "1"},
                          cwd=ROOT)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    message = "error: the launch asks for FSDP (accelerate launch --use_fsdp) and this machine has no GPU"
    assert message in out, proc.stderr[-3000:]  # (the launcher may stop the other process before it says it)
    assert "mmcl/train.py" not in out  # no traceback of ours
    assert not (tmp_path / "metrics.jsonl").exists()
