"""The recipe: every section of a training YAML, as validated dataclasses.

``model`` and ``objective`` are chosen by ``name`` from the registries in ``mmcl.models`` and
``mmcl.objectives``; their remaining keys are checked by the chosen entry's own dataclass. When the
recipe loads, :func:`check_contract` checks that the data kind, the model and the objective fit
together (from what each declares, without building anything) and :func:`check_transforms` that
the transforms it names exist.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import mmcl.models  # noqa: F401  (the recipe layer imports the built-in plugins, which register themselves)
import mmcl.objectives  # noqa: F401
from mmcl import config as C
from mmcl.config import spec
from mmcl.data import DataConfig
from mmcl.data.transforms import transform_names
from mmcl.objectives.base import Objective
from mmcl.registry import model_declaration, plugin_name, registered


@dataclass
class RunConfig:
    """Where outputs go and how randomness starts."""

    output_dir: str = spec("runs/run", nonempty=True)
    seed: int = spec(0, ge=0, le=2**32 - 1, help="numpy's seed range")
    name: str | None = None


@dataclass
class OptimConfig:
    """AdamW, SGD or LARS with a warmup + cosine (or constant) schedule."""

    name: Literal["adamw", "sgd", "lars"] = "adamw"
    lr: float = spec(5e-4, gt=0)
    momentum: float = spec(0.9, ge=0, lt=1, help="sgd and lars")
    weight_decay: float = spec(0.1, ge=0)
    betas: list[float] = spec(default_factory=lambda: [0.9, 0.98], ge=0, lt=1, length=2, help="adamw")
    eps: float = spec(1e-6, gt=0)
    warmup_steps: int = spec(0, ge=0, help="may exceed train.steps (the whole run warms up), as smoke tests do")
    schedule: Literal["cosine", "constant"] = "cosine"
    min_lr_ratio: float = spec(0.0, ge=0, le=1)
    exempt_lr_scale: float = spec(1.0, gt=0, help="lr of the biases, norms and gains (the parameters exempt from "
                                                  "weight decay and LARS' trust ratio) as a multiple of optim.lr, "
                                                  "on the same schedule: Barlow Twins trains them at 0.0048 / 0.2")
    grad_clip: float | None = spec(1.0, gt=0)
    grad_accum: int = spec(1, ge=1)
    fused: bool = spec(False, help="adamw and sgd: torch's fused kernel, one launch for every parameter (CUDA, "
                                   "and CPU in recent torch); equal to the default to float round-off")

    def validate(self) -> None:
        """LARS is mmcl's own optimizer: it has no fused kernel."""
        if self.fused and self.name == "lars":
            raise C.ConfigError("optim.fused: LARS has no fused kernel; set optim.fused=false or use adamw/sgd")


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
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = spec(
        "auto", help="auto: what `accelerate launch --mixed_precision` (or its config file) says")
    compile: bool = spec(False, help="torch.compile the model (inductor); the first steps take longer")
    channels_last: bool = spec(False, help="weights and image batches in channels-last memory order: faster "
                                           "convolutions on GPUs with bf16/fp16 (CNN towers); same results")
    vote: Literal["auto", "host", "device"] = spec(
        "auto", help="where the skip-a-NaN-step vote is decided: device (no host synchronisation per step; needs "
                     "optim.fused, not fp16, an objective without after-step state), host, or auto (device where "
                     "possible)")
    tf32: bool = spec(True, help="TensorFloat-32 for float32 matrix products and convolutions on GPUs, as open_clip's "
                                 "training sets it (the losses, computed in float32, run several times faster on "
                                 "Ampere and later); false: full float32")
    dist_timeout_s: int = spec(7200, ge=60, help="how long a process waits in a collective for the others (while one "
                                                 "writes and hashes a checkpoint or final/); NCCL's own is 10 minutes")
    grad_cache: int = spec(0, ge=0, help="0: off. N: gradient caching (mmcl.gradcache): the model sees N samples "
                                         "at a time, the loss the whole batch; the forward passes of all chunks but "
                                         "one run twice")
    grad_cache_keep_last: bool = spec(True, help="with train.grad_cache (or optim.grad_accum merging micro-batches): "
                                                 "the last chunk keeps its first pass's graph through the loss instead "
                                                 "of running again (one forward pass fewer per step; its activations "
                                                 "are then held while the loss is taken); false: every chunk runs "
                                                 "twice")
    trackers: list[str] | None = spec(None, help="experiment trackers the logs also go to, through Accelerate "
                                                 "(tensorboard, wandb, mlflow, aim, comet_ml, clearml, dvclive, "
                                                 "swanlab, trackio), with the recipe as the run's config; null: "
                                                 "tensorboard if installed; []: none")

    def validate(self) -> None:
        """Tracker names Accelerate knows, whose package is installed (a missing one would fail when the
        run starts, after the model is built)."""
        import importlib.util

        for name in self.trackers or []:
            if name not in TRACKERS:
                raise C.ConfigError(f"train.trackers: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise C.ConfigError(f"train.trackers names {name}, which is not installed: pip install "
                                    f"{TRACKERS[name].replace('_', '-')}")

    def tracker_names(self) -> list[str]:
        """The trackers to start: ``trackers``, or tensorboard if it is installed and none are named."""
        if self.trackers is not None:
            return list(self.trackers)
        import importlib.util

        return ["tensorboard"] if importlib.util.find_spec("tensorboard") is not None else []
    fsdp: bool = spec(False, help="shard the model's weights, gradients and optimizer state over the processes "
                                  "(FSDP2 through Accelerate, mmcl.fsdp; GPU processes): for towers that do not fit "
                                  "one GPU. Checkpoints and final/ stay unsharded, as a DDP run writes them")


