"""Run under ``torchrun --nproc_per_node 1`` and ``2`` (gloo; ``ACCELERATE_USE_CPU=1`` on CPU):
the real :class:`~mmcl.train.Trainer` on digits recipes for several optimizer steps, every process
reading its share of the same fixed stream of global batches; rank 0 saves, per case, the logged
loss of every step, the model's and the objective's whole state at the end (momentum targets,
queues, centres, banks, prototypes) and snapshots of the objective taken before every forward.

With ``grad_accum`` a case's 2-process run takes ``accum`` micro-batches per optimizer step, and
its 1-process run either the same micro-step global batches (``merge: false``) or their
concatenation in one step without accumulation (``merge: true``).

Encoders and heads use GroupNorm / no norm, so per-process BatchNorm statistics cannot make the
runs differ; the BatchNorm cases are ``moco_sync_bn`` (SyncBN, needs GPUs: on CPU its error is
recorded), ``shuffle_bn`` (MoCo's shuffle-BN key encoder, 2 processes) and ``resume_plain`` /
``resume_shuffle_bn`` (a run resumed from a checkpoint, on the real digits loader).

Usage: ``trainer_worker.py OUT_FILE RUNS_DIR TRAIN_SHARDS CASE [CASE ...]``.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from torch._dynamo.utils import counters

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.config import from_dict
from mmcl.dist import world
from mmcl.objectives import bank as bank_module
from mmcl.recipe import Recipe, load_recipe
from mmcl.registry import build
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
GN = ["model.backbone.norm=gn", "model.backbone.width=8", "model.backbone.depth=2"]
SGD = ["optim.name=sgd", "optim.lr=1.0", "optim.momentum=0.9"]
DIGITS = "zero one two three four five six seven eight nine".split()


@dataclass
class Case:
    """A digits recipe made tiny, run for ``steps`` optimizer steps on batches of ``global_batch``
    rows per micro-step (over all processes)."""

    config: str
    overrides: list[str] = field(default_factory=list)
    steps: int = 4
    global_batch: int = 8
    accum: int = 1
    merge: bool = False
    data_of: str | None = None  # train on the batches of this other case (default: its own)


CASES = {
    # momentum teacher on a cosine schedule, trained predictor (DDP-wrapped objective)
    "byol": Case("byol", [*GN, "model.projector={dims: [32, 16], norm: none}",
                          "objective.predictor={dims: [32, 16], norm: none}", "objective.momentum=0.8"]),
    # queue of 12 keys filled by global batches of 8: the writes wrap around from step 2 on
    "moco": Case("moco_v2", [*GN, "model.projector={dims: [32, 16], norm: none}", "objective.queue_size=12",
                             "objective.momentum=0.8", "objective.shuffle_bn=true"]),
    # centre and teacher over 2 global + 2 local 16 px crops
    "dino": Case("dino", [*GN, "model.projector={dims: [32, 16], norm: none, activation: gelu}",
                          "objective.out_dim=12", "objective.momentum=0.8", "objective.freeze_last_layer_steps=1"]),
    # prototypes frozen for 2 of 4 steps
    "swav": Case("swav", [*GN, "model.projector={dims: [32, 16], norm: none}", "objective.prototypes=10",
                          "objective.freeze_prototypes_steps=2", "objective.queue_length=0"]),
    # a queue of one local batch of past projections per process ({batch} rows), used from step 2
    "swav_queue": Case("swav", [*GN, "model.projector={dims: [32, 16], norm: none}", "objective.prototypes=10",
                                "objective.freeze_prototypes_steps=0", "objective.queue_length={batch}",
                                "objective.queue_start_step=0"], steps=3),
    # memory bank with NCE (normaliser averaged over processes), ids repeat across steps
    "instdisc": Case("instdisc", [*GN, "model.projector={dims: [16], norm: none}", "objective.bank_size=40",
                                  "objective.negatives=6", "objective.loss=nce"]),
    "cmc_bank": Case("cmc", [*GN, "model.projector={dims: [32, 16], norm: none}", "objective.negatives=bank",
                             "objective.bank_size=40", "objective.bank_negatives=6"]),
    # accumulation under DDP: 2 processes x 2 micro-batches of 4 against 1 process x 2 micro-batches
    # of 8 (in-batch negatives gathered across processes per micro-step) ...
    "simclr_accum": Case("simclr", [*GN, "model.projector={dims: [32, 16], norm: none}"], steps=3, accum=2),
    # ... and against 1 process on the whole 16-row step batch without accumulation (no negatives)
    "byol_accum": Case("byol", [*GN, "model.projector={dims: [32, 16], norm: none}",
                                "objective.predictor={dims: [32, 16], norm: none}", "objective.momentum=0.8"],
                       steps=3, accum=2, merge=True),
    # gradient caching in chunks of 3 (2 processes: 3 + 1 rows each; 1 process: 3 + 3 + 2), with its
    # gathers and DDP's single all-reduce after the last chunk; equal to "clip" and "simclr_accum"
    "clip_grad_cache": Case("clip", ["eval.zeroshot_shards=null", "train.grad_cache=3"], data_of="clip"),
    # ... and with the loss in 3 x 3 blocks (mmcl.objectives.tiled) over the gathered features
    "siglip_grad_cache": Case("siglip", ["eval.zeroshot_shards=null", "train.grad_cache=3",
                                         "objective.exchange=ring", "objective.tile=3"], data_of="siglip"),
    "clip_tiled": Case("clip", ["eval.zeroshot_shards=null", "train.grad_cache=3", "objective.tile=3"],
                       data_of="clip"),
    "simclr_accum_grad_cache": Case("simclr", [*GN, "model.projector={dims: [32, 16], norm: none}",
                                               "train.grad_cache=3"], steps=3, accum=2, data_of="simclr_accum"),
    # BatchNorm encoder with SyncBN and shuffle-BN: 2 processes on half batches = 1 process on all
    "moco_sync_bn": Case("moco_v2", ["model.backbone.norm=bn", "model.backbone.width=8", "model.backbone.depth=2",
                                     "model.projector={dims: [32, 16], norm: bn}", "objective.queue_size=12",
                                     "objective.momentum=0.8", "objective.shuffle_bn=true", "train.sync_bn=true"]),
}
# objectives whose negatives (or targets) are the other rows of the global batch, gathered with
# gradient across processes (no state but the model's, and the momentum teacher of MoCo v3)
CASES.update({
    # the open_clip tiny ViT and text transformer (LayerNorm), learned logit_scale, grad_clip 1.0
    "clip": Case("clip", ["eval.zeroshot_shards=null"]),
    # SLIP: CLIP + SimCLR (combined) on the views through the CLIP image tower's view head. SGD: under
    # AdamW float32 noise on near-zero gradients grew to 1.1e-5 in 4 steps (losses equal to 5e-7)
    "slip": Case("slip", ["eval.zeroshot_shards=null", "model.view_projector={dims: [32, 16], norm: none}",
                         "optim.name=sgd", "optim.lr=0.5", "optim.momentum=0.9"]),
    # SigLIP: learned scale and bias; texts all-gathered, or passed around the ring of processes in
    # chunks of 3 (on the same batches: the two must train alike)
    "siglip": Case("siglip", ["eval.zeroshot_shards=null"]),
    "siglip_ring": Case("siglip", ["eval.zeroshot_shards=null", "objective.exchange=ring", "objective.tile=3"],
                        data_of="siglip"),
    "simclr": Case("simclr", [*GN, "model.projector={dims: [32, 16], norm: none}"]),
    "invaspread": Case("invaspread", [*GN, "model.projector={dims: [16], norm: none}"]),
    # DCL, DCLW, NNCLR with plain SGD: at these tiny encoders' start every embedding is nearly the same
    # (cosine 0.9996), AdamW's normalisation turns the float32 noise of near-zero gradient entries
    # into steps, and the 1- and 2-process weights drift apart by 1e-5..5e-5 within 4 steps
    "dcl": Case("dcl", [*GN, "model.projector={dims: [32, 16], norm: none}", *SGD]),
    "dclw": Case("dcl", [*GN, "model.projector={dims: [32, 16], norm: none}", *SGD,
                         "objective={name: dclw, temperature: 0.2, sigma: 0.5}"]),
    # the neighbours' support set of 12 rows, filled by 8 gathered projections a step: wraps from step 2 on;
    # a larger step, as the first neighbours (random support rows) give small gradients
    "nnclr": Case("nnclr", [*GN, "model.projector={dims: [32, 16], norm: none}", "objective.queue_size=12",
                            "objective.predictor={dims: [32, 16], norm: none}", *SGD, "optim.lr=5.0"]),
    "mocov3": Case("moco_v3", [*GN, "model.projector={dims: [32, 16], norm: none}",
                               "objective.predictor={dims: [32, 16], norm: none}", "objective.momentum=0.8"]),
    "simsiam": Case("simsiam", [*GN, "model.projector={dims: [32, 16], norm: none}",
                                "objective.predictor={dims: [8, 16], norm: none}"]),
    # no negatives: the standardisation and cross-correlation (Barlow Twins), the variance and
    # covariance (VICReg) are statistics of the global batch. SGD: both losses ignore a shift of the
    # projections, so the last bias's true gradient is 0 and AdamW would step it by ±lr on float noise
    "barlow_twins": Case("barlow_twins", [*GN, "model.projector={dims: [32, 16], norm: none}", "optim.name=sgd",
                                          "optim.lr=0.01"]),
    "vicreg": Case("vicreg", [*GN, "model.projector={dims: [32, 16], norm: none}", "optim.name=sgd",
                              "optim.lr=0.1"]),
    # 6 x 6 grid of 12 px patches, 2 rows ahead (negatives: every target patch of the global batch)
    "cpc": Case("cpc", ["model.backbone.width=8", "model.context_dim=16", "model.context_layers=2",
                        "objective.steps=2"]),
    # two image fields, one encoder each (the recipe's core mode) ...
    "cmc": Case("cmc", [*GN, "model.projector={dims: [32, 16], norm: none}"]),
    # ... and three channel groups of one image, every pair of views (full graph)
    "cmc_full": Case("cmc", [*GN, "model.projector={dims: [32, 16], norm: none}", "model.channels=[[0], [1], [2]]",
                             "data.view_fields=[]", "data.views=1", "objective.mode=full"]),
})

# train.compile with a trained objective, which is compiled too (predictors, DINO's head, SwAV's
# prototypes; NNCLR's gather with gradient, DINO's and SwAV's all-reduces): each "<case>_compiled"
# over 6 steps against "<case>_eager" (the same recipe and batches, uncompiled)
# and CLIP with the gradient cache (chunks of 3 of 4 rows per process: the kept chunk's compiled backward outside
# DDP's synchronising pass, the other chunk's compiled passes under no_sync; no random draws, which inductor
# makes otherwise than eager)
COMPILED = ("byol", "simsiam", "mocov3", "nnclr", "dino", "swav", "clip_grad_cache")
for _name in COMPILED:
    _base = CASES[_name]
    CASES[f"{_name}_eager"] = replace(_base, steps=6, data_of=_base.data_of or _name)
    CASES[f"{_name}_compiled"] = replace(_base, steps=6, data_of=_base.data_of or _name,
                                         overrides=[*_base.overrides, "train.compile=true"])


class FixedStream:
    """Stands in for the trainer's loader: this process's rows of a fixed list of global batches
    (``(epoch, batch)`` as ``Loader.forever`` yields them)."""

    def __init__(self, batches: list[dict[str, Any]]):
        self.batches, self.skipped = batches, {}

    def forever(self, start_epoch: int = 0):  # noqa: ANN201
        for batch in self.batches:
            yield start_epoch, batch

    def close(self) -> None:
        """No workers to stop."""

    def prepare(self, batch: dict[str, Any], device: Any, memory_format: Any = None) -> dict[str, Any]:
        """The batches are float already (as with ``data.normalize: workers``): only moved."""
        from mmcl.data.loader import to_device

        return to_device(batch, device)


def global_batches(recipe: Recipe, case: Case, n: int, seed: int,
                   tokenizer: Callable[[list[str]], Any] | None = None) -> list[dict[str, Any]]:
    """``n`` global micro-batches shaped as the recipe's loader would shape them: its global views
    at ``image_size`` (one per view field), then its local crops; for image-text recipes one image
    and the tokenized caption of a random digit per row; unique ids below 40 per batch."""
    d, g = recipe.data, torch.Generator().manual_seed(seed)
    sizes = [d.image_size] * (len(d.view_fields) or d.views)
    if d.multi_crop:
        sizes += [d.multi_crop.local_size] * d.multi_crop.local_crops
    out = []
    for _ in range(n):
        ids = torch.randperm(40, generator=g)[: case.global_batch]
        batch: dict[str, Any] = {"id": ids, "key": [f"{int(i):06d}" for i in ids]}
        if d.kind == "image_text":
            digits = torch.randint(10, (case.global_batch,), generator=g).tolist()
            batch["image"] = torch.randn(case.global_batch, 3, d.image_size, d.image_size, generator=g)
            batch["text"] = tokenizer([f"a handwritten digit {DIGITS[i]}" for i in digits])
            if d.view_transforms:  # SLIP: augmented views of each image beside the pair
                batch["views"] = [torch.randn(case.global_batch, 3, d.image_size, d.image_size, generator=g)
                                  for _ in d.view_transforms]
        else:
            batch["views"] = [torch.randn(case.global_batch, 3, s, s, generator=g) for s in sizes]
        out.append(batch)
    return out


def share(batch: dict[str, Any], rank: int, n: int) -> dict[str, Any]:
    """Rows ``[rank * b, (rank + 1) * b)`` of a global batch split in ``n``."""
    b = len(batch["key"]) // n
    rows = slice(rank * b, (rank + 1) * b)
    return {k: [x[rows] for x in v] if k == "views" else v[rows] for k, v in batch.items()}


def concat(batches: list[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the rows of ``batches``."""
    def rows(k: str) -> Any:
        parts = [b[k] for b in batches]
        if k == "views":
            return [torch.cat(vs) for vs in zip(*parts)]
        return torch.cat(parts) if isinstance(parts[0], torch.Tensor) else [x for p in parts for x in p]

    return {k: rows(k) for k in batches[0]}


