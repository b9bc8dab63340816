"""Checkpoints a run can trust: nothing in a checkpoint folder can run code, a save is whole or
absent, damage and layout changes are clear errors, and a failed write stops the run cleanly."""

from __future__ import annotations

import json
import pickle
import re
import resource
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_clip import losses, recipe

from mmcl import checkpoint as ckpt
from mmcl.cli import main as mmcl_main
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


class Plant:
    """Unpickling this writes a marker file: proof that a loader executed code from a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from a checkpoint ran"))


@pytest.fixture(scope="module")
def full_run(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six uninterrupted steps with checkpoints at steps 2, 4 and 6 (all kept)."""
    out = tmp_path_factory.mktemp("ckpt") / "full"
    Trainer(recipe(digits_dir, out, "train.save_every=2", "train.keep_checkpoints=3",
                   "eval.zeroshot_shards=null")).fit()
    return out


def interrupted_copy(full: Path, dest: Path, step: int) -> Path:
    """A run folder as a run killed after checkpoint ``step`` leaves it."""
    shutil.copytree(full / "checkpoints" / f"step_{step:08d}", dest / "checkpoints" / f"step_{step:08d}")
    return dest


def resume(digits_dir: Path, run: Path, *extra: str, how: str = "latest") -> dict[int, float]:
    Trainer(recipe(digits_dir, run, "train.save_every=2", "eval.zeroshot_shards=null", *extra)).fit(resume=how)
    return losses(run)


def test_checkpoint_holds_only_safetensors_and_json(full_run: Path) -> None:
    folder = full_run / "checkpoints" / "step_00000004"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["manifest.json", "model.safetensors", "objective.safetensors", "optimizer.safetensors",
                     "process_0.safetensors", "scheduler.safetensors", "state.json"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["step"] == 4 and manifest["processes"] == 1 and set(manifest["files"]) == set(names) - {
        "manifest.json"}
    # the optimizer state comes back exactly (tensors, tuples, integer keys)
    state = ckpt.read_state(folder / "optimizer.safetensors")
    assert isinstance(state["param_groups"][0]["betas"], tuple) and all(isinstance(k, int) for k in state["state"])
    assert not list(full_run.glob("checkpoints/.*"))  # no partial folder is left behind


def test_state_round_trip_keeps_types(tmp_path: Path) -> None:
    state = {"t": torch.arange(6.0).view(2, 3), "tied": None, 3: (1, [2.5, None], "x"),
             "np": np.arange(4, dtype=np.uint32), "rng": ckpt.rng_state(torch.device("cpu"))}
    state["tied"] = state["t"]  # two names for one storage, as tied weights
    ckpt.write_state(state, tmp_path / "s.safetensors")
    back = ckpt.read_state(tmp_path / "s.safetensors")
    assert torch.equal(back["t"], state["t"]) and torch.equal(back["tied"], state["t"])
    assert back[3] == (1, [2.5, None], "x")
    assert back["np"].dtype == np.uint32 and back["np"].tolist() == [0, 1, 2, 3]
    assert back["rng"]["python"] == state["rng"]["python"]


def test_resume_never_runs_code_planted_in_a_checkpoint(full_run: Path, digits_dir: Path, tmp_path: Path,
                                                       capsys) -> None:
    run = interrupted_copy(full_run, tmp_path / "run", 4)
    folder = run / "checkpoints" / "step_00000004"
    marker = tmp_path / "pwned"
    # what Accelerate's load_state would unpickle, and a pickled "optimizer" beside the real one
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "pytorch_model.bin"):
        (folder / name).write_bytes(pickle.dumps(Plant(marker)))
    resumed = resume(digits_dir, run)
    assert not marker.exists()
    assert sorted(resumed) == [5, 6]
    assert "ignoring files in" in capsys.readouterr().out
    # a state file replaced by a pickle is refused by its hash, before anything reads it
    (folder / "optimizer.safetensors").write_bytes(pickle.dumps(Plant(marker)))
    with pytest.raises(ckpt.CheckpointError, match="damaged or was altered: optimizer.safetensors"):
        resume(digits_dir, run, how=str(folder))
    assert not marker.exists()


def test_latest_passes_over_a_save_cut_short(full_run: Path, digits_dir: Path, tmp_path: Path) -> None:
    reference = losses(full_run)
    run = interrupted_copy(full_run, tmp_path / "run", 2)
    # killed while writing step 4: under the temporary name, or (an older layout) in place with no manifest
    shutil.copytree(full_run / "checkpoints" / "step_00000004", run / "checkpoints" / ".step_00000004.partial")
    cut = shutil.copytree(full_run / "checkpoints" / "step_00000004", run / "checkpoints" / "step_00000004")
    (cut / "manifest.json").unlink()
    (cut / "optimizer.safetensors").write_bytes(b"")
    resumed = resume(digits_dir, run)
    assert sorted(resumed) == [3, 4, 5, 6]
    for step in (3, 4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6)
    # the new checkpoints replaced the damaged folder and the partial one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]


