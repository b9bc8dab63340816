"""Momentum (EMA) targets for MoCo, BYOL and DINO-style objectives.

The target is a frozen copy of the online network updated after every optimizer step as
``θ_t ← m θ_t + (1 - m) θ_o``, with ``m`` fixed (MoCo v1/v2: 0.999) or rising from a base value
to 1 on a half-cosine over the run (BYOL, MoCo v3). Buffers (BatchNorm running statistics)
are copied with the weights.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
from torch import nn

from mmcl.objectives.base import ViewObjective


def cosine_momentum(step: int, total: int, base: float) -> float:
    """BYOL's schedule: ``1 - (1 - base) (cos(π step / total) + 1) / 2``; ``base`` at 0, 1 at the end."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * min(step, total) / total) + 1.0) / 2.0


def views_network(model: nn.Module) -> nn.Module:
    """The part of ``model`` that embeds a batch's views, which a momentum target copies: the model's
    own ``views_network()`` (a CLIP model's image tower and view head, not its text tower), else the
    whole model."""
    own = getattr(model, "views_network", None)
    return own() if own is not None else model


class MomentumTarget(nn.Module):
    """An EMA copy of ``online``; call :meth:`update` after each optimizer step.

    ``online`` is referenced, not registered, so it is neither saved twice nor seen by DDP
    through this module.
    """

    def __init__(self, online: nn.Module, base: float, schedule: Literal["fixed", "cosine"] = "fixed",
                 total_steps: int = 1):
        super().__init__()
        self.net = copy.deepcopy(online).requires_grad_(False)
        self._online = [online]
        self.base, self.schedule, self.total_steps = base, schedule, max(1, total_steps)
        self.momentum = base

    def momentum_at(self, step: int) -> float:
        """The momentum used for the update that follows optimizer step ``step``."""
        return self.base if self.schedule == "fixed" else cosine_momentum(step, self.total_steps, self.base)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """EMA of parameters, copy of buffers: ``t.mul_(m).add_(o, alpha=1 - m)`` and ``t.copy_(o)`` for
        all tensors at once (torch's foreach kernels: a few launches instead of two per parameter)."""
        self.momentum = m = self.momentum_at(step)
        online = self._online[0]
        pairs = list(zip(self.net.parameters(), online.parameters()))
        if pairs:
            targets = [t for t, _ in pairs]
            torch._foreach_mul_(targets, m)
            torch._foreach_add_(targets, [o.detach().to(t.dtype) for t, o in pairs], alpha=1.0 - m)
        buffers = list(zip(self.net.buffers(), online.buffers()))
        if buffers:
            torch._foreach_copy_([t for t, _ in buffers], [o for _, o in buffers])

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        with torch.no_grad():
            return self.net(*args, **kwargs)


class MomentumObjective(ViewObjective):
    """Base of objectives with a momentum target of the online model (MoCo, MoCo v3, BYOL, DINO)
    and, when their config has a ``predictor``, a trained prediction head on the online branch.

    Subclasses set ``schedule`` ("fixed" or "cosine"); their config has ``momentum``. The target
    re-encodes the batch's views, so these objectives train on multi-view data.
    """

    schedule: Literal["fixed", "cosine"] = "cosine"
    needs_model_attributes = ("embed_dim",)

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Build the predictor (sized to the model's embeddings) and copy the model into the target."""
        from mmcl.models.heads import build_head

        self.check_model(model)
        if getattr(self.cfg, "predictor", None) is not None:
            self.predictor = build_head(self.cfg.predictor, model.embed_dim)
        self.target = MomentumTarget(views_network(model), self.cfg.momentum, self.schedule, total_steps)

    def after_optimizer_step(self, step: int) -> None:
        self.target.update(step)

    @torch.compiler.disable  # compiled (train.compile), reading the momentum would be a constant that changes
    def momentum_metric(self, like: torch.Tensor) -> torch.Tensor:  # each step: a recompilation every step
        """The target's momentum as a metric: a float32 scalar on ``like``'s device filled by a kernel
        from the Python number. ``torch.tensor(m)`` would be a host tensor the trainer copies to the
        device, and ``torch.tensor(m, device=...)`` a copy from host memory: on a GPU both wait for it."""
        return torch.full((), self.target.momentum, device=like.device)