def globally_drawn_negatives(self: bank_module.MemoryBank, n: int, k: int) -> torch.Tensor:
    """``MemoryBank.sample`` with one draw per global batch, this process taking its rows.

    The library draws each process's negatives on its own (seeded by rank), so a 2-process run
    cannot draw what 1 process draws for the same samples; drawing once for the global batch keeps
    everything else (bank updates from every process, NCE's normaliser, gradients) comparable by
    loss over steps."""
    rank, n_proc = world()
    g = torch.Generator(device=self.rows.device).manual_seed(int(self.draws) * 65537)
    self.draws += 1
    filled = self.seen.nonzero().squeeze(1)
    pool = filled if filled.numel() >= k else torch.arange(self.rows.shape[0], device=self.rows.device)
    idx = pool[torch.randint(pool.numel(), (n * n_proc, k), device=self.rows.device, generator=g)]
    return idx[rank * n:(rank + 1) * n]


def snapshot(objective: torch.nn.Module) -> dict[str, torch.Tensor]:
    """What the objective holds before a forward: normalised SwAV prototypes, DINO's centre, MoCo's
    queue pointer, NNCLR's support-set pointer (the state after the previous step)."""
    out = {}
    if hasattr(objective, "prototypes"):
        out["prototypes"] = F.normalize(objective.prototypes.weight.detach(), dim=1).clone()
    if hasattr(objective, "center"):
        out["center"] = objective.center.clone()
    if hasattr(objective, "queue") and hasattr(objective.queue, "ptr"):
        out["ptr"] = objective.queue.ptr.clone()
    if hasattr(objective, "support"):
        out["support_ptr"] = objective.support.ptr.clone()
    return out


