"""Run under ``torchrun --nproc_per_node N`` (gloo; ``ACCELERATE_USE_CPU=1``): SimCLR on digits
shards, 2 loader workers per process, trained to ``STEPS`` optimizer steps with a checkpoint every
``SAVE_EVERY``, from scratch or resumed from the checkpoint folder ``FROM`` (written with any number
of processes); each process writes to ``OUT_FILE.RANK`` the ``(epoch, key)`` of every sample it
trained on and what it printed.

Usage: ``elastic_worker.py OUT_FILE RUN_DIR TRAIN_SHARDS STEPS SAVE_EVERY [FROM]``.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.recipe import load_recipe
from mmcl.testing.trace import record_trained
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[2]


def main(out_file: str, run_dir: str, shards: str, steps: str, save_every: str, resume: str | None = None) -> None:
    recipe = load_recipe(ROOT / "configs" / "simclr_digits.yaml", [
        f"data.train_shards={shards}", f"run.output_dir={run_dir}", "data.batch_size=8", "data.num_workers=2",
        "data.shuffle_buffer=32", f"train.steps={steps}", f"train.save_every={save_every}",
        "train.keep_checkpoints=100", "train.log_every=100",
        "train.progress=false", "optim.warmup_steps=1", "model.backbone.width=8", "model.backbone.depth=2",
        "eval.knn_train_shards=null", "eval.knn_shards=[]", "eval.linear=false"])
    trainer = Trainer(recipe)
    log = record_trained(trainer)
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        trainer.fit(resume=resume)
    Path(f"{out_file}.{trainer.acc.process_index}").write_text(json.dumps({"keys": log, "printed": said.getvalue()}))


if __name__ == "__main__":
    main(*sys.argv[1:])