# Accelerate's trackers, by the name a recipe gives, and the package each needs
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "aim": "aim",
            "comet_ml": "comet_ml", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
            "trackio": "trackio"}


@dataclass
class EvalConfig:
    """Evaluations run during and after training."""

    zeroshot_shards: str | None = None
    retrieval_shards: str | None = None
    templates: str | list[str] = spec("openai", nonempty=True,
                                      help="a set name (openai, simple, mnist, digits) or a list of '{}' strings")
    class_names: list[str] | None = spec(None, nonempty=True)
    knn_train_shards: str | None = spec(None, help="labelled reference set for kNN / linear probes")
    knn_shards: list[str] = spec(default_factory=list, help="test sets for kNN / linear probes")
    knn_k: int = spec(20, ge=1)
    knn_temperature: float = spec(0.07, gt=0)
    linear: bool = spec(False, help="also fit a linear probe on knn_train_shards")
    batch_size: int = spec(256, ge=1)
    num_workers: int = spec(2, ge=0)

    def requested(self) -> bool:
        """True if any evaluation is configured."""
        return bool(self.zeroshot_shards or self.retrieval_shards or (self.knn_train_shards and self.knn_shards))

    def validate(self) -> None:
        """kNN / linear probes need both a reference set and test sets; zero-shot templates must
        resolve now, not after the training run they evaluate."""
        if bool(self.knn_train_shards) != bool(self.knn_shards):
            raise C.ConfigError("eval: kNN / linear probes need both knn_train_shards and knn_shards")
        if self.zeroshot_shards:
            from mmcl.evaluate.templates import template_set

            try:
                template_set(self.templates)
            except C.ConfigError as e:
                raise C.ConfigError(f"eval.{e}") from None


@dataclass
class HubConfig:
    """Upload the final model to the Hugging Face Hub when training ends (token: HF_TOKEN or login cache)."""

    push: bool = False
    repo_id: str | None = spec(None, help="org/name")
    private: bool = True
    revision: str | None = spec(None, help="branch to push to (created if missing); default main")
    license: str = spec("apache-2.0", help="the model card's license (a Hub license id, e.g. mit, cc-by-4.0, other)")

    def validate(self) -> None:
        """``push`` needs a repo id of the form org/name."""
        if self.push and (not self.repo_id or self.repo_id.count("/") != 1):
            raise C.ConfigError("hub.push is true but hub.repo_id is not of the form org/name")


