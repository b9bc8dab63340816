"""One training loop for every method: Accelerate, AdamW + warmup/cosine, accumulation, clipping,
checkpoints with exact resume, NaN guards, logging and evaluation.

The loop never asks which method it runs. The model maps a batch to outputs, the objective
maps outputs to ``(loss, metrics)``, and either may define ``after_optimizer_step(step)``
(temperature clamps, momentum encoders, queues) which the loop calls after every update.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from mmcl.config import build, plugin_name
from mmcl.data import class_names, count_samples, expand_shards, make_loader
from mmcl.errors import MmclError
from mmcl.evaluate.run import flat_metrics
from mmcl.optim import build_optimizer
from mmcl.recipe import Recipe, recipe_dict


class TrainingError(MmclError):
    """The run cannot continue (e.g. the loss stayed NaN/inf for too many steps)."""


class TrainState:
    """Counters saved in checkpoints: optimizer steps, data position of every process, bad steps."""

    def __init__(self) -> None:
        self.step = 0
        self.positions: list[list[int]] = []  # per rank: [epoch, batches consumed in that epoch]
        self.bad_steps = 0

    def state_dict(self) -> dict[str, Any]:
        """Plain data for ``accelerator.save_state``."""
        return {"step": self.step, "positions": self.positions, "bad_steps": self.bad_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`."""
        self.step, self.positions, self.bad_steps = state["step"], state["positions"], state["bad_steps"]


