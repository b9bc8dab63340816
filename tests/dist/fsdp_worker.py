"""Run under ``torchrun --nproc_per_node 2`` with ``ACCELERATE_USE_CPU=1`` (gloo): the real
:class:`~mmcl.train.Trainer` on the digits CLIP recipe (the tiny open_clip ViT) with DDP and with
``train.fsdp``, every process reading its share of the same fixed global batches; rank 0 saves, per
case, the logged loss of every step, the final model's whole state (for FSDP, as read back from
``RUN/final`` by ``mmcl.hub.from_pretrained``) and the final folder.

Accelerate applies its FSDP plugin to GPU-type processes only (on CPU processes ``AcceleratorState``
keeps DDP), so :func:`shard_on_cpu` flips that one choice here; everything after it is the code a GPU
run takes: ``Accelerator.prepare``'s FSDP2 path (``fully_shard`` per transformer block, then the
root), its gradient clipping, torch's full state dicts, mmcl's checkpoints and ``final/``.

Cases (see ``CASES``): ``ddp``, ``fsdp`` (6 steps, checkpoints at steps 3 and 6), ``fsdp_resume``
(the FSDP run resumed from its step-3 checkpoint), ``ddp_from_fsdp`` and ``fsdp_from_ddp`` (one
run's checkpoint resumed under the other: one checkpoint format), ``ddp_accum``, ``fsdp_accum`` (2
micro-batches per step), ``siglip_ddp``, ``siglip_fsdp``, and ``cpu_refused`` (``train.fsdp`` on CPU
processes without the flip: the error).

Usage: ``fsdp_worker.py OUT_FILE RUNS_DIR TRAIN_SHARDS CASE [CASE ...]``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType
from trainer_worker import ROOT, Case, FixedStream, global_batches, share  # the sibling worker's batches

from mmcl.dist import world
from mmcl.errors import MmclError
from mmcl.hub import from_pretrained
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

STEPS = 6
CASES = {  # name: (recipe, train.fsdp, optim.grad_accum, the case whose step-3 checkpoint it resumes)
    "ddp": ("clip", False, 1, None), "fsdp": ("clip", True, 1, None),
    "fsdp_resume": ("clip", True, 1, "fsdp"), "ddp_from_fsdp": ("clip", False, 1, "fsdp"),
    "fsdp_from_ddp": ("clip", True, 1, "ddp"),
    "ddp_accum": ("clip", False, 2, None), "fsdp_accum": ("clip", True, 2, None),
    # SigLIP: a learned bias beside the temperature (both 0-dim), texts all-gathered
    "siglip_ddp": ("siglip", False, 1, None), "siglip_fsdp": ("siglip", True, 1, None),
}
_flip = {"on": True}


class Stream(FixedStream):
    """The fixed global batches; ``Trainer.fit`` closes its loader when it ends."""

    def close(self) -> None:
        pass


def shard_on_cpu() -> None:
    """Make Accelerate apply a given FSDP plugin on CPU processes. ``AcceleratorState`` picks FSDP only
    for GPU-type backends, and copies the process state's choice (``MULTI_CPU``) back each time one is
    made: the wrapper puts FSDP back whenever a plugin was given."""
    init = AcceleratorState.__init__

    def patched(self: AcceleratorState, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if not _flip["on"]:
            return
        if fsdp_plugin is not None and self.__dict__.get("fsdp_plugin") is None:
            self.fsdp_plugin = fsdp_plugin
        if self.__dict__.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def fresh_accelerator_state() -> None:
    """Each case's Accelerator starts from scratch (its plugin, if any, is taken): the process group
    stays, Accelerate's singleton and the variable it sets for a plugin go."""
    AcceleratorState._reset_state()
    os.environ.pop("ACCELERATE_USE_FSDP", None)


def recipe_for(out: Path, shards: str, fsdp: bool, accum: int, batch: int, config: str = "clip") -> Any:
    return load_recipe(ROOT / "configs" / f"{config}_digits.yaml", [
        f"data.train_shards={shards}", f"run.output_dir={out}", f"data.batch_size={batch}", "data.num_workers=0",
        f"optim.grad_accum={accum}", f"train.steps={STEPS}", "train.log_every=1", "train.save_every=3",
        "train.progress=false", "optim.warmup_steps=1", "eval.zeroshot_shards=null", f"train.fsdp={fsdp}"])


def losses_of(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def run_case(name: str, runs: Path, shards: str) -> dict[str, Any]:
    """Train one case on this process's rows of fixed global batches of 8; on rank 0 the losses, the
    final state and folder."""
    rank, n_proc = world()
    config, fsdp, accum, resume = CASES[name]
    out = runs / name
    if resume and rank == 0:
        shutil.copytree(runs / resume / "checkpoints" / "step_00000003", out / "checkpoints" / "step_00000003")
    torch.distributed.barrier()
    fresh_accelerator_state()
    recipe = recipe_for(out, shards, fsdp, accum, 8 // n_proc, config)
    trainer = Trainer(recipe)
    micro = global_batches(recipe, Case("clip", global_batch=8), STEPS * accum, seed=4,
                           tokenizer=trainer.unwrapped.tokenizer())
    trainer.loader = Stream([share(b, rank, n_proc) for b in micro])
    final = trainer.fit(resume="latest" if resume else None)
    if rank:
        return {}
    state = from_pretrained(final).state_dict() if fsdp else trainer.unwrapped.state_dict()
    return {"losses": losses_of(out), "model": {k: v.detach().cpu().clone() for k, v in state.items()},
            "final": str(final), "params": type(next(trainer.model.parameters())).__name__}


def refused_on_cpu(runs: Path, shards: str) -> dict[str, Any]:
    """``train.fsdp`` on CPU processes as Accelerate runs them (no flip): the error every process raises."""
    _flip["on"] = False
    fresh_accelerator_state()
    try:
        Trainer(recipe_for(runs / "cpu_refused", shards, True, 1, 4))
    except MmclError as e:
        return {"error": str(e)}
    finally:
        _flip["on"] = True
    return {"error": None}


def main(out_path: str, runs: str, shards: str, *names: str) -> None:
    # one process group for every case (Trainer.fit leaves it for what comes next)
    PartialState(cpu=True)
    shard_on_cpu()
    results = {}
    for name in names:
        if name == "cpu_refused":
            results[name] = refused_on_cpu(Path(runs), shards)
        else:
            results[name] = run_case(name, Path(runs), shards)
    if world()[0] == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