_PROBABILITY = (float, {"ge": 0, "le": 1})
_CROP_SCALE = (list[float], {"gt": 0, "le": 1, "length": 2, "ordered": True})

# Allowed values of ``data`` keys whose fields (in mmcl.data) carry no spec() range. Checked by
# Recipe.validate; a rule moves onto its field's spec(...) once that module states it itself.
DATA_RULES: dict[str, tuple[Any, dict[str, Any]]] = {
    "train_shards": (str, {"nonempty": True}),
    "mean": (list[float], {"nonempty": True}),
    "std": (list[float], {"gt": 0, "nonempty": True}),
    "image_keys": (list[str], {"nonempty": True}),
    "text_key": (str, {"nonempty": True}),
    "multi_crop.global_scale": _CROP_SCALE,
    "multi_crop.local_scale": _CROP_SCALE,
}

# Allowed values of the augmentation arguments in the free-form ``data.transform_args``, by name
# (the keyword arguments of the transforms in mmcl/data/transforms.py). Unknown names are left
# to the transform, which rejects them when the loader is built.
TRANSFORM_ARG_RULES: dict[str, tuple[Any, dict[str, Any]]] = {
    "crop_scale": _CROP_SCALE,
    "scale": (list[float], {"gt": 0, "length": 2, "ordered": True}),
    "flip": _PROBABILITY,
    "jitter": _PROBABILITY,
    "grayscale": _PROBABILITY,
    "blur": _PROBABILITY,
    "solarize": _PROBABILITY,
    "strength": (float, {"ge": 0}),
    "degrees": (float, {"ge": 0, "le": 180}),
    "translate": (float, {"ge": 0, "le": 1}),
}


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
        """Cross-section checks: the ranges in :data:`DATA_RULES` and :data:`TRANSFORM_ARG_RULES`, the
        transform names, the (data kind, model, objective) contract, then the model config's and the
        objective's own checks against the rest of the recipe."""
        if self.model is None or self.objective is None:
            raise C.ConfigError("a recipe needs a 'model' and an 'objective' section, each with a 'name'")
        if self.train.grad_cache >= self.data.batch_size:
            raise C.ConfigError(f"train.grad_cache ({self.train.grad_cache}) must be below data.batch_size "
                                f"({self.data.batch_size}): it is the size of the chunks a batch is embedded in")
        for path, (tp, rules) in DATA_RULES.items():
            node: Any = self.data
            for part in path.split("."):
                node = getattr(node, part) if node is not None else None
            if node is not None:  # None: an unset optional section such as data.multi_crop
                C.checked(tp, node, f"data.{path}", **rules)
        if len(self.data.mean) != len(self.data.std):
            raise C.ConfigError(f"data.mean and data.std need one value per channel each, "
                                f"got {len(self.data.mean)} and {len(self.data.std)}")
        for key, value in self.data.transform_args.items():
            if key in TRANSFORM_ARG_RULES:
                tp, rules = TRANSFORM_ARG_RULES[key]
                C.checked(tp, value, f"data.transform_args.{key}", **rules)
        check_transforms(self.data)
        check_contract(self)
        check_model = getattr(self.model, "check_recipe", None)  # a model config's checks against the recipe
        if check_model is not None:
            check_model(self)
        for cls, cfg, where in objective_parts(self):
            try:
                cls.check_recipe(cfg, self)
            except C.ConfigError as e:  # an objective names its keys objective.KEY; a part's are where.KEY
                raise C.ConfigError(re.sub(r"\bobjective\.(?!parts\[)", f"{where}.", str(e))) from None
        check_views(self)
        if self.train.fsdp and self.eval.requested():
            raise C.ConfigError("train.fsdp: evaluation during training (eval.*) is not supported with a sharded model "
                                "(each process evaluates its own share of the data, and a sharded forward pass needs "
                                "every process); unset the eval shards and evaluate RUN/final with `mmcl eval`")
        if self.train.fsdp and self.train.sync_bn:
            raise C.ConfigError("train.fsdp does not keep BatchNorm statistics (train.sync_bn); use towers without "
                                "BatchNorm, or set train.fsdp: false")
        if self.train.vote == "device" and (why := device_vote_obstacle(self)):
            raise C.ConfigError(f"train.vote: device is not possible here: {why}; set train.vote: auto")


