"""``train.compile: true`` (torch.compile through Accelerate) trains, and compiles once: values that
change every step (a momentum or a teacher temperature on a schedule, the step itself) must not be
read inside the compiled graph, where each new value would be a constant and force a recompilation
(after 8 of them torch gives up and runs the objective uncompiled)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("config, extra", [
    ("dino_digits.yaml", ["model.backbone.width=8", "objective.warmup_teacher_steps=10"]),
    ("clip_digits.yaml", ["eval.zeroshot_shards=null"]),
])
def test_a_compiled_run_does_not_recompile_every_step(digits_dir: Path, tmp_path: Path, config: str,
                                                      extra: list[str]) -> None:
    trainer = Trainer(load_recipe(ROOT / "configs" / config, [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={tmp_path}",
        "data.batch_size=16", "data.num_workers=0", "train.steps=100", "train.progress=false", "train.compile=true",
        "optim.warmup_steps=2", "eval.knn_train_shards=null", "eval.knn_shards=[]", "eval.linear=false", *extra]))
    # compiled in place: the state dict keeps its keys (checkpoints resume with or without compile)
    assert trainer.unwrapped._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in trainer.unwrapped.state_dict())
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    step = lambda: trainer.train_step(trainer.loader.prepare(next(batches), trainer.acc.device))  # noqa: E731
    try:
        for _ in range(3):  # the first compilations, and the one that makes a changing integer dynamic
            step()
        torch._dynamo.config.error_on_recompile = True
        losses = [step() for _ in range(3)]
    finally:
        torch._dynamo.config.error_on_recompile = False
        trainer.loader.close()
        torch._dynamo.reset()
    assert losses == [True] * 3