def lr_factor(step: int, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def to_device(batch: Any, device: torch.device) -> Any:
    """Move tensors (also inside lists and dicts) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [to_device(v, device) for v in batch]
    return batch


def find_checkpoint(out_dir: Path, resume: str) -> Path | None:
    """``latest`` -> newest ``checkpoints/step_*`` (None if there is none); otherwise the given path."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise MmclError(f"--resume {resume}: no such checkpoint folder")
        return path
    found = sorted((out_dir / "checkpoints").glob("step_*"))
    return found[-1] if found else None


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


class Trainer:
    """Runs one recipe. ``Trainer(recipe).fit(resume=None)`` returns the final model folder."""

    def __init__(self, recipe: Recipe):
        self.recipe = r = recipe
        self.out = Path(r.run.output_dir)
        trackers = []
        try:
            import tensorboard  # noqa: F401

            trackers.append("tensorboard")
        except ImportError:
            pass
        self.acc = Accelerator(gradient_accumulation_steps=r.optim.grad_accum, log_with=trackers or None,
                               project_dir=str(self.out))
        set_seed(r.run.seed)
        self.model = build("model", r.model)
        if r.train.sync_bn and self.acc.num_processes > 1:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        # evaluation during training preprocesses images as the saved model will
        self.model.mmcl_config = {"preprocess": r.data.preprocess()}
        self.objective = build("objective", r.objective)
        if hasattr(self.objective, "setup"):  # heads sized to the model, momentum copies of it
            self.objective.setup(self.model, r.train.steps)
        tokenizer = self.model.tokenizer() if r.data.kind == "image_text" else None
        self.loader = make_loader(r.data, tokenizer=tokenizer, seed=r.run.seed)
        trains_objective = any(p.requires_grad for p in self.objective.parameters())
        self.optimizer = build_optimizer(r.optim, [self.model, self.objective])
        o = r.optim
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, r.train.steps, o.warmup_steps, o.schedule, o.min_lr_ratio))
        # The scheduler is stepped by hand once per optimizer step (Accelerate's wrapper would step it
        # once per process), and checkpointed as a custom object.
        if trains_objective:  # an objective with its own trained heads is wrapped (DDP) like the model
            self.model, self.objective, self.optimizer = self.acc.prepare(self.model, self.objective, self.optimizer)
        else:
            self.model, self.optimizer = self.acc.prepare(self.model, self.optimizer)
            self.objective.to(self.acc.device)
        self.state = TrainState()
        self.acc.register_for_checkpointing(self.scheduler, self.state)
        if not trains_objective and list(self.objective.state_dict()):
            self.acc.register_for_checkpointing(self.objective)

    # ------------------------------------------------------------------------------ helpers
    @property
    def unwrapped(self) -> torch.nn.Module:
        """The model without DDP/compile wrappers."""
        return self.acc.unwrap_model(self.model)

    def _log(self, record: dict[str, Any]) -> None:
        if self.acc.is_main_process:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.acc.log(scalars, step=record["step"])

    def _skip_counts(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for counts in gather_object([dict(self.loader.skipped)]):
            total.update(counts)
        return dict(total)

    def save_checkpoint(self, epoch: int, batches: int) -> None:
        """Save model, optimizer, scheduler, RNG and data position of every process."""
        pos = self.acc.gather(torch.tensor([[epoch, batches]], device=self.acc.device)).tolist()
        self.state.positions = pos
        path = self.out / "checkpoints" / f"step_{self.state.step:08d}"
        self.acc.save_state(str(path))
        if self.acc.is_main_process:
            for old in sorted((self.out / "checkpoints").glob("step_*"))[: -self.recipe.train.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()

    def evaluate(self) -> list[dict[str, Any]]:
        """Zero-shot and retrieval on the recipe's eval shards (every process takes part)."""
        from mmcl.evaluate.run import run_evals

        return run_evals(self.unwrapped, self.recipe.eval, device=self.acc.device)

    # ------------------------------------------------------------------------------ loop
    def fit(self, resume: str | None = None) -> Path:
        """Train to ``train.steps`` optimizer steps; returns ``RUN/final``."""
        r, acc = self.recipe, self.acc
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "recipe.yaml").write_text(yaml.safe_dump(recipe_dict(r), sort_keys=False))
        acc.init_trackers(r.run.name or self.out.name, config=_flat(recipe_dict(r)))
        start_epoch, skip = 0, 0
        if resume:
            ckpt = find_checkpoint(self.out, resume)
            if ckpt is None:
                acc.print(f"no checkpoint in {self.out / 'checkpoints'}; starting from scratch")
            else:
                acc.load_state(str(ckpt))
                start_epoch, skip = self.state.positions[acc.process_index]
                acc.print(f"resumed from {ckpt} at step {self.state.step}")
        if self.state.step >= r.train.steps:
            return self._finish(time.perf_counter(), {})

        bar = tqdm(total=r.train.steps, initial=self.state.step, disable=not (acc.is_main_process and r.train.progress),
                   desc="train", dynamic_ncols=True)
        window: dict[str, list[float]] = defaultdict(list)
        window_bad = consecutive_bad = 0
        epoch, batches, current = start_epoch, 0, start_epoch
        t0 = t_log = time.perf_counter()
        samples, waited = 0, {"s": 0.0}
        evals: list[dict[str, Any]] = []
        self.model.train()
        for epoch, batch in _timed(self.loader.forever(start_epoch), waited):
            if epoch != current:
                current, batches = epoch, 0
            batches += 1
            if epoch == start_epoch and batches <= skip:
                continue  # fast-forward to where the checkpoint stopped reading
            batch = to_device(batch, acc.device)
            with acc.accumulate(self.model, self.objective):
                with acc.autocast():
                    out = self.model(batch)
                    loss, metrics = self.objective(out, batch)
                bad = acc.reduce(torch.tensor(float(not torch.isfinite(loss)), device=acc.device), "sum").item()
                if bad:
                    window_bad = 1
                else:
                    acc.backward(loss)
                    if acc.sync_gradients and r.optim.grad_clip:
                        params = [p for g in self.optimizer.param_groups for p in g["params"]]
                        metrics["grad_norm"] = acc.clip_grad_norm_(params, r.optim.grad_clip)
                if not (acc.sync_gradients and window_bad):
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            samples += len(batch["key"]) * acc.num_processes
            if not bad:
                window["loss"].append(loss.detach().float().item())
                for k, v in metrics.items():
                    window[k].append(float(v))
            if not acc.sync_gradients:
                continue
            if window_bad:
                self.state.bad_steps += 1
                consecutive_bad += 1
                window_bad = 0
                if consecutive_bad >= r.train.max_bad_steps:
                    raise TrainingError(f"the loss was NaN or inf for {consecutive_bad} steps in a row (step "
                                        f"{self.state.step}); lower optim.lr, check the data, or use bf16/fp32")
                continue
            consecutive_bad = 0
            self.scheduler.step()
            self.state.step += 1
            for m in (self.unwrapped, acc.unwrap_model(self.objective)):
                hook = getattr(m, "after_optimizer_step", None)
                if hook is not None:
                    hook(self.state.step)
            step = self.state.step
            bar.update(1)
            if step % r.train.log_every == 0 or step == r.train.steps:
                names = sorted(window)
                means = acc.reduce(torch.tensor([sum(window[k]) / len(window[k]) for k in names],
                                                device=acc.device), "mean").tolist() if names else []
                now = time.perf_counter()
                record = {"step": step, "epoch": epoch, **dict(zip(names, means)),
                          "lr": self.scheduler.get_last_lr()[0], "samples_per_s": samples / max(1e-9, now - t_log),
                          "data_wait": waited["s"] / max(1e-9, now - t_log),
                          "bad_steps": self.state.bad_steps, "skipped": self._skip_counts()}
                if acc.device.type == "cuda":  # peak memory of this process since the start, GiB
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
                self._log(record)
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.3f}")
                window.clear()
                samples, t_log, waited["s"] = 0, now, 0.0
            if r.train.eval_every and step % r.train.eval_every == 0 and step != r.train.steps:
                evals = self.evaluate()
                self._log({"step": step, **flat_metrics(evals)})
            if (r.train.save_every and step % r.train.save_every == 0) or step == r.train.steps:
                self.save_checkpoint(epoch, batches)
            if step >= r.train.steps:
                break
        bar.close()
        return self._finish(t0, evals)

    def _finish(self, t0: float, evals: list[dict[str, Any]]) -> Path:
        r, acc = self.recipe, self.acc
        wall = time.perf_counter() - t0
        if r.eval.requested():
            evals = self.evaluate()
            self._log({"step": self.state.step, **flat_metrics(evals)})
        final = self.out / "final"
        skipped = self._skip_counts()  # a collective: every process takes part
        if acc.is_main_process:
            from mmcl.hub import save_pretrained

            info = self._model_info(wall, evals, skipped)
            save_pretrained(self.unwrapped, final, name=plugin_name("model", r.model), preprocess=r.data.preprocess(),
                            info=info)
            (self.out / "summary.json").write_text(json.dumps({k: v for k, v in info.items() if k != "recipe"},
                                                              indent=2) + "\n")
        acc.wait_for_everyone()
        acc.end_training()
        if r.hub.push and acc.is_main_process:
            self._push(final)
        return final

    def _model_info(self, wall: float, evals: list[dict[str, Any]], skipped: dict[str, int]) -> dict[str, Any]:
        """What the saved model's config and card say about this run."""
        r, acc = self.recipe, self.acc
        urls = expand_shards(r.data.train_shards)
        return {
            "run_name": r.run.name or self.out.name,
            "objective": plugin_name("objective", r.objective),
            "recipe": recipe_dict(r),
            "train": {"steps": self.state.step, "global_batch": r.data.batch_size * acc.num_processes
                      * r.optim.grad_accum, "processes": acc.num_processes, "wall_s": round(wall, 1),
                      "mixed_precision": acc.mixed_precision, "bad_steps": self.state.bad_steps,
                      "lr": r.optim.lr, "weight_decay": r.optim.weight_decay, "warmup_steps": r.optim.warmup_steps,
                      "schedule": r.optim.schedule},
            "data": {"train_shards": r.data.train_shards, "train_samples": count_samples(urls),
                     "class_names": class_names(urls), "skipped": skipped},
            "eval": evals,
        }

    def _push(self, final: Path) -> None:
        """Upload the final model (``hub.push: true``); the local folder is complete whatever happens."""
        from mmcl.hub import push

        h = self.recipe.hub
        try:
            url = push(final, h.repo_id, private=h.private, revision=h.revision,
                       commit_message=f"mmcl: {self.recipe.run.name or self.out.name}, step {self.state.step}")
        except MmclError as e:
            raise MmclError(f"{e}\nThe trained model is saved in {final}; push it later with "
                            f"`mmcl push --model {final} --repo-id {h.repo_id}`") from None
        self.acc.print(f"pushed to {url}")


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
