"""Elastic resume in one process: a checkpoint resumed with other loader workers or another batch
size goes on with exactly the samples of the epoch not yet trained (the 2 <-> 1 process cases are
in ``tests/dist/test_elastic.py``)."""

from __future__ import annotations

import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.recipe import load_recipe
from mmcl.testing.trace import record_trained
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
SHARDS = "train-{000000..000001}.tar"  # 2 shards, 512 samples: an epoch is 32 steps of 16


def recipe(digits_dir: Path, out: Path, *extra: str):
    return load_recipe(ROOT / "configs" / "simclr_digits.yaml", [
        f"data.train_shards={digits_dir}/{SHARDS}", f"run.output_dir={out}", "data.batch_size=16",
        "data.num_workers=2", "data.shuffle_buffer=64", "train.log_every=100", "train.progress=false",
        "optim.warmup_steps=1", "model.backbone.width=8", "model.backbone.depth=2", "eval.knn_train_shards=null",
        "eval.knn_shards=[]", "eval.linear=false", *extra])


def all_keys(digits_dir: Path) -> set[str]:
    keys = set()
    for shard in sorted(digits_dir.glob("train-00000[01].tar")):
        with tarfile.open(shard) as tar:
            keys |= {m.name.split(".")[0] for m in tar.getmembers()}
    return keys


def assert_each_sample_once(digits_dir: Path, epoch0: list[str], dropped: int) -> None:
    """The samples trained in epoch 0: none twice, all from the shards, and fewer than ``dropped``
    left out (the streams' last partial batches, as the uninterrupted run drops them)."""
    every = all_keys(digits_dir)
    assert max(Counter(epoch0).values()) == 1  # nothing twice
    assert set(epoch0) <= every
    assert len(every) - len(epoch0) < dropped


def run(digits_dir: Path, out: Path, steps: int, *extra: str, resume: str | None = None) -> tuple[Trainer, Any]:
    trainer = Trainer(recipe(digits_dir, out, f"train.steps={steps}", *extra))
    log = record_trained(trainer)
    trainer.fit(resume=resume)
    return trainer, log


@pytest.mark.parametrize("change", [["data.num_workers=0"], ["data.batch_size=24", "data.num_workers=1"],
                                    ["data.shuffle_buffer=32"], ["run.seed=5"], ["data.shuffle_initial=16"]])
def test_elastic_resume_trains_each_sample_of_the_epoch_once(digits_dir: Path, tmp_path: Path, change: list[str],
                                                             capsys) -> None:
    """Interrupted at step 10 of the first epoch (2 workers, batches of 16), resumed with no worker,
    with batches of 24 and 1 worker, or in another order of the samples (another shuffle buffer,
    seed, or a buffer starting early: what was trained is found by replaying the writer's order),
    to the end of the epoch: every sample of the epoch trained once, except at most a batch's worth
    per worker stream dropped at its end (as the uninterrupted run drops), and none twice."""
    out = tmp_path / "run"
    _, before = run(digits_dir, out, 10, "train.save_every=10")
    assert len(before) == 160 and {e for e, _ in before} == {0}
    trainer, after = run(digits_dir, out, 40, *change, "train.save_every=0", resume="latest")
    said = capsys.readouterr().out
    assert "elastic resume" in said and "without the 160 samples already trained" in said, said
    epoch0 = [k for _, k in before] + [k for e, k in after if e == 0]
    batch, workers = trainer.recipe.data.batch_size, trainer.loader.stream.num_workers
    assert_each_sample_once(digits_dir, epoch0, batch * workers)
    assert any(e == 1 for e, _ in after)  # and the next epoch began, reading everything again
    assert trainer.state.segments == [] and trainer.state.start_epoch == 0


def test_a_checkpoint_that_did_not_record_its_order_resumes_a_buffer_starting_early_elastically(
        digits_dir: Path, tmp_path: Path, capsys) -> None:
    """A checkpoint of an mmcl that recorded no ``data_order`` had no ``data.shuffle_initial``: a
    recipe that now sets it (``configs/clip_vit_b32.yaml`` does) resumes elastically, every sample
    of the epoch once; one whose setting changes nothing (at the buffer's size) resumes exactly."""
    import json

    from mmcl import checkpoint as ckpt

    out = tmp_path / "run"
    _, before = run(digits_dir, out, 10, "train.save_every=10")
    folder = out / "checkpoints" / "step_00000010"
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").unlink()
    ckpt.write_manifest(folder, {k: v for k, v in manifest.items()
                                 if k not in ("files", "format", "version", "data_order")})
    capsys.readouterr()
    _, same = run(digits_dir, tmp_path / "same", 11, "data.shuffle_initial=64", resume=str(folder))
    assert "elastic" not in capsys.readouterr().out and len(same) == 16
    _, after = run(digits_dir, out, 32, "data.shuffle_initial=16", "train.save_every=0", resume="latest")
    assert "another order of the samples (data.shuffle_initial was null, is 16)" in capsys.readouterr().out
    assert_each_sample_once(digits_dir, [k for _, k in before] + [k for e, k in after if e == 0], 16 * 2)