def run_case(name: str, case: Case, runs: Path, shards: str) -> dict[str, Any]:
    """Train one case; on rank 0 return losses by step, final states and snapshots."""
    rank, n_proc = world()
    one_step = n_proc == 1 and case.merge
    accum = 1 if one_step else case.accum
    batch_size = case.global_batch * case.accum if one_step else case.global_batch // n_proc
    out = runs / name
    recipe = load_recipe(ROOT / "configs" / f"{case.config}_digits.yaml", [
        f"data.train_shards={shards}", f"run.output_dir={out}", f"data.batch_size={batch_size}",
        "data.num_workers=0", f"optim.grad_accum={accum}", f"train.steps={case.steps}", "train.log_every=1",
        "train.save_every=0", "train.progress=false", "optim.warmup_steps=1", "eval.knn_train_shards=null",
        "eval.knn_shards=[]", "train.tf32=false", *(o.replace("{batch}", str(batch_size)) for o in case.overrides)])
    snaps: list[dict[str, torch.Tensor]] = []
    try:
        trainer = Trainer(recipe)
        tokenizer = trainer.unwrapped.tokenizer() if recipe.data.kind == "image_text" else None
        micro = global_batches(recipe, case, case.steps * case.accum, seed=len(case.data_of or name),
                               tokenizer=tokenizer)
        if one_step:
            mine = [concat(micro[i:i + case.accum]) for i in range(0, len(micro), case.accum)]
        else:
            mine = [share(b, rank, n_proc) for b in micro]
        trainer.loader = FixedStream(mine)
        objective = trainer.acc.unwrap_model(trainer.objective)
        graphs: list[int] = []  # compiled: the graphs compiled so far, after each optimizer step
        if recipe.train.compile:  # (a forward hook would be compiled with the objective)
            torch._dynamo.reset()
            counters.clear()
            after_step = objective.after_optimizer_step

            def counted(step: int) -> None:
                after_step(step)
                graphs.append(counters["stats"]["unique_graphs"])

            objective.after_optimizer_step = counted
        else:
            objective.register_forward_pre_hook(lambda m, args: snaps.append(snapshot(m)))
        start = {k: v.detach().cpu().clone() for k, v in trainer.unwrapped.state_dict().items()}
        trainer.fit()
        breaks = dict(counters["graph_break"]) if recipe.train.compile else {}  # reason: count
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge (SyncBN on CPU)
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        if recipe.train.compile:
            torch._dynamo.reset()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"losses": {r["step"]: r["loss"] for r in rows if "loss" in r},
            "start": start, "model": {k: v.detach().cpu().clone() for k, v in trainer.unwrapped.state_dict().items()},
            "objective": {k: v.detach().cpu().clone() for k, v in objective.state_dict().items()},
            "snapshots": snaps + [snapshot(objective)], "device": str(trainer.acc.device),
            "graphs": graphs, "graph_breaks": breaks}