@pytest.mark.parametrize("damage, message", [
    ("missing_rng", "incomplete: process_0.safetensors is missing"),
    ("flipped_byte", "damaged or was altered: model.safetensors"),
    ("no_manifest", "not a complete mmcl checkpoint"),
])
def test_damaged_or_mismatched_checkpoint_is_a_clear_error(damage: str, message: str, full_run: Path,
                                                           digits_dir: Path, tmp_path: Path, capsys) -> None:
    run = interrupted_copy(full_run, tmp_path / "run", 4)
    folder = run / "checkpoints" / "step_00000004"
    if damage == "missing_rng":
        (folder / "process_0.safetensors").unlink()
    elif damage == "flipped_byte":
        data = bytearray((folder / "model.safetensors").read_bytes())
        data[-1] ^= 1
        (folder / "model.safetensors").write_bytes(bytes(data))
    elif damage == "no_manifest":
        (folder / "manifest.json").unlink()
    code = mmcl_main(["train", "--config", str(ROOT / "configs" / "clip_digits.yaml"),
                      "--set", f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar",
                      "--set", f"run.output_dir={run}", "--set", "train.steps=6", "--set", "train.progress=false",
                      "--set", "data.batch_size=32", "--resume", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_failed_write_is_a_clear_error_and_leaves_no_folder(digits_dir: Path, tmp_path: Path) -> None:
    """A write that fails half way (here: files capped at 64 KiB, as a disk filling up) stops the run
    with the folder and size named, and leaves neither a checkpoint nor a partial folder behind."""
    trainer = Trainer(recipe(digits_dir, tmp_path / "run", "train.steps=2", "train.save_every=1",
                             "eval.zeroshot_shards=null", "data.num_workers=0"))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
    try:
        with pytest.raises(ckpt.CheckpointError, match=r"could not write checkpoint .*step_00000001.*needs about"):
            trainer.fit()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_not_enough_space_is_refused_before_writing(digits_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ckpt, "free_bytes", lambda folder: 1000)
    trainer = Trainer(recipe(digits_dir, tmp_path / "run", "train.steps=1", "eval.zeroshot_shards=null",
                             "data.num_workers=0"))
    with pytest.raises(ckpt.CheckpointError, match=r"not enough disk space for checkpoint .*step_00000001: it needs "
                                                    r"about [0-9.]+ MiB and 0.0 MiB are free"):
        trainer.fit()
    assert list((tmp_path / "run" / "checkpoints").iterdir()) == []


def test_a_fresh_run_in_a_used_folder_sets_the_earlier_run_aside(full_run: Path, digits_dir: Path,
                                                                 tmp_path: Path) -> None:
    """Before, a run started afresh where a 6-step run had finished kept that run's step-6 checkpoint
    beside its own: pruning deleted its own step 1 first, ``--resume latest`` then took the other run's
    step 6, and the log held both runs' steps. Now the earlier run's files move to ``earlier_runs/<time>/``
    and the folder holds this run alone; resuming it continues this run."""
    run = tmp_path / "run"
    shutil.copytree(full_run, run)
    Trainer(recipe(digits_dir, run, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=2",
                   "eval.zeroshot_shards=null")).fit()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    assert sorted(losses(run)) == [1, 2, 3]
    [earlier] = (run / "earlier_runs").iterdir()
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == sorted(
        p.name for p in (full_run / "checkpoints").iterdir())
    assert losses(earlier) == losses(full_run) and (earlier / "final" / "mmcl_config.json").is_file()
    assert (earlier / "recipe.yaml").read_text() == (full_run / "recipe.yaml").read_text()
    resumed = resume(digits_dir, run, "train.steps=4")
    assert sorted(resumed) == [1, 2, 3, 4]  # continued from this run's step 3, not the earlier run's step 6


@pytest.mark.parametrize("how", ["named_earlier_runs", "run_name_with_a_slash", "resume_finds_no_checkpoint",
                                 "a_folder_of_other_files"])
def test_setting_an_earlier_run_aside_takes_only_what_a_run_wrote(how: str, digits_dir: Path, tmp_path: Path) -> None:
    """A run folder named ``earlier_runs`` (TensorBoard's folder then is too), a ``run.name`` that is a
    path, and ``--resume latest`` with no checkpoint to resume (a run killed before its first save) all
    set the earlier run aside; a folder no run wrote (no ``recipe.yaml``) keeps its files."""
    run = tmp_path / ("earlier_runs" if how == "named_earlier_runs" else "run")
    extra = ["train.steps=1", "eval.zeroshot_shards=null", "data.num_workers=0", "train.trackers=[tensorboard]"]
    extra += ["run.name=exp/seed0"] if how == "run_name_with_a_slash" else []
    if how == "a_folder_of_other_files":
        run.mkdir()
        (run / "notes.txt").write_text("mine")
    else:
        Trainer(recipe(digits_dir, run, *extra)).fit()
        if how == "resume_finds_no_checkpoint":
            shutil.rmtree(run / "checkpoints")
    Trainer(recipe(digits_dir, run, *extra)).fit(resume="latest" if how == "resume_finds_no_checkpoint" else None)
    assert sorted(losses(run)) == [1]
    aside = run / "earlier_runs"
    # the set-aside runs, not TensorBoard's own folders (named by a Unix time) when its folder is this one
    earlier = [p for p in aside.iterdir() if re.fullmatch(r"\d{8}T\d{6}Z", p.name)] if aside.is_dir() else []
    if how == "a_folder_of_other_files":
        assert not earlier and (run / "notes.txt").read_text() == "mine"
        return
    assert len(earlier) == 1 and sorted(losses(earlier[0])) == [1] and (earlier[0] / "recipe.yaml").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001"]


def test_a_resume_keeps_its_learning_rates_and_says_so_when_the_recipe_changed_them(
        full_run: Path, digits_dir: Path, tmp_path: Path, capsys) -> None:
    """The schedule's base rates come back with the checkpoint (the losses go on as the uninterrupted
    run's), and a recipe asking for others is told that only a fresh run takes them."""
    run = interrupted_copy(full_run, tmp_path / "run", 4)
    after = resume(digits_dir, run, "optim.lr=0.01", "optim.exempt_lr_scale=0.5")
    reference = losses(full_run)
    assert all(abs(after[s] - reference[s]) < 1e-5 for s in (5, 6))
    out = capsys.readouterr().out
    assert "the run goes on at the learning rates it was started with" in out and "[0.01, 0.005]" in out


def test_a_resume_that_switches_resampling_is_refused(full_run: Path, digits_dir: Path, tmp_path: Path) -> None:
    """The checkpoint records what orders the samples: another seed or shuffle buffer resumes
    elastically (``tests/test_elastic_resume.py``), but a stream switched to drawing shards with
    replacement has no replay of what was trained: a clear error, not repeated or missed samples."""
    run = interrupted_copy(full_run, tmp_path / "run", 4)
    with pytest.raises(ckpt.CheckpointError, match=r"written with data.resample: false and this run has true: what "
                                                   r"it trained of the epoch cannot be told apart"):
        resume(digits_dir, run, "data.resample=true")


def test_sigterm_writes_a_checkpoint_and_stops_then_resume_continues(digits_dir: Path, tmp_path: Path) -> None:
    """What Slurm and Kubernetes send before preemption or at a time limit: before, the run died
    mid-step and lost everything since its last checkpoint (here: all of it, save_every 0). Now it
    finishes the step, writes a checkpoint, says where, exits 143, and ``--resume latest`` goes on
    from that step. A second SIGTERM right after the first changes nothing."""
    import subprocess
    import sys
    import time

    run = tmp_path / "run"
    sets = [f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}",
            "data.batch_size=32", "data.num_workers=1", "train.log_every=1", "train.save_every=0",
            "train.progress=false", "eval.zeroshot_shards=null"]
    cmd = [sys.executable, "-m", "mmcl", "train", "--config", str(ROOT / "configs" / "clip_digits.yaml")]
    proc = subprocess.Popen([*cmd, *[a for s in [*sets, "train.steps=1000"] for a in ("--set", s)]],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.jsonl").is_file() or len(losses(run)) < 3:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)  # under Slurm, one from Slurm and one from torchrun's agent
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    step = max(losses(run))
    assert f"stopped: SIGTERM at step {step} of 1,000: checkpoint" in err and "--resume latest" in err
    assert ckpt.is_complete(run / "checkpoints" / f"step_{step:08d}")
    done = subprocess.run([*cmd, *[a for s in [*sets, f"train.steps={step + 2}"] for a in ("--set", s)],
                           "--resume", "latest"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step:08d}'} at step {step}" in done.stdout
    assert sorted(losses(run)) == list(range(1, step + 3))


def test_loader_workers_outlive_sigterm_and_the_programs_they_start_do_not(tmp_path: Path) -> None:
    """A loader worker lets SIGTERM pass (the main process stops it after its checkpoint), but a
    program it starts (a ``pipe:`` shard command) ends on SIGTERM as usual: a handler, not
    ``SIG_IGN``, which would carry over to it."""
    import subprocess
    import sys

    script = """
import os, signal, subprocess, time
from mmcl.data.loader import _ignore_sigterm
_ignore_sigterm(0)
os.kill(os.getpid(), signal.SIGTERM)  # this process goes on
child = subprocess.Popen(["sleep", "30"])
time.sleep(0.2)
child.terminate()
print(child.wait(timeout=10))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.split()[-1] == "-15", done.stderr[-2000:]
