"""Several objectives trained at once, their losses added with weights (SLIP: CLIP's image-text loss
plus a self-supervised loss on the same image tower).

``objective: {name: combined, parts: [{name: simclr, weight: 1.0, temperature: 0.1}, {name: byol,
weight: 0.5}]}``: each part is an objective section of its own (checked by its own config) plus a
``weight``. The model's outputs and the batch go to every part; the loss is ``Σ weight · loss``;
each part's loss and metrics are logged under its name (``simclr/loss``, ``byol/momentum``). The
parts' hooks all run (momentum targets, queues), their parameters train with the model, and their
per-process buffers and checkpointed state live under ``parts.N``. The recipe checks every part
against the data kind and the model as it checks a lone objective (:meth:`Objective.components`),
so a part the model cannot feed is refused by its own key (``objective.parts[1].name``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmcl.config import checked, plugin_section, spec
from mmcl.errors import ConfigError
from mmcl.objectives.base import Objective
from mmcl.registry import build, register, registered


@dataclass
class CombinedConfig:
    """``parts``: objective sections, each with its ``name``, its own keys and a ``weight`` (1.0 by
    default); the names must differ (they name the logged metrics)."""

    parts: list[dict[str, Any]] = spec(nonempty=True, help="objective sections with a weight each, e.g. "
                                                           "[{name: clip, weight: 1.0}, {name: simclr, weight: 1.0}]")

    def validate(self) -> None:
        """Each part valid by its own objective's config; no part is itself combined; names differ."""
        self._parts: list[tuple[str, float, Any]] = []
        for i, raw in enumerate(self.parts):
            where = f"objective.parts[{i}]"
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}: expected an objective section such as {{name: simclr, weight: 1.0}}")
            section = {k: v for k, v in raw.items() if k != "weight"}
            weight = checked(float, raw.get("weight", 1.0), f"{where}.weight", gt=0)
            if section.get("name") == "combined":
                raise ConfigError(f"{where}.name: a part cannot itself be combined; list its parts here instead")
            self._parts.append((str(section.get("name")), weight, plugin_section("objective", section, where)))
        names = [name for name, _, _ in self._parts]
        if len(set(names)) != len(names):
            raise ConfigError(f"objective.parts: each objective may appear once (its name keys its metrics), "
                              f"got {names}")

    def configs(self) -> list[tuple[str, float, Any]]:
        """``(name, weight, validated config)`` of each part."""
        if not hasattr(self, "_parts"):  # built directly rather than from a recipe
            self.validate()
        return list(self._parts)


@register("objective", "combined", CombinedConfig)
class CombinedLoss(Objective):
    """The weighted sum of its parts' losses, each part's metrics under its name.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> both = mmcl.create_objective("combined", model=model, parts=[{"name": "simclr", "temperature": 0.5},
    ...                                                              {"name": "simsiam", "weight": 0.5,
    ...                                                               "predictor": {"dims": [32, 16]}}])
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    >>> out = model({"views": views})
    >>> loss, metrics = both(out, {"views": views})
    >>> sorted(metrics)
    ['simclr/acc', 'simclr/embedding_std', 'simclr/loss', 'simsiam/embedding_std', 'simsiam/loss']
    >>> torch.allclose(loss, metrics["simclr/loss"] + 0.5 * metrics["simsiam/loss"])
    True
    """

    def __init__(self, cfg: CombinedConfig):
        super().__init__(cfg)
        parts = cfg.configs()
        self.names = [name for name, _, _ in parts]
        self.weights = [weight for _, weight, _ in parts]
        self.parts = nn.ModuleList(build("objective", part) for _, _, part in parts)
        # an instance attribute: the trainer keeps these buffers per process and checkpoints each
        self.per_process_buffers = tuple(f"parts.{i}.{name}" for i, part in enumerate(self.parts)
                                         for name in part.per_process_buffers)

    @classmethod
    def components(cls, cfg: CombinedConfig, where: str = "objective") -> list[tuple[type[Objective], Any, str]]:
        """Each part, under its recipe key ``objective.parts[N]``."""
        table = registered("objective")
        return [(table[name][1], part, f"{where}.parts[{i}]") for i, (name, _, part) in enumerate(cfg.configs())]

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Set every part up for the model (after checking it has what each part's setup reads)."""
        for part in self.parts:
            part.check_model(model)
            part.setup(model, total_steps)

    def after_optimizer_step(self, step: int) -> None:
        """Every part's after-step hook (momentum updates, queues), in the order of ``parts``."""
        for part in self.parts:
            part.after_optimizer_step(step)

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``Σ weight · loss`` over the parts; metrics ``NAME/loss`` and ``NAME/METRIC`` of each part."""
        total, metrics = None, {}
        for name, weight, part in zip(self.names, self.weights, self.parts):
            loss, part_metrics = part(out, batch)
            total = weight * loss if total is None else total + weight * loss
            metrics[f"{name}/loss"] = loss.detach()
            metrics.update({f"{name}/{key}": value for key, value in part_metrics.items()})
        return total, metrics
