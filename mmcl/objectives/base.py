"""The contract of an objective: what it needs from the data and the model, and the hooks the
trainer calls.

Every objective subclasses :class:`Objective` and states, as class attributes, the kinds of data
it trains on (``data_kinds``, values of ``data.kind``) and the model outputs it reads
(``needs_outputs``, names from :data:`OUTPUTS`). Models declare the same from their side
(:func:`mmcl.registry.model_declaration`), so :mod:`mmcl.recipe` checks a recipe's data kind, model
and objective against each other when the recipe loads, without building anything: a wrong pair
is a one-line :class:`~mmcl.errors.ConfigError` naming the keys, not a ``KeyError`` at step 1.
What depends on more of the recipe (crops against ``data.views``, a queue against the batch) is
the objective's :meth:`Objective.check_recipe`, called by the recipe right after.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import torch
from torch import nn

from mmcl.errors import ConfigError
from mmcl.registry import model_declaration, registered

# The model outputs an objective can read, by name: the key of the model's ``forward`` dict and,
# where one key holds different things in different models, its form after a colon. A model's
# ``outputs`` declaration lists what it produces in every configuration, which is what the recipe
# compares with ``needs_outputs`` at load; an output that only some configurations produce (CLIP's
# ``logit_bias``) is named in ``needs_configured_outputs`` and checked by the objective's
# ``check_recipe`` against the model's config.
OUTPUTS: dict[str, str] = {
    "image_features": "[B, D] normalised image embeddings",
    "text_features": "[B, D] normalised text embeddings",
    "logit_scale": "the scalar 1/τ that multiplies the image-text similarities",
    "logit_bias": "the learnable scalar added to the scaled image-text similarities (SigLIP); model clip "
                  "produces it only with model.init_logit_bias set",
    "h:views": "out['h']: backbone features, one [B, F] tensor per view",
    "z:views": "out['z']: projections, one [B, D] tensor per view",
    "z:grid": "out['z']: patch embeddings [B, G, G, D] of the first view",
    "c:grid": "out['c']: contexts [B, G, G, C], each from its patch's row and the rows above",
}


class Objective(nn.Module):
    """Base of every objective: ``forward(outputs, batch) -> (loss, metrics)`` plus the hooks the
    trainer calls, and the declarations the recipe is checked against when it loads.

    ``per_process_buffers`` names buffers that hold each process's own data (SwAV's queue): DDP does
    not overwrite them with rank 0's and checkpoints keep one per process.
    """

    #: values of ``data.kind`` this objective trains on
    data_kinds: ClassVar[frozenset[str]] = frozenset()
    #: names (keys of :data:`OUTPUTS`) of the model outputs ``forward`` reads
    needs_outputs: ClassVar[tuple[str, ...]] = ()
    #: outputs ``forward`` also reads that a model produces only when its config says so (SigLIP's
    #: ``logit_bias``): not in the static declarations the recipe compares, so ``check_recipe`` checks them
    needs_configured_outputs: ClassVar[tuple[str, ...]] = ()
    #: in words, the model that fits: shown with the models that do when a recipe pairs another one
    needs_model: ClassVar[str] = ""
    #: attributes of the built model that ``setup`` reads (checked by :meth:`check_model`)
    needs_model_attributes: ClassVar[tuple[str, ...]] = ()
    #: with ``z:views``: the fewest views per sample the model must produce (checked at load against
    #: the model config's ``output_views(data)``)
    min_views: ClassVar[int] = 1
    per_process_buffers: ClassVar[tuple[str, ...]] = ()
    #: whether the loss of a sample depends on the other samples of its batch (negatives, a batch
    #: normaliser such as Sinkhorn or a centre): then ``optim.grad_accum`` merges its micro-batches into
    #: one contrastive batch (gradient caching, :mod:`mmcl.gradcache`), since accumulating separate
    #: micro-batches would train on smaller batches than the recipe says. False: a per-sample loss
    #: (against a momentum target, a queue or a memory bank), for which plain accumulation is exact
    couples_batch: ClassVar[bool] = True

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Called once the model exists, before the optimizer: heads sized to the model, momentum
        copies of it. Nothing by default."""

    def after_optimizer_step(self, step: int) -> None:
        """Called after every optimizer step: momentum updates, queues, schedules. Nothing by default."""

    def check_deferred(self) -> None:
        """Called on every process where the trainer reads the device anyway (logging windows,
        checkpoints, the end), before a checkpoint or the final model is written: raise here for
        what the steps recorded on the device instead of checking at once (a check per step would
        make every step wait for the device), e.g. sample ids outside a memory bank. By default, the
        ``check_deferred`` of every submodule that has one (memory banks, the parts of a combined
        objective)."""
        def visit(parent: nn.Module) -> None:
            for module in parent.children():
                if hasattr(module, "check_deferred"):
                    module.check_deferred()  # a part's or a bank's own (which covers what it holds)
                else:
                    visit(module)  # e.g. a ModuleList of banks

        visit(self)

    # ------------------------------------------------------------------ the step, for schedules
    def track_steps(self) -> None:
        """For an objective whose forward depends on the optimizer step (a schedule, a frozen head):
        the step is kept as a buffer, saved in checkpoints, and as a Python number that forward reads
        (:meth:`current_step`), so that forward neither waits for the device to read the buffer nor,
        compiled, sees a new constant (a recompilation) every step. Call it in ``__init__``, and
        :meth:`set_step` in ``after_optimizer_step``."""
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self._host_step: int | None = None  # read from the buffer after construction or a checkpoint's load
        reset_after_load(self, "_host_step", None)

    def set_step(self, step: int) -> None:
        self.step.fill_(step)
        self._host_step = step

    @torch.compiler.disable
    def current_step(self) -> int:
        """The optimizer steps taken so far (the buffer is read once, then kept by :meth:`set_step`)."""
        if self._host_step is None:
            self._host_step = int(self.step)
        return self._host_step

    @classmethod
    def check_recipe(cls, cfg: Any, recipe: Any) -> None:
        """Checks of the validated config ``cfg`` against the rest of ``recipe`` beyond the declared
        contract, raising :class:`ConfigError` naming the keys that disagree. By default: a
        ``predictor`` (BYOL, SimSiam, MoCo v3) maps the model's embeddings to embeddings compared
        with the model's, so its last width must be theirs (it was a shape error at step 1)."""
        predictor = getattr(cfg, "predictor", None)
        width = getattr(recipe.model, "embedding_width", lambda: None)()
        if predictor is not None and width is not None and predictor.dims[-1] != width:
            raise ConfigError(f"objective.predictor.dims ends with {predictor.dims[-1]} but the model's embeddings "
                              f"are {width} wide (model.projector.dims); end objective.predictor.dims with {width}")

    @classmethod
    def components(cls, cfg: Any, where: str = "objective") -> list[tuple[type[Objective], Any, str]]:
        """The objectives this one is made of, as ``(class, validated config, recipe key)``, which the
        recipe checks one by one against the data and the model: the objective itself, except for one
        that combines others (:mod:`mmcl.objectives.combined`), which lists its parts."""
        return [(cls, cfg, where)]

    @classmethod
    def check_model(cls, model: Any) -> None:
        """Refuse a built model that lacks an attribute ``setup`` reads (``needs_model_attributes``):
        for objectives set up outside a checked recipe, e.g. in tests."""
        if any(not hasattr(model, a) for a in cls.needs_model_attributes):
            raise ConfigError(f"objective {cls.registry_name()} needs {cls.fitting_models_text()}")

    @classmethod
    def registry_name(cls) -> str:
        """The name this class is registered under (its class name if it is not registered)."""
        return next((name for name, (_, builder) in registered("objective").items() if builder is cls), cls.__name__)

    @classmethod
    def fitting_models(cls) -> list[str]:
        """Registered models that produce every output this objective reads from a data kind it trains on."""
        fits = []
        for name in registered("model"):
            declared = model_declaration(name)
            if declared and declared[0] & cls.data_kinds and set(cls.needs_outputs) <= set(declared[1]):
                fits.append(name)
        return fits

    @classmethod
    def fitting_models_text(cls) -> str:
        """``model: {name: a} or model: {name: b}``, or what is missing when no registered model fits."""
        fits = cls.fitting_models()
        if not fits:
            return f"a model that produces {', '.join(cls.needs_outputs)} (no registered model does)"
        return " or ".join(f"model: {{name: {name}}}" for name in fits)


class ViewObjective(Objective):
    """Base of the objectives over per-view embeddings ``out["z"]`` of multi-view data (SimCLR, MoCo,
    BYOL, SimSiam, InvaSpread, InstDisc, SwAV, DINO, CMC): their shared declarations, two views at
    least unless a subclass says otherwise (InstDisc: one)."""

    data_kinds = frozenset({"multi_view"})
    needs_outputs = ("z:views",)
    min_views = 2
    needs_model = "an embedding per view"


def reset_after_load(module: nn.Module, attribute: str, value: Any) -> None:
    """Set ``module.<attribute>`` to ``value`` after every state-dict load: a host copy of a buffer
    is then read again from the loaded buffer. A module-level function and a partial, not a lambda,
    so the module still pickles (``torch.save(module)``, a ``spawn`` start method)."""
    module.register_load_state_dict_post_hook(functools.partial(_set_after_load, attribute=attribute, value=value))


def _set_after_load(module: nn.Module, keys: Any, *, attribute: str, value: Any) -> None:  # noqa: ARG001
    setattr(module, attribute, value)