def objective_class(cfg: Any) -> type[Objective]:
    """The registered :class:`Objective` subclass of a validated objective config; a plugin registered
    otherwise (a builder function) is refused, since it declares nothing a recipe can be checked against."""
    name = plugin_name("objective", cfg)
    builder = registered("objective")[name][1]
    if not (isinstance(builder, type) and issubclass(builder, Objective)):
        raise C.ConfigError(f"objective.name {name} is registered as {getattr(builder, '__qualname__', builder)}, "
                            "not a subclass of mmcl.objectives.base.Objective: register the Objective subclass, "
                            "which declares the data kinds and model outputs it needs")
    return builder


def objective_parts(recipe: Recipe) -> list[tuple[type[Objective], Any, str]]:
    """The recipe's objective, or the parts of a combined one, as ``(class, config, recipe key)``
    (see :meth:`Objective.components`): what the contract checks."""
    return objective_class(recipe.objective).components(recipe.objective)


def data_kinds_provided(data: DataConfig) -> set[str]:
    """What the batches hold, as data kinds: ``data.kind``, and ``multi_view`` too for image-text data
    with ``data.view_transforms`` (each image's augmented views beside the pair, for SLIP)."""
    return {data.kind} | ({"multi_view"} if data.kind == "image_text" and data.view_transforms else set())


def _kinds(kinds: frozenset[str]) -> str:
    return " or ".join(sorted(kinds))


def check_contract(recipe: Recipe) -> None:
    """The recipe's data kind, model and objective fit together, by what they declare: the model
    produces every output the objective reads (:attr:`Objective.needs_outputs` against
    :func:`mmcl.registry.model_declaration`), and both read ``data.kind``. A mismatch is one
    :class:`ConfigError` naming the keys, what is missing and the models that would fit, where it
    used to load and then fail at the first step (``KeyError: 'image_features'``)."""
    m, kind = plugin_name("model", recipe.model), recipe.data.kind
    declared = model_declaration(m)
    if declared is None:
        o = plugin_name("objective", recipe.objective)
        raise C.ConfigError(f"model.name {m} does not declare the data kinds it reads and the outputs it produces "
                            f"(class attributes data_kinds and outputs), so objective.name {o} cannot be checked "
                            "against it")
    model_kinds, outputs = declared
    configured = getattr(recipe.model, "configured_outputs", None)  # outputs only some configurations add
    outputs = (*outputs, *configured()) if configured else outputs
    provided = data_kinds_provided(recipe.data)
    for objective, cfg, where in objective_parts(recipe):
        o = plugin_name("objective", cfg)
        missing = [x for x in objective.needs_outputs if x not in outputs]
        if missing:
            about = f" ({objective.needs_model})" if objective.needs_model else ""
            raise C.ConfigError(f"{where}.name {o} reads model output{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(missing)}, which model.name {m} does not produce (it produces "
                                f"{', '.join(outputs)}); objective {o} needs {objective.fitting_models_text()}{about}")
        if not objective.data_kinds & provided:
            views = " (or image_text with data.view_transforms naming its views)" \
                if "multi_view" in objective.data_kinds else ""
            raise C.ConfigError(f"{where}.name {o} trains on data.kind {_kinds(objective.data_kinds)}{views}, "
                                f"but data.kind is {kind}")
    if kind not in model_kinds:
        raise C.ConfigError(f"model.name {m} reads data.kind {_kinds(model_kinds)}, but data.kind is {kind}")


def merged_micro_batches(recipe: Recipe) -> int:
    """How many micro-batches each optimizer step merges into one contrastive batch: ``optim.grad_accum``
    for an objective whose loss couples the samples of a batch (:attr:`Objective.couples_batch`),
    else 1 (plain accumulation)."""
    return recipe.optim.grad_accum if any(cls.couples_batch for cls, _, _ in objective_parts(recipe)) else 1


