"""One training loop for every method: Accelerate, AdamW + warmup/cosine, accumulation, clipping,
checkpoints with exact resume (safetensors + JSON, see :mod:`mmcl.checkpoint`), guards against
non-finite losses, gradients and weights, logging and evaluation.

The loop never asks which method it runs. The model maps a batch to outputs, the objective
maps outputs to ``(loss, metrics)``, and either may define ``after_optimizer_step(step)``
(temperature clamps, momentum encoders, queues) which the loop calls after every update.
"""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, gather_object, set_seed
from tqdm import tqdm

from mmcl import checkpoint as ckpt
from mmcl.data import make_loader
from mmcl.data.seek import buffer_settings
from mmcl.data.stream import WorkerPositions, sample_seed
from mmcl.dist import world
from mmcl.errors import MmclError, Stopped
from mmcl.evaluate.run import flat_metrics
from mmcl.files import write_atomic
from mmcl.fsdp import Sharded, check_launch, launch_error, local
from mmcl.fsdp import plugin as fsdp_plugin
from mmcl.gradcache import concat, grad_cache_step
from mmcl.optim import build_optimizer
from mmcl.publish import RunFacts, push_final, write_final
from mmcl.recipe import Recipe, device_vote_obstacle, merged_micro_batches, recipe_dict
from mmcl.registry import build, plugin_name
from mmcl.report import log_lines


class TrainingError(MmclError):
    """The run cannot continue (e.g. the loss stayed NaN/inf for too many steps)."""