def test_a_second_elastic_resume_replays_each_earlier_run_in_its_own_order(digits_dir: Path, tmp_path: Path,
                                                                           capsys) -> None:
    """2 workers to step 10, no worker to step 20 (same seed), then seed 5 to the end of the epoch:
    the first run's samples are found by replaying its streams with its own seed, not the third's."""
    out = tmp_path / "run"
    _, first = run(digits_dir, out, 10, "train.save_every=10")
    _, second = run(digits_dir, out, 20, "data.num_workers=0", "train.save_every=10", resume="latest")
    _, third = run(digits_dir, out, 32, "data.num_workers=0", "run.seed=5", "train.save_every=0", resume="latest")
    assert "another order of the samples (run.seed was 0, is 5)" in capsys.readouterr().out
    assert_each_sample_once(digits_dir, [k for _, k in first + second] + [k for e, k in third if e == 0], 16 * 2)


def test_a_resampled_stream_resumes_another_order_at_its_positions(digits_dir: Path, tmp_path: Path,
                                                                   capsys) -> None:
    """Drawn with replacement, a stream has no "not yet trained": another seed resumes at the
    workers' positions as before, and the epoch keeps its length (32 steps of 16)."""
    out = tmp_path / "run"
    _, before = run(digits_dir, out, 10, "data.resample=true", "train.save_every=10")
    _, after = run(digits_dir, out, 40, "data.resample=true", "run.seed=5", "train.save_every=0", resume="latest")
    assert "elastic" not in capsys.readouterr().out
    assert len(before) + sum(e == 0 for e, _ in after) == 32 * 16


def test_elastic_resume_without_worker_positions_is_a_clear_error(digits_dir: Path, tmp_path: Path) -> None:
    """A checkpoint from before elastic resume (positions without the workers' counts) resumes on its
    own layout only, and says so."""
    import json

    from mmcl import checkpoint as ckpt

    out = tmp_path / "run"
    run(digits_dir, out, 2, "train.save_every=2")
    folder = out / "checkpoints" / "step_00000002"
    state = json.loads((folder / "state.json").read_text())
    state["positions"] = [p[:2] for p in state["positions"]]
    for key in ("segments", "start_epoch"):
        del state[key]
    (folder / "state.json").write_text(json.dumps(state))
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["workers"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "manifest.json").unlink()
    ckpt.write_manifest(folder, {k: v for k, v in manifest.items() if k not in ("files", "format", "version")})
    _, same = run(digits_dir, out, 3, resume="latest")  # the same layout resumes as before: it reads
    assert len(same) == 3 * 16  # its first 2 batches again (fast-forward), then trains on the third
    with pytest.raises(ckpt.CheckpointError, match="does not record where each loader worker stood"):
        run(digits_dir, tmp_path / "other", 3, "data.batch_size=8", resume=str(folder))


@pytest.mark.parametrize("stop", [7, 8])
def test_exact_resume_goes_on_without_reading_batches_again(digits_dir: Path, tmp_path: Path, stop: int) -> None:
    """On its own layout (2 workers), a run resumed at step 7 or 8 trains on the very samples, in the
    very order, of the uninterrupted run, and the trainer takes no batch twice: each worker reads past
    what it had given out without decoding it, and the workers take turns from the one after the last
    to make a batch (after step 7 that is worker 1, not the DataLoader's first)."""
    _, whole = run(digits_dir, tmp_path / "whole", 20, "train.save_every=0")
    out = tmp_path / "run"
    run(digits_dir, out, stop, f"train.save_every={stop}")
    trainer, rest = run(digits_dir, out, 20, "train.save_every=0", resume="latest")
    assert len(rest) == (20 - stop) * 16  # nothing read again through the trainer
    assert rest == whole[stop * 16:]
    assert trainer.loader.position().last == 19 % 2  # the workers' turns continued