SMALL = ["data.num_workers=0", "data.shuffle_buffer=32", "train.steps=6", "train.save_every=3", "train.log_every=1",
         "train.progress=false", "optim.warmup_steps=1", "eval.knn_train_shards=null", "eval.knn_shards=[]",
         "eval.linear=false", "model.backbone.width=8", "model.backbone.depth=2", "train.tf32=false"]
RESUME = {  # recipe and overrides of each resume case (BatchNorm encoders, the real digits loader)
    "resume_plain": ("moco_v2_digits", ["data.batch_size=8", "objective.queue_size=32", "objective.shuffle_bn=false"]),
    "resume_shuffle_bn": ("moco_v2_digits", ["data.batch_size=8", "objective.queue_size=32",
                                             "objective.shuffle_bn=true"]),
    # shards drawn with replacement (data.resample), 4 batches an epoch: the checkpoint at step 3 is
    # mid-epoch, and the resumed run must draw the same shards and samples as the uninterrupted one
    "resume_resampled": ("moco_v2_digits", ["data.batch_size=8", "objective.queue_size=32",
                                            "objective.shuffle_bn=false", "data.resample=true",
                                            "data.epoch_samples=64"]),
    # each process's own queue of past projections is in use when the checkpoint is taken
    "resume_swav_queue": ("swav_digits", ["data.batch_size=4", "model.projector={dims: [32, 16], norm: bn}",
                                          "objective.prototypes=10", "objective.freeze_prototypes_steps=0",
                                          "objective.queue_length=8", "objective.queue_start_step=0"]),
}