class TrainState:
    """Counters saved in checkpoints: optimizer steps, data position of every process, bad steps.

    A process's position is ``[epoch, batches trained in it, *WorkerPositions.to_list()]`` (where each
    loader worker's stream stands); ``start_epoch`` is the epoch this layout (processes x workers)
    began reading at, and ``segments`` the layouts before it whose trained samples still matter (see
    :meth:`Trainer._resume_elsewhere`); ``skipped`` the samples skipped so far, by reason."""

    def __init__(self) -> None:
        self.step = 0
        self.positions: list[list[int]] = []
        self.bad_steps = 0
        self.start_epoch = 0
        self.segments: list[dict[str, Any]] = []
        self.skipped: dict[str, int] = {}

    def state_dict(self) -> dict[str, Any]:
        """Plain data, saved as ``state.json`` in every checkpoint."""
        return {"step": self.step, "positions": self.positions, "bad_steps": self.bad_steps,
                "start_epoch": self.start_epoch, "segments": self.segments, "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (older checkpoints have no segments nor skip counts)."""
        self.step, self.positions, self.bad_steps = state["step"], state["positions"], state["bad_steps"]
        self.start_epoch, self.segments = state.get("start_epoch", 0), state.get("segments", [])
        self.skipped = state.get("skipped", {})


def _describe(layout: dict[str, Any]) -> str:
    """A layout as a run's log says it."""
    return ", ".join(f"{k}={v}" for k, v in layout.items())


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Signal:
    """Whether a signal arrived (:func:`stop_on_sigterm`)."""

    signalled = False


@contextmanager
def stop_on_sigterm() -> Iterator[_Signal]:
    """While training, a SIGTERM (what Slurm and Kubernetes send before preemption or at a time limit,
    some seconds before SIGKILL) asks the loop to write a checkpoint and stop at the next step instead
    of dying mid-step. Later SIGTERMs change nothing: under Slurm a process gets one from Slurm and one
    from torchrun's agent within milliseconds, and SIGKILL follows the grace period anyway. Outside
    the main thread nothing is changed."""
    seen = _Signal()

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        seen.signalled = True

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield seen
        return
    try:
        yield seen
    finally:  # a handler installed from C reads as None and cannot be put back: the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


@contextmanager
def loader_worker_deaths(loader: Any) -> Iterator[None]:
    """A loader worker killed under training (the kernel's OOM killer) becomes a :class:`TrainingError`
    saying so, after the other workers are stopped. torch reports the death from its SIGCHLD handler,
    so at any point of a step, not only when a batch is read."""
    try:
        yield
    except RuntimeError as e:
        if "DataLoader worker" not in str(e):
            raise
        # another child exiting now would make torch's SIGCHLD check raise again, here, until the dead
        # worker is unregistered: hold the signal while the loader closes
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        try:
            for _ in range(3):  # a signal that arrived before the block can still raise once mid-close
                try:
                    loader.close()
                    break
                except RuntimeError as again:
                    if "DataLoader worker" not in str(again):
                        raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        raise TrainingError(f"a data loader worker died ({str(e).splitlines()[0]}): usually out of memory; lower "
                            "data.num_workers or data.shuffle_buffer, then rerun with --resume latest") from None


def _timed(batches: Iterator[Any], waited: dict[str, float]) -> Iterator[Any]:
    """``batches``, adding the seconds spent waiting for each to ``waited["s"]`` (the loader's share
    of the step time, logged as ``data_wait``: near 1 means the GPU waits for data)."""
    while True:
        t = time.perf_counter()
        try:
            item = next(batches)
        except StopIteration:
            return
        waited["s"] += time.perf_counter() - t
        yield item


# what a run writes in its folder, set aside when another run starts afresh there (and TensorBoard's folder)
EARLIER_RUNS = "earlier_runs"  # RUN/earlier_runs/<UTC time>/
EARLIER_RUN_FILES = ("recipe.yaml", "metrics.jsonl", "summary.json", "checkpoints", "final", "report", "wandb")


class Trainer:
    """Runs one recipe. ``Trainer(recipe).fit(resume=None)`` returns the final model folder.

    >>> import subprocess, sys, tempfile, mmcl
    >>> data = tempfile.mkdtemp()   # mmcl-prep digits: 32 px image-caption shards of scikit-learn's digits
    >>> _ = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True,
    ...                    capture_output=True)
    >>> recipe = mmcl.recipe_from("configs/clip_digits.yaml", [f"data.train_shards={data}/train-{{000000..000004}}.tar",
    ...     f"run.output_dir={data}/run", "train.steps=4", "train.save_every=2", "train.progress=false",
    ...     "data.num_workers=0", "data.batch_size=32", f"eval.zeroshot_shards={data}/val-000000.tar"])
    >>> final = Trainer(recipe).fit()   # checkpoints at steps 2 and 4, then RUN/final and its evaluation
    mmcl: 1 process on cpu, precision no
    mmcl: data.batch_size 32 per process x 1 process x optim.grad_accum 1 = 32 samples per optimizer step
    mmcl: the loss sees 32 samples at a time (batch per process x processes)
    mmcl: train.steps 4 = 128 samples = 0.1 epochs of 1,257 training samples
    mmcl: image tower from scratch, text tower from scratch
    >>> sorted(p.name for p in (final.parent / "checkpoints").iterdir())
    ['step_00000002', 'step_00000004']
    >>> Trainer(recipe).fit(resume="latest") == final   # a finished run resumes at its end
    mmcl: ...
    True
    """

    def __init__(self, recipe: Recipe):
        self.recipe = r = recipe
        self.out = Path(r.run.output_dir)
        self.final_evals: list[dict[str, Any]] = []  # the evaluations of the final model (after fit)
        trackers = r.train.tracker_names()
        precision = None if r.train.mixed_precision == "auto" else r.train.mixed_precision
        # an objective whose loss couples a batch's samples gets the accumulated batch as one contrastive
        # batch, embedded data.batch_size (or train.grad_cache) samples at a time; others accumulate
        self.merge = merged_micro_batches(r)
        self.chunk = r.train.grad_cache or (r.data.batch_size if self.merge > 1 else 0)
        wait = InitProcessGroupKwargs(timeout=timedelta(seconds=r.train.dist_timeout_s))
        try:
            self.acc = Accelerator(gradient_accumulation_steps=r.optim.grad_accum // self.merge, kwargs_handlers=[wait],
                                   dynamo_backend="no",  # train.compile decides, not an accelerate config
                                   log_with=trackers or None,
                                   project_dir=str(self.out), mixed_precision=precision,
                                   fsdp_plugin=fsdp_plugin() if r.train.fsdp else None)
        except RuntimeError as e:
            raise (launch_error(e) or e) from None
        # float32 products (the losses) in TF32 on GPUs, as open_clip's training sets it; a no-op on CPUs.
        # After the Accelerator, whose state may set TF32 itself.
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = r.train.tf32
        set_seed(r.run.seed)
        self._check_topology()
        check_launch(self.acc, r.train.fsdp)
        self.model = build("model", r.model)
        if r.train.sync_bn and self.acc.num_processes > 1:
            if self.acc.device.type == "cpu":
                raise MmclError("train.sync_bn needs GPU processes (torch's SyncBatchNorm has no CPU version); "
                                "set train.sync_bn=false for a multi-process CPU run")
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.memory_format = torch.channels_last if r.train.channels_last else torch.contiguous_format
        if r.train.channels_last:  # before momentum copies of the model and the optimizer's state
            self.model.to(memory_format=torch.channels_last)
        self.objective = build("objective", r.objective)
        self.objective.setup(self.model, r.train.steps)  # heads sized to the model, momentum copies of it
        if r.train.sync_bn and self.acc.num_processes > 1:  # the objective's own heads too (BYOL's predictor)
            self.objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.objective)
        # The weights above came from the same seed on every process; from here each process draws its
        # own random numbers (dropout, FLIP's patches), as open_clip seeds seed + rank: else every GPU
        # would drop the same patches of its batch.
        set_seed(r.run.seed + self.acc.process_index)
        tokenizer = self.model.tokenizer() if r.data.kind == "image_text" else None
        self.loader = make_loader(r.data, tokenizer=tokenizer, seed=r.run.seed)
        trains_objective = any(p.requires_grad for p in self.objective.parameters())
        # train.fsdp: checks the objective and model, keeps an unsharded copy on the meta device for final/
        self.sharded = Sharded(self.acc, self.model, self.objective) if r.train.fsdp else None
        self.optimizer = build_optimizer(r.optim, [self.model, self.objective])
        o = r.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, r.train.steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
        # The scheduler is stepped by hand once per optimizer step (Accelerate's wrapper would step it
        # once per process).
        if trains_objective:  # an objective with its own trained heads is wrapped (DDP) like the model
            # buffers that hold each process's own data (SwAV's queue) must not be overwritten by rank 0's
            torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
                self.objective, list(self._per_process_buffers()))
            self.model, self.objective, self.optimizer = self.acc.prepare(self.model, self.objective, self.optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
            self.objective.to(self.acc.device)
        if r.train.compile:  # what Accelerate's dynamo_backend would compile, but in place (Module.compile): no
            # wrapper, so state dicts keep their keys and DDP's no_sync stays reachable; and asked of Accelerate,
            # the choice would live in its state, made once per process, where a later Trainer keeps the first's
            self.acc.unwrap_model(self.model, keep_torch_compile=False).compile()
            if trains_objective:
                self.acc.unwrap_model(self.objective, keep_torch_compile=False).compile()
        self.state = TrainState()
        self._pending: list[dict[str, Any]] = []  # this optimizer step's micro-batch metrics (on the device)
        self._signal, self._stop_agreed = _Signal(), False  # a SIGTERM seen here; seen anywhere (the last vote)
        # the host vote's verdict as a device tensor, for the metric weights (not one new tensor a step)
        self._verdicts = {flag: torch.tensor(flag, device=self.acc.device) for flag in (False, True)}
        # the logging window's metrics, each with its weight: 1 for a good step, 0 for a skipped one
        self._window: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = defaultdict(list)
        self._consecutive_bad = 0
        self.vote_on_device = self._choose_vote()
        # with the vote on the device: bad steps since the last settling, the current run of them, the longest
        self._bad = torch.zeros(3, device=self.acc.device)

    # ------------------------------------------------------------------------------ helpers
    def _check_topology(self) -> None:
        """Accelerate must see every process the launcher started (under a plain ``torchrun`` on a
        CPU machine it sees one unless ``ACCELERATE_USE_CPU=1``; ``accelerate launch --use_fsdp`` on a
        machine without GPUs starts each process on its own, with no process group at all): else the
        processes would train without synchronising their gradients, each on its share of the data."""
        processes = world(launcher=True)[1]
        if processes != self.acc.num_processes:
            raise MmclError(f"the launcher started {processes} processes but Accelerate sees "
                            f"{self.acc.num_processes}: on CPU machines set ACCELERATE_USE_CPU=1, or launch with "
                            "`accelerate launch --multi_gpu --num_processes N`")

    def _per_process_buffers(self) -> dict[str, torch.Tensor]:
        """The objective's buffers that differ between processes by design, by state-dict name."""
        objective = self.acc.unwrap_model(self.objective)
        names = set(objective.per_process_buffers)
        return {n: b for n, b in objective.named_buffers() if n in names}

    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without DDP/compile wrappers."""
        return self.acc.unwrap_model(self.model)

    def _log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``metrics.jsonl`` (main process) and send its scalars to the trackers."""
        if self.acc.is_main_process:
            path = self.out / "metrics.jsonl"
            try:
                with open(path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:  # a full disk: stop with the cause (the launcher stops the other processes)
                raise TrainingError(f"could not append to {path}: {e.strerror or e}; free some space and rerun "
                                    "with --resume latest") from None
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.acc.log(scalars, step=record["step"])

    def _skip_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in gather_object([dict(self.loader.skipped)]):
            total.update(counts)
        return dict(total)

    def _votes(self, *flags: bool | torch.Tensor) -> list[bool]:
        """For each flag, True on every process when it is true on any: a vote that keeps processes in
        step. One collective and one host synchronisation for all the flags."""
        stacked = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=self.acc.device).reshape(())
                               for f in flags])
        return [v > 0 for v in self.acc.reduce(stacked, "sum").tolist()]

    def _stop_now(self, signalled: bool, step: int) -> bool:
        """Whether a SIGTERM reached any process, so that all save and stop at the same step: at every
        step with one process, or with the vote on the host (in that vote's one collective); with the
        vote on the device and several processes, at logging steps only, so that no step waits for
        the host for it."""
        if self.acc.num_processes == 1:
            return signalled
        if not self.vote_on_device:
            return self._stop_agreed  # voted with the step's finite checks (train_step)
        return step % self.recipe.train.log_every == 0 and self._any(signalled)

    def _any(self, flag: bool | torch.Tensor) -> bool:
        """True on every process when ``flag`` is true on any (see :meth:`_votes`)."""
        return self._votes(flag)[0]

    def _modules(self) -> dict[str, torch.nn.Module]:
        """What a checkpoint holds as module state (weights, buffers, queues, banks)."""
        return {"model": self.unwrapped, "objective": self.acc.unwrap_model(self.objective)}

    def _check_finite_weights(self, what: str) -> None:
        """Refuse to write non-finite weights anywhere (every process votes). Checked: the model's
        whole state and the objective's parameters (its buffers may hold NaN as "not yet set")."""
        tensors = [*self.unwrapped.state_dict().values(), *self.acc.unwrap_model(self.objective).parameters()]
        tensors = [local(t) for t in tensors if t.is_floating_point()]  # FSDP: this process's shards
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all() if tensors else torch.tensor(True)
        if self._any(~finite):
            raise TrainingError(f"the weights became NaN or inf by step {self.state.step}; not writing them to "
                                f"{what} (the checkpoints already on disk are unchanged). Lower optim.lr or set "
                                "optim.grad_clip")

    def _choose_vote(self) -> bool:
        """Whether the bad-step vote stays on the device (``train.vote``, see
        :func:`mmcl.recipe.device_vote_obstacle`): then the optimizer skips a bad step by itself and
        no step waits for the host."""
        why = device_vote_obstacle(self.recipe, fp16_scaler=self.acc.scaler is not None)
        if self.recipe.train.vote == "device" and why:  # fp16 from the accelerate config
            raise MmclError(f"train.vote: device is not possible here: {why}; set train.vote: auto")
        return self.recipe.train.vote != "host" and why is None

    def _count_bad(self, bad: torch.Tensor) -> None:
        """Count a step on the device: bad steps, the current run of them, the longest run."""
        b = bad.float()
        total, run, worst = self._bad.unbind()
        run = (run + 1) * b
        self._bad = torch.stack([total + b, run, torch.maximum(worst, run)])

    def _settle_votes(self) -> None:
        """With the vote on the device, read its counts (a host synchronisation: at logging,
        checkpoints and the end) and stop the run if too many bad steps came in a row. Also let the
        objective raise for what its steps recorded on the device (``Objective.check_deferred``: sample
        ids outside a memory bank), before a checkpoint or the final model is written."""
        self.acc.unwrap_model(self.objective).check_deferred()
        if not self.vote_on_device:
            return
        total, _, worst = self._bad.tolist()
        self.state.bad_steps += int(total)
        self._bad[0] = 0
        if worst >= self.recipe.train.max_bad_steps:
            self._too_many_bad(int(worst))

    def _too_many_bad(self, run: int) -> None:
        raise TrainingError(f"the loss or the gradients were NaN or inf for {run} steps in a row (step "
                            f"{self.state.step}); lower optim.lr, set optim.grad_clip, check the data, or use "
                            "bf16/fp32")

    def _clip_gradients(self) -> torch.Tensor:
        """Global gradient norm (after un-scaling, before clipping), clipping to ``optim.grad_clip`` if set."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if self.sharded:  # Accelerate clips a sharded model's gradients when given its parameters, in its order
            params = list(self.model.parameters())
        return local(self.acc.clip_grad_norm_(params, self.recipe.optim.grad_clip or float("inf"))).detach()

    def _checkpoint_states(self) -> dict[str, Any]:
        """The states saved once per checkpoint, by file name, on the main process ({} on the others).
        Every process calls it: under ``train.fsdp`` the full states are gathered from every process."""
        gathered: dict[str, Any] = {}
        if self.sharded:
            gathered = {"model.safetensors": self.sharded.model_state(self.unwrapped),
                        "optimizer.safetensors": self.sharded.optimizer_state(self.unwrapped, self.optimizer.optimizer)}
        if not self.acc.is_main_process:
            return {}
        states = {f"{name}.safetensors": m.state_dict() for name, m in self._modules().items()
                  if f"{name}.safetensors" not in gathered}
        if not gathered:
            states["optimizer.safetensors"] = self.optimizer.state_dict()
        states.update(gathered)
        states["scheduler.safetensors"] = self.scheduler.state_dict()
        if self.acc.scaler is not None:
            states["scaler.safetensors"] = self.acc.scaler.state_dict()
        return states

    def _process_state(self) -> dict[str, Any]:
        """What each process saves for itself: its random generators and its per-process buffers."""
        return {"rng": ckpt.rng_state(self.acc.device), "buffers": self._per_process_buffers()}

    def _layout(self) -> dict[str, int]:
        """What a checkpoint's per-process batch counts depend on: with the same values each process
        fast-forwards its own stream (exact); with others the resume is elastic (:meth:`_resume_elsewhere`)."""
        r = self.recipe
        workers = self.loader.stream.num_workers if hasattr(self.loader, "stream") else 1
        return {"processes": self.acc.num_processes, "workers": workers, "batch_size": r.data.batch_size,
                "grad_accum": r.optim.grad_accum}

    def _data_order(self) -> dict[str, Any]:
        """What the order of the training samples depends on besides the layout (:meth:`_layout`), in
        one spelling per order (no buffer: 0; a buffer that fills first: ``shuffle_initial`` null).
        A resume finds where each stream stood, and an elastic one what was trained, by replaying the
        streams: with other values it would read another order and repeat or miss samples."""
        d = self.recipe.data
        buffer, initial = buffer_settings(d.shuffle_buffer, d.shuffle_initial)
        return {"run.seed": self.recipe.run.seed, "data.shuffle_buffer": buffer, "data.shuffle_initial": initial,
                "data.resample": d.resample}

    def _written_order(self, folder: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], str]:
        """The order of the samples ``folder`` was written with, and how this run's differs ("" when
        it does not, or for a resampled stream). A checkpoint of an mmcl before ``data_order`` was recorded
        had no ``data.shuffle_initial`` (its seed and buffer are taken as this run's). Another seed
        or buffer resumes elastically, the trained samples found by replaying the writer's order. A
        resampled stream has no "not yet trained" to protect, so it resumes at its positions as
        before (each worker's batch count bounds the epoch); switching ``data.resample`` is refused."""
        now = self._data_order()
        written = manifest.get("data_order") or {**now, "data.shuffle_initial": None}
        if written["data.resample"] != now["data.resample"]:
            raise ckpt.CheckpointError(f"checkpoint {folder} was written with data.resample: "
                                       f"{json.dumps(written['data.resample'])} and this run has "
                                       f"{json.dumps(now['data.resample'])}: what it trained of the epoch cannot "
                                       f"be told apart from what is left; set it back to resume, or start a new run")
        changed = [f"{k} was {json.dumps(written.get(k))}, is {json.dumps(v)}" for k, v in now.items()
                   if written.get(k) != v]
        return written, "" if now["data.resample"] else "; ".join(changed)

    def _fail_together(self, error: str | None, partial: Path) -> None:
        """Raise on every process if any failed (so none waits forever), removing the partial folder."""
        if not self._any(error is not None):
            return
        if self.acc.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        raise ckpt.CheckpointError(error or f"another process could not write the checkpoint {partial}")

    def save_checkpoint(self, epoch: int, batches: int) -> None:
        """Save model, objective, optimizer, scheduler, RNG and data position of every process as
        safetensors + JSON under a temporary name, then rename it into place (see :mod:`mmcl.checkpoint`)."""
        acc = self.acc
        workers = self.loader.position().to_list() if hasattr(self.loader, "position") else []
        self.state.positions = acc.gather(torch.tensor([[epoch, batches, *workers]], device=acc.device)).tolist()
        self.state.skipped = self._skip_counts()
        oldest = min(p[0] for p in self.state.positions)  # earlier layouts' samples of past epochs no longer matter
        self.state.segments = [s for s in self.state.segments if max(p[0] for p in s["positions"]) >= oldest]
        self._settle_votes()
        folder = self.out / "checkpoints"
        final = folder / f"step_{self.state.step:08d}"
        self._check_finite_weights(str(final))
        partial = ckpt.partial_path(final)
        states = self._checkpoint_states()
        need = sum(ckpt.state_bytes(s) for s in states.values()) + (1 << 20) * acc.num_processes
        error = None
        if acc.is_main_process:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir()
                free = ckpt.free_bytes(folder)
                if free < need:
                    error = (f"not enough disk space for checkpoint {final}: it needs about {ckpt.gib(need)} and "
                             f"{ckpt.gib(free)} are free; free some space (or lower train.keep_checkpoints) and "
                             "rerun with --resume latest")
            except OSError as e:
                error = f"could not create checkpoint folder {partial}: {e}"
        self._fail_together(error, partial)
        try:  # every process: its own generators and per-process buffers
            ckpt.write_state(self._process_state(), partial / f"process_{acc.process_index}.safetensors")
        except Exception as e:  # noqa: BLE001 (a full disk, a lost mount: all processes must stop together)
            error = f"could not write checkpoint {final} (process {acc.process_index}): {e}"
        self._fail_together(error, partial)
        if acc.is_main_process:
            try:
                for name, state in states.items():
                    ckpt.write_state(state, partial / name)
                (partial / ckpt.STATE).write_text(json.dumps(self.state.state_dict()) + "\n")
                ckpt.write_manifest(partial, {"step": self.state.step, **self._layout(),
                                              "data_order": self._data_order()})
                ckpt.publish(partial, final)
                ckpt.prune(folder, self.recipe.train.keep_checkpoints)
            except Exception as e:  # noqa: BLE001
                free = ckpt.free_bytes(folder)
                error = (f"could not write checkpoint {final}: {e}. It needs about {ckpt.gib(need)}; "
                         f"{ckpt.gib(free)} are free. The earlier checkpoints are unchanged")
        self._fail_together(error, partial)

    def load_checkpoint(self, folder: Path) -> tuple[int, int, int]:
        """Restore everything :meth:`save_checkpoint` saved; returns this process's (epoch, batches
        trained in it, batches to read again to get there: 0 but for checkpoints of older mmcl, which
        do not say where each loader worker stood). Only the files the verified manifest lists are
        read, and only as safetensors and JSON."""
        acc = self.acc
        manifest = ckpt.verify(folder)
        order, reordered = self._written_order(folder, manifest)
        listed = manifest["files"]
        ignored = sorted(p.name for p in folder.iterdir() if p.name not in listed and p.name != ckpt.MANIFEST)
        if ignored:
            acc.print(f"ignoring files in {folder} that its manifest does not list: {', '.join(ignored)}")
        if self.sharded:  # the main process reads the full states, each process gets its shards from it
            main = acc.is_main_process
            self.sharded.load_model(self.unwrapped, ckpt.read_state(folder / "model.safetensors") if main else None)
            self.sharded.load_optimizer(self.unwrapped, self.optimizer.optimizer,
                                        ckpt.read_state(folder / "optimizer.safetensors") if main else None)
        for name, module in self._modules().items():
            if not (self.sharded and name == "model"):
                module.load_state_dict(ckpt.read_state(folder / f"{name}.safetensors"), strict=True)
        if not self.sharded:
            self.optimizer.load_state_dict(ckpt.read_state(folder / "optimizer.safetensors"))
        recipe_lrs = list(self.scheduler.base_lrs)
        self.scheduler.load_state_dict(ckpt.read_state(folder / "scheduler.safetensors"))
        if not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(self.scheduler.base_lrs, recipe_lrs)):
            acc.print(f"mmcl: the run goes on at the learning rates it was started with, {self.scheduler.base_lrs} "
                      f"(weights, then biases and norms); this recipe's optim.lr and optim.exempt_lr_scale give "
                      f"{recipe_lrs}, which only a run started afresh takes")
        if acc.scaler is not None and "scaler.safetensors" in listed:
            acc.scaler.load_state_dict(ckpt.read_state(folder / "scaler.safetensors"))
        self.state.load_state_dict(json.loads((folder / ckpt.STATE).read_text()))
        layout = self._layout()
        written = {k: manifest.get(k, layout[k] if k == "workers" else None) for k in layout}  # older: no workers
        own = f"process_{acc.process_index}.safetensors"
        if own in listed:  # a process the writing run did not have keeps the objective's and its generators
            state = ckpt.read_state(folder / own)
            buffers = self._per_process_buffers()
            for name, value in state["buffers"].items():
                buffers[name].copy_(value)
            ckpt.set_rng_state(state["rng"], acc.device)
        else:
            ckpt.seed_all(sample_seed(self.recipe.run.seed, self.state.step, acc.process_index))
        if acc.is_main_process:  # the run's totals go on (every process's counts are summed when reported)
            self.loader.skipped.update(self.state.skipped)
        if written != layout or reordered:
            return self._resume_elsewhere(folder, written, layout, order, reordered)
        epoch, batches, *workers = self.state.positions[acc.process_index]
        if self.state.segments:  # this layout began after an elastic resume: leave out what came before
            self.loader.stream.exclude_trained(self.state.segments, min(p[0] for p in self.state.positions))
        if not workers:
            return epoch, batches, batches
        self.loader.resume_at(WorkerPositions.from_list(epoch, workers, layout["workers"]))
        return epoch, batches, 0

    def _resume_elsewhere(self, folder: Path, written: dict[str, Any], layout: dict[str, Any],
                          order: dict[str, Any], reordered: str = "") -> tuple[int, int, int]:
        """Resume a checkpoint written with other processes, loader workers, batch size or accumulation
        (a job back on another number of GPUs), or another order of the samples (``reordered``: a
        seed or shuffle buffer changed, say to fit the workers in memory): every process starts at the
        oldest epoch any writing process was in, and leaves out the samples the writing run (and the
        layouts before it) had trained on, found by replaying its streams from the positions it
        saved, in the ``order`` it read them. The rest of the epoch thus covers exactly the samples
        not yet seen, but in another order than an uninterrupted run: close, not bit-identical. A
        resampled stream has no samples "not yet seen": it draws afresh. Every segment keeps the order
        its run read in; one from before orders were kept was read in the checkpoint's."""
        state, stream = self.state, getattr(self.loader, "stream", None)
        if stream is None or any(len(p) != 3 + 2 * written["workers"] for p in state.positions):
            raise ckpt.CheckpointError(
                f"checkpoint {folder} was written with {_describe(written)} and this run has {_describe(layout)}, "
                "and it does not record where each loader worker stood (written by an older mmcl), so it can only "
                "resume on the same layout")
        epoch = min(p[0] for p in state.positions)
        segment = {"processes": written["processes"], "workers": written["workers"], "start_epoch": state.start_epoch,
                   "positions": state.positions, "order": order}
        earlier = [{"order": order, **s} for s in state.segments]
        state.segments, state.start_epoch = ([] if stream.resample else [*earlier, segment]), epoch
        t = time.perf_counter()
        left_out = stream.exclude_trained(state.segments, epoch)
        why = "; and ".join(([f"{_describe(written)}, this run has {_describe(layout)}"] if written != layout else [])
                            + ([f"another order of the samples ({reordered})"] if reordered else []))
        self.acc.print(f"elastic resume: {folder.name} was written with {why}; epoch {epoch} goes on "
                       + ("with fresh draws (data.resample)" if stream.resample else
                          f"without the {left_out:,} samples already trained (found in "
                          f"{time.perf_counter() - t:.1f} s by replaying the streams that read them)"))
        return epoch, 0, 0

    def evaluate(self) -> list[dict[str, Any]]:
        """Zero-shot and retrieval on the recipe's eval shards (every process takes part)."""
        from mmcl.evaluate.run import run_evals

        # images preprocessed as the saved model's folder will say
        return run_evals(self.unwrapped, self.recipe.eval, self.recipe.data.preprocess(), device=self.acc.device)

    # ------------------------------------------------------------------------------ loop
    def train_step(self, batch: dict[str, Any]) -> bool | None:
        """One micro-batch, already on the device: forward, loss, backward; on the last micro-batch of
        an optimizer step also clip, vote, update and run the hooks. Returns None before that, then
        whether the update was applied.

        A step whose loss (any micro-batch) or gradient norm is not finite on any process is skipped on
        every process and counted as bad; too many in a row stop the run. The vote is one collective.
        With the vote on the host it is also the step's one host synchronisation, and a skipped step
        does not count towards ``train.steps``. With the vote on the device (``train.vote``, see
        :meth:`_choose_vote`) the optimizer skips the step by itself and nothing waits for the host:
        the step counts (as open_clip's under its grad scaler), and the bad-step counts are read when
        a logging window closes. Losses and metrics stay on the device until then either way, so the
        host can queue the next step's work while the device computes.
        """
        acc = self.acc
        # FSDP: the objective holds no parameters, and Accelerate would ask it to stop syncing them
        with acc.accumulate(*([self.model] if self.sharded else [self.model, self.objective])):
            loss, metrics = self._forward_backward(batch)
            self._pending.append({"loss": loss.detach(), **metrics})
            if not acc.sync_gradients:
                return None
            norm = self._clip_gradients()
            losses_bad = ~torch.isfinite(torch.stack([m["loss"] for m in self._pending])).all()
            if self.vote_on_device:
                bad = acc.reduce((losses_bad | ~torch.isfinite(norm)).float().reshape(1), "sum")[0] > 0
                self.optimizer.optimizer.found_inf = bad.float()  # the fused kernel skips the update if set
                self.optimizer.step()
            else:
                # the same collective tells every process whether a SIGTERM reached any (fit stops on it)
                loss_bad, norm_bad, self._stop_agreed = self._votes(losses_bad, ~torch.isfinite(norm),
                                                                    self._signal.signalled)
                bad = self._verdicts[loss_bad or norm_bad]  # the vote as a device tensor, made once
                if not (loss_bad or norm_bad) or (norm_bad and acc.scaler is not None):
                    self.optimizer.step()  # fp16 with a non-finite norm: the grad scaler skips it, lowers its scale
                elif acc.scaler is not None:  # fp16, a non-finite loss with finite gradients: the scaler must
                    acc.scaler.update()  # still close the step it unscaled, else the next unscale_ raises
            self.optimizer.zero_grad(set_to_none=True)
        pending, self._pending = self._pending, []
        if self.vote_on_device:
            self._count_bad(bad)
        elif loss_bad or norm_bad:
            self.state.bad_steps += 1
            self._consecutive_bad += 1
            if self._consecutive_bad >= self.recipe.train.max_bad_steps:
                self._too_many_bad(self._consecutive_bad)
            return False
        else:
            self._consecutive_bad = 0
        pending[-1]["grad_norm"] = norm
        good = (~bad).float()
        for metrics in pending:
            for k, v in metrics.items():  # a skipped step's values weigh 0 (and NaN must not reach the sum)
                v = torch.as_tensor(v, device=acc.device).detach().float()
                self._window[k].append((torch.where(bad, torch.zeros_like(v), v), good))
        self.scheduler.step()
        self.state.step += 1
        model_hook = getattr(self.unwrapped, "after_optimizer_step", None)  # of the models, only CLIP has one
        if model_hook is not None:
            model_hook(self.state.step)
        acc.unwrap_model(self.objective).after_optimizer_step(self.state.step)
        return True

    def _forward_backward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and metrics of one micro-batch, its gradients added to the parameters: in one pass, or
        with ``train.grad_cache`` in chunks whose gradients add up to the whole batch's
        (:mod:`mmcl.gradcache`). A non-finite loss gives non-finite gradients, which the vote skips."""
        acc = self.acc
        backward = lambda loss: acc.backward(loss.float())  # noqa: E731
        chunk = self.chunk
        if chunk:  # DDP's own no_sync: Accelerate's is a no-op for a DDP model of one process
            loss, metrics = grad_cache_step(self.model, self.objective, batch, chunk, device=acc.device,
                                            autocast=acc.autocast, backward=backward,
                                            no_sync=getattr(self.model, "no_sync", nullcontext),
                                            keep_last=self.recipe.train.grad_cache_keep_last)
            return loss.float(), metrics
        with acc.autocast():
            loss, metrics = self.objective(self.model(batch), batch)
        backward(loss)
        return loss.float(), metrics

    def _log_window(self, epoch: int, samples: int, seconds: float, waited: float) -> None:
        """Log the means over the window's good steps (averaged over processes), the learning rate,
        throughput, the loader's share of the time and the counts of bad steps and skipped samples."""
        self._settle_votes()
        acc, names, metrics = self.acc, sorted(self._window), {}
        if names:  # weighted means (skipped steps weigh 0), then averaged over processes
            sums = torch.stack([torch.stack([v for v, _ in self._window[k]]).sum() for k in names])
            counts = torch.stack([torch.stack([w for _, w in self._window[k]]).sum() for k in names])
            means = acc.reduce(sums / counts.clamp(min=1), "mean").tolist()
            metrics = {k: m for k, m, n in zip(names, means, counts.tolist()) if n > 0}
        record = {"step": self.state.step, "epoch": epoch, **metrics,
                  "lr": self.scheduler.get_last_lr()[0], "samples_per_s": samples / max(1e-9, seconds),
                  "data_wait": waited / max(1e-9, seconds), "bad_steps": self.state.bad_steps,
                  "skipped": self._skip_counts()}
        if acc.device.type == "cuda":  # peak memory of this process since the start, GiB
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        self._log(record)
        self._bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}",
                              samples_s=f"{record['samples_per_s']:.0f}")
        self._window.clear()

    def sizes(self) -> str:
        """What the run's numbers mean, printed when it starts: processes, device and precision, the
        batch per process, accumulation, samples per optimizer step, how many samples the loss sees
        at a time (the contrastive batch), steps, and how many epochs of the training shards that is."""
        r, acc = self.recipe, self.acc
        b, p, a = r.data.batch_size, acc.num_processes, r.optim.grad_accum
        step, loss = b * p * a, b * p * self.merge
        epoch = self.loader.stream.epoch_samples if hasattr(self.loader, "stream") else None
        procs, objective = f"{p} process{'es' if p > 1 else ''}", plugin_name("objective", r.objective)
        if self.merge > 1:
            how = (f"batch per process x processes x optim.grad_accum: the micro-batches are one contrastive batch, "
                   f"embedded {self.chunk} at a time")
        else:
            how = "batch per process x processes" + (
                f", embedded {self.chunk} at a time (train.grad_cache)" if self.chunk else "") + (
                f"; optim.grad_accum adds micro-batches, not negatives: {objective}'s loss is per sample"
                if a > 1 else "")
        lines = [f"{procs} on {acc.device.type}, precision {acc.mixed_precision}",
                 f"data.batch_size {b} per process x {procs} x optim.grad_accum {a} = {step:,} samples per "
                 "optimizer step",
                 f"the loss sees {loss:,} samples at a time ({how})",
                 f"train.steps {r.train.steps:,} = {r.train.steps * step:,} samples"
                 + (f" = {r.train.steps * step / epoch:.1f} epochs of {epoch:,} training samples" if epoch else "")]
        stream = getattr(self.loader, "stream", None)
        shares = stream.epoch_shares(stream.num_workers) if stream is not None else None
        if shares and min(shares) and max(shares) > 1.01 * min(shares):
            lines.append(f"shards of unequal sizes: the processes read {min(shares):,} to {max(shares):,} samples an "
                         f"epoch, so over a run the smaller shares are seen up to {max(shares) / min(shares):.2f}x as "
                         "often (data.resample: true draws shards with replacement instead)")
        return "\n".join(f"mmcl: {line}" for line in lines)

    def _start(self, resume: str | None) -> tuple[int, int, int]:
        """Write the recipe, start the trackers and restore the checkpoint ``resume`` names, if any;
        returns the (epoch, batches trained in it, batches to read again) to continue from."""
        r, acc = self.recipe, self.acc
        found = self._agreed_checkpoint(resume) if resume else None
        if resume and found is None:
            acc.print(f"no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            if found is None:  # starting from scratch: whatever an earlier run left here is not this run's
                self._set_aside_earlier_run()
            write_atomic(self.out / "recipe.yaml", yaml.safe_dump(recipe_dict(r), sort_keys=False))
        acc.wait_for_everyone()  # the folder is this run's before any process reads or writes it
        acc.print(self.sizes())
        if hasattr(self.unwrapped, "starts_from"):
            acc.print("mmcl: " + ", ".join(f"{tower} tower from {source}"
                                           for tower, source in self.unwrapped.starts_from().items()))
        position = self.load_checkpoint(found) if found else (0, 0, 0)
        if found:  # the log keeps what the run logged up to its checkpoint
            self._forget_after(self.state.step)
        # TensorBoard drops what the interrupted run logged after the checkpoint, as metrics.jsonl does
        kwargs: dict[str, dict[str, Any]] = {"wandb": {"dir": str(self.out)}}  # its files in the run, not the cwd
        if found:
            kwargs["tensorboard"] = {"purge_step": self.state.step + 1}
        acc.init_trackers(r.run.name or self.out.name, config=_flat(recipe_dict(r)), init_kwargs=kwargs)
        if found:
            acc.print(f"resumed from {found} at step {self.state.step}")
        return position

    def _finish_trackers(self) -> None:
        """The trackers write out what they hold. Not Accelerate's ``end_training``, which also ends
        the process group: a script that evaluates or trains again after :meth:`fit` needs it (the
        ``mmcl train`` command ends it when it exits)."""
        for tracker in self.acc.trackers:
            tracker.finish()

    def _agreed_checkpoint(self, resume: str) -> Path | None:
        """The checkpoint ``--resume`` names, as the main process finds it, for every process: each
        listing ``checkpoints/`` on its own could see another ``latest`` (a shared file system's
        stale listing on another machine, just after a preempted run wrote its last checkpoint), and
        would go on from other weights with no error."""
        found, error = None, None
        if self.acc.is_main_process:
            try:
                found = ckpt.find_checkpoint(self.out, resume, warn=self.acc.print)
            except ckpt.CheckpointError as e:
                error = str(e)
            except Exception as e:  # noqa: BLE001 (a shared file system's error: every process stops with it)
                error = f"--resume {resume}: {type(e).__name__}: {e}"
        found, error = broadcast_object_list([found and str(found), error])
        if error:
            raise ckpt.CheckpointError(error)
        return Path(found) if found else None

    def _set_aside_earlier_run(self) -> None:
        """A run starting from scratch (no ``--resume``, or no checkpoint to resume) in a folder an
        earlier run used (it holds that run's ``recipe.yaml``) first moves that run's recipe, log,
        checkpoints, final model, report and TensorBoard and wandb files to ``RUN/earlier_runs/<UTC time>/``.
        Left in place, ``--resume latest`` would pick the earlier run's checkpoint whenever its step is
        higher, pruning could delete this run's own newer checkpoints first, and the log would mix two
        runs. Anything else in the folder stays where it is."""
        if not (self.out / "recipe.yaml").is_file():
            return
        tracker = self.recipe.run.name or self.out.resolve().name  # TensorBoard's folder, when a plain name
        plain = Path(tracker).name == tracker and tracker not in ("", ".", "..", EARLIER_RUNS)
        names = [*EARLIER_RUN_FILES, *([tracker] if plain else [])]
        found = [n for n in dict.fromkeys(names) if (self.out / n).exists()]
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        dest, n = self.out / EARLIER_RUNS / stamp, 1
        while dest.exists():  # two fresh starts within a second
            dest, n = self.out / EARLIER_RUNS / f"{stamp}-{n}", n + 1
        dest.mkdir(parents=True)
        for name in found:
            (self.out / name).rename(dest / name)
        self.acc.print(f"mmcl: {self.out} held an earlier run: its {', '.join(found)} moved to {dest} "
                       "(--resume latest continues a run instead of starting afresh)")

    def _forget_after(self, step: int) -> None:
        """Drop from ``metrics.jsonl`` what a run logged after ``step`` (the checkpoint it resumes
        from), so that every step is logged once."""
        path = self.out / "metrics.jsonl"
        if not (self.acc.is_main_process and path.is_file()):
            return
        lines = log_lines(path)  # a line torn by the kill that interrupted the run is dropped too
        kept = [line for line, record in lines if record is not None and record.get("step", 0) <= step]
        if len(kept) != len(lines):
            write_atomic(path, "".join(f"{line}\n" for line in kept))

    def fit(self, resume: str | None = None) -> Path:
        """Train to ``train.steps`` optimizer steps; returns ``RUN/final``."""
        r, acc = self.recipe, self.acc
        start_epoch, done, read_again = self._start(resume)
        if self.state.step >= r.train.steps:
            return self._finish(time.perf_counter(), {})
        self._bar = tqdm(total=r.train.steps, initial=self.state.step, desc="train", dynamic_ncols=True,
                         disable=not (acc.is_main_process and r.train.progress))
        epoch, batches, current = start_epoch, done - read_again, start_epoch
        t0 = t_log = time.perf_counter()
        samples, waited = 0, {"s": 0.0}
        merging: list[dict[str, Any]] = []
        evals: list[dict[str, Any]] = []
        self.model.train()
        with closing(self.loader), loader_worker_deaths(self.loader), stop_on_sigterm() as self._signal:
            for epoch, batch in _timed(self.loader.forever(start_epoch), waited):
                if epoch != current:
                    current, batches = epoch, 0
                batches += 1
                if epoch == start_epoch and batches <= done:
                    continue  # a checkpoint of an older mmcl: read again up to where it stopped
                batch = self.loader.prepare(batch, acc.device, self.memory_format)
                if batch is None:
                    continue  # data.decode: device met a JPEG nothing decodes; counted with the skipped samples
                samples += len(batch["key"]) * acc.num_processes
                if self.merge > 1:  # optim.grad_accum micro-batches make one contrastive batch
                    merging.append(batch)
                    if len(merging) < self.merge:
                        continue
                    batch, merging = concat(merging), []
                if not self.train_step(batch):
                    continue  # mid-accumulation, or a skipped step
                step = self.state.step
                self._bar.update(1)
                if step % r.train.log_every == 0 or step == r.train.steps:
                    now = time.perf_counter()
                    self._log_window(epoch, samples, now - t_log, waited["s"])
                    samples, t_log, waited["s"] = 0, now, 0.0
                if r.train.eval_every and step % r.train.eval_every == 0 and step != r.train.steps:
                    evals = self.evaluate()
                    self._log({"step": step, **flat_metrics(evals)})
                saved = (r.train.save_every and step % r.train.save_every == 0) or step == r.train.steps
                if saved:
                    self.save_checkpoint(epoch, batches)
                if step >= r.train.steps:
                    break
                if self._stop_now(self._signal.signalled, step):
                    if not saved:
                        self.save_checkpoint(epoch, batches)
                    self._finish_trackers()
                    self._bar.close()
                    raise Stopped(f"SIGTERM at step {step:,} of {r.train.steps:,}: checkpoint "
                                  f"{self.out / 'checkpoints' / f'step_{step:08d}'} written; continue with "
                                  f"--resume latest", exit_code=128 + signal.SIGTERM)
        self._bar.close()
        return self._finish(t0, evals)

    def _finish(self, t0: float, evals: list[dict[str, Any]]) -> Path:
        r, acc = self.recipe, self.acc
        wall = time.perf_counter() - t0
        if r.eval.requested():
            evals = self.evaluate()
            self._log({"step": self.state.step, **flat_metrics(evals)})
        self.final_evals = evals
        final = self.out / "final"
        self._settle_votes()
        self._check_finite_weights(str(final))
        skipped = self._skip_counts()  # a collective: every process takes part
        model = self.sharded.full_model(self.unwrapped) if self.sharded else self.unwrapped  # also a collective
        error = None
        if acc.is_main_process:
            facts = RunFacts(run_name=r.run.name or self.out.name, steps=self.state.step,
                             processes=acc.num_processes, wall_s=wall, mixed_precision=acc.mixed_precision,
                             bad_steps=self.state.bad_steps, evals=evals, skipped=skipped)
            try:
                write_final(model, self.out, r, facts)
            except Exception as e:  # noqa: BLE001 (a full disk: every process must stop, none wait)
                hint = "free some space and " if isinstance(e, OSError) else ""
                error = (f"could not write the final model to {final}: {type(e).__name__}: {e}. The last checkpoint "
                         f"is whole: {hint}rerun with --resume latest")
        if self._any(error is not None):  # also the barrier before the model is read or pushed
            raise TrainingError(error or "the main process could not write the final model")
        self._finish_trackers()
        if r.hub.push and acc.is_main_process:
            push_final(final, r, self.state.step, say=acc.print)
        return final


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested recipe data to scalar hyperparameters for trackers."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (int, float, str, bool)):
            out[key] = v
        else:
            out[key] = str(v)
    return out


def train(recipe: Recipe, resume: str | None = None) -> Path:
    """Train ``recipe``; returns the folder of the final model."""
    return Trainer(recipe).fit(resume)


__all__ = ["Trainer", "TrainState", "TrainingError", "train", "lr_factor"]