def device_vote_obstacle(recipe: Recipe, fp16_scaler: bool = False) -> str | None:
    """Why the bad-step vote cannot stay on the device for ``recipe`` (``train.vote``), or None: the
    optimizer must skip a step by itself (fused AdamW/SGD told ``found_inf``), fp16's grad scaler
    keeps its own vote, and an objective that updates state after each step (queues, teachers) must
    know on the host whether the step applied."""
    if not recipe.optim.fused:
        return "optim.fused is false (only the fused AdamW/SGD kernels skip a step on the device)"
    if fp16_scaler or recipe.train.mixed_precision == "fp16":
        return "fp16 training: its grad scaler keeps its own vote"
    for objective, cfg, _ in objective_parts(recipe):
        if objective.after_optimizer_step is not Objective.after_optimizer_step:
            return f"objective {plugin_name('objective', cfg)} updates state after each step"
    return None


def check_views(recipe: Recipe) -> None:
    """A model of per-view embeddings makes at least the objective's ``min_views`` (checked after the
    objective's own ``check_recipe``, whose messages about crops are more specific)."""
    m = plugin_name("model", recipe.model)
    views = getattr(recipe.model, "output_views", None)  # a per-view model config says how many it makes
    for objective, cfg, where in objective_parts(recipe):
        o = plugin_name("objective", cfg)
        if "z:views" in objective.needs_outputs and views is not None and views(recipe.data) < objective.min_views:
            d = recipe.data
            source = (f"data.view_fields names {len(d.view_fields)} fields" if d.view_fields
                      else f"data.views is {d.views}")
            raise C.ConfigError(f"{where}.name {o} compares {objective.min_views} or more views of each sample, but "
                                f"model.name {m} makes {views(d)} here ({source}); set data.views: "
                                f"{objective.min_views}{' or name more view_fields' if d.view_fields else ''}")


def check_transforms(data: DataConfig) -> None:
    """Every transform the data section names is registered (did-you-mean otherwise), and
    ``data.view_transforms``, when given for multi-view data, names one per view: errors the loader
    would otherwise raise only when the run starts."""
    names = transform_names()
    named = [("data.transform", data.transform)]
    named += [(f"data.view_transforms[{i}]", n) for i, n in enumerate(data.view_transforms)]
    if data.multi_crop is not None and data.multi_crop.local_transform is not None:
        named.append(("data.multi_crop.local_transform", data.multi_crop.local_transform))
    for key, name in named:
        if name not in names:
            raise C.ConfigError(f"{key}: unknown transform {name!r}{C._suggest(name, names)}")
    if data.kind == "multi_view" and data.view_transforms:
        n_views = len(data.view_fields) or data.views
        if len(data.view_transforms) != n_views:
            source = (f"data.view_fields names {n_views} fields" if data.view_fields
                      else f"data.views is {n_views}")
            raise C.ConfigError(f"data.view_transforms names {len(data.view_transforms)} transforms for "
                                f"{n_views} views ({source})")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load and validate a recipe YAML (with ``--set key=value`` overrides).

    >>> import pathlib, tempfile, yaml
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "clip.yaml"
    >>> _ = path.write_text(yaml.safe_dump({
    ...     "data": {"train_shards": "shards/train-{000000..000009}.tar", "image_size": 32},
    ...     "model": {"name": "clip", "open_clip_config": "mmcl-tiny-vit"},
    ...     "objective": {"name": "clip"}}))
    >>> recipe = load_recipe(path, ["train.steps=10", "optim.lr=1e-3"])
    >>> recipe.train.steps, recipe.optim.lr, recipe.data.batch_size   # the rest keeps its defaults
    (10, 0.001, 256)
    >>> load_recipe(path, ["train.stepz=10"])
    Traceback (most recent call last):
    mmcl.errors.ConfigError: ...train.stepz...
    """
    return C.load(Recipe, path, overrides)


def recipe_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (written to the run folder as ``recipe.yaml``)."""
    return C.to_dict(recipe)


def replace(recipe: Recipe, **sections: Any) -> Recipe:
    """A copy of ``recipe`` with whole sections replaced."""
    return dataclasses.replace(recipe, **sections)