def resume_case(name: str, runs: Path, shards: str) -> dict[str, Any]:
    """A 6-step run and the same run resumed from its step-3 checkpoint (see ``RESUME``); on rank 0,
    the logged losses of both."""
    rank, n_proc = world()
    config, extra = RESUME[name]

    def recipe(out: Path) -> Recipe:
        return load_recipe(ROOT / "configs" / f"{config}.yaml",
                           [f"data.train_shards={shards}", f"run.output_dir={out}", *SMALL, *extra])

    full, part = runs / name / "full", runs / name / "part"
    Trainer(recipe(full)).fit()
    if rank == 0:
        shutil.copytree(full / "checkpoints" / "step_00000003", part / "checkpoints" / "step_00000003")
    if n_proc > 1:
        torch.distributed.barrier()
    Trainer(recipe(part)).fit(resume="latest")
    if rank:
        return {}
    losses = [{json.loads(line)["step"]: json.loads(line)["loss"] for line in (run / "metrics.jsonl").open()
               if "loss" in json.loads(line)} for run in (full, part)]
    return {"full": losses[0], "resumed": losses[1]}


def shuffle_bn_partitions() -> dict[str, Any]:
    """MoCo's keys with a BatchNorm key encoder, 2 processes of 4 rows. For each of 3 global
    batches, the partition of the 8 rows into BatchNorm batches that reproduces every process's
    keys (read from the queue, where they land in global row order), found by encoding every
    4-row subset in one process; with and without ``shuffle_bn``."""
    rank, n_proc = world()
    assert n_proc == 2, "shuffle-BN is checked with 2 processes"
    results: dict[str, Any] = {}
    for shuffle in (True, False):
        torch.manual_seed(0)
        recipe = from_dict(Recipe, {"data": {"train_shards": "x", "kind": "multi_view"}, "objective": {
            "name": "moco", "queue_size": 8, "momentum": 0.9, "shuffle_bn": shuffle},
            "model": {"name": "encoder", "backbone": {"name": "cnn", "width": 8, "depth": 2, "norm": "bn"},
                      "projector": {"dims": [32, 16], "norm": "bn"}}})
        model = build("model", recipe.model)
        objective = build("objective", recipe.objective)
        objective.setup(model, 10)
        g = torch.Generator().manual_seed(3)
        found = []
        for _ in range(3):
            x = torch.randn(8, 3, 16, 16, generator=g)
            q = torch.randn(8, 3, 16, 16, generator=g)
            local = {"views": [q[rank * 4:(rank + 1) * 4], x[rank * 4:(rank + 1) * 4]]}
            objective(model(local), local)
            # every process enqueued every process's keys: rows 0..7 are the keys of global rows 0..7
            assert int(objective.queue.ptr) == 0
            if rank == 0:
                found.append(_partition(objective, x, objective.queue.keys.clone()))
        results[str(shuffle)] = found
    return results


