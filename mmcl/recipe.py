"""The recipe: every section of a training YAML, as validated dataclasses.

``model`` and ``objective`` are chosen by ``name`` from the registries in ``mmcl.models`` and
``mmcl.objectives``; their remaining keys are checked by the chosen entry's own dataclass.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mmcl import config as C
from mmcl.config import spec
from mmcl.data import DataConfig


@dataclass
class RunConfig:
    """Where outputs go and how randomness starts."""

    output_dir: str = "runs/run"
    seed: int = spec(0, ge=0)
    name: str | None = None


@dataclass
class OptimConfig:
    """AdamW, SGD or LARS with a warmup + cosine (or constant) schedule."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = spec(5e-4, gt=0)
    momentum: float = spec(0.9, ge=0, lt=1, help="sgd and lars")
    weight_decay: float = spec(0.1, ge=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = spec(1e-6, gt=0)
    warmup_steps: int = spec(0, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = spec(0.0, ge=0, le=1)
    grad_clip: float | None = spec(1.0, gt=0)
    grad_accum: int = spec(1, ge=1)


@dataclass
class TrainConfig:
    """Length of the run, and how often to log, checkpoint and evaluate (in optimizer steps)."""

    steps: int = spec(1000, ge=1)
    log_every: int = spec(10, ge=1)
    save_every: int = spec(0, ge=0, help="0: only at the end")
    eval_every: int = spec(0, ge=0, help="0: only at the end")
    keep_checkpoints: int = spec(2, ge=1)
    max_bad_steps: int = spec(10, ge=1, help="consecutive NaN/inf losses before the run stops")
    progress: bool = True
    sync_bn: bool = spec(False, help="BatchNorm statistics over all processes (SyncBatchNorm)")


@dataclass
class EvalConfig:
    """Evaluations run during and after training."""

    zeroshot_shards: str | None = None
    retrieval_shards: str | None = None
    templates: Any = "openai"
    class_names: list[str] | None = None
    knn_train_shards: str | None = spec(None, help="labelled reference set for kNN / linear probes")
    knn_shards: list[str] = spec(default_factory=list, help="test sets for kNN / linear probes")
    knn_k: int = spec(20, ge=1)
    knn_temperature: float = spec(0.07, gt=0)
    linear: bool = spec(False, help="also fit a linear probe on knn_train_shards")

    def requested(self) -> bool:
        """True if any evaluation is configured."""
        return bool(self.zeroshot_shards or self.retrieval_shards or (self.knn_train_shards and self.knn_shards))

    def validate(self) -> None:
        """kNN / linear probes need both a reference set and test sets."""
        if bool(self.knn_train_shards) != bool(self.knn_shards):
            raise C.ConfigError("eval: kNN / linear probes need both knn_train_shards and knn_shards")
    batch_size: int = spec(256, ge=1)
    num_workers: int = spec(2, ge=0)


@dataclass
class HubConfig:
    """Upload the final model to the Hugging Face Hub when training ends (token: HF_TOKEN or login cache)."""

    push: bool = False
    repo_id: str | None = spec(None, help="org/name")
    private: bool = True
    revision: str | None = spec(None, help="branch to push to (created if missing); default main")

    def validate(self) -> None:
        """``push`` needs a repo id of the form org/name."""
        if self.push and (not self.repo_id or self.repo_id.count("/") != 1):
            raise C.ConfigError("hub.push is true but hub.repo_id is not of the form org/name")


@dataclass
class Recipe:
    """A whole training recipe."""

    data: DataConfig
    model: Any = field(default=None, metadata={"plugin": "model"})
    objective: Any = field(default=None, metadata={"plugin": "objective"})
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    def validate(self) -> None:
        """Cross-section checks."""
        if self.model is None or self.objective is None:
            raise C.ConfigError("a recipe needs a 'model' and an 'objective' section, each with a 'name'")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and validate a recipe YAML (with ``--set key=value`` overrides)."""
    return C.load(Recipe, path, overrides)


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (written to the run folder as ``recipe.yaml``)."""
    return C.to_dict(recipe)


def replace(recipe: Recipe, **sections: Any) -> Recipe:
    """A copy of ``recipe`` with whole sections replaced."""
    return dataclasses.replace(recipe, **sections)