@torch.no_grad()
def _partition(objective: torch.nn.Module, x: torch.Tensor, keys: torch.Tensor) -> list[list[int]] | None:
    """The split of rows 0..7 into two BatchNorm batches of 4 whose one-process keys are ``keys``."""
    def encode(rows: list[int]) -> torch.Tensor:
        return F.normalize(objective.target({"views": [x[rows]]})["z"][0], dim=-1)

    for cell in itertools.combinations(range(8), 4):
        if 0 not in cell:
            continue
        rest = [i for i in range(8) if i not in cell]
        if all(torch.allclose(encode(list(c)), keys[list(c)], atol=1e-5) for c in (cell, rest)):
            return [list(cell), rest]
    return None


def main(out_path: str, runs: str, shards: str, *names: str) -> None:
    # the process group (gloo on CPU), also for shuffle_bn alone; kept across the cases' runs (Trainer.fit
    # leaves it for what comes next: Accelerate's state would not create it again)
    PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    bank_module.MemoryBank.sample = globally_drawn_negatives
    results: dict[str, Any] = {}
    for name in names or CASES:
        if name == "shuffle_bn":
            results[name] = shuffle_bn_partitions()
        elif name.startswith("resume_"):
            results[name] = resume_case(name, Path(runs), shards)
        else:
            results[name] = run_case(name, CASES[name], Path(runs), shards)
    if world()[0] == 0:
        torch.save(results, out_path)
    if torch.distributed.is_initialized():  # shut the gloo group down together
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
