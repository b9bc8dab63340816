"""SwAV (Caron et al., 2020): online clustering with swapped assignments.

Every crop's normalised projection is scored against ``K`` L2-normalised prototypes. For each
of the global crops the scores (no gradient) become soft cluster assignments ``q`` through
Sinkhorn-Knopp over the global batch: ``Q = exp(scores / ε)``, then rows and columns alternately
rescaled so every prototype gets an equal share of the batch and every sample one unit of mass
(the row sums are all-reduced across processes, so the assignment is the one a single process
would compute on the whole batch). Each other crop predicts ``q`` from its own scores:
``-Σ q log softmax(scores / τ)``, averaged over crops and global crops. The prototypes are
renormalised before every step and receive no gradient for the first ``freeze_prototypes_steps``
steps; an optional queue of past projections enlarges the batch the assignments are computed on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import all_reduce_sum, gather_no_grad
from mmcl.errors import ConfigError
from mmcl.objectives.base import ViewObjective, reset_after_load
from mmcl.objectives.infonce import embedding_std
from mmcl.registry import register


@dataclass
class SwAVConfig:
    """``objective: {name: swav, prototypes: 3000, epsilon: 0.05, sinkhorn_iterations: 3, temperature: 0.1}``."""

    prototypes: int = spec(3000, ge=2)
    epsilon: float = spec(0.05, gt=0)
    sinkhorn_iterations: int = spec(3, ge=1)
    temperature: float = spec(0.1, gt=0)
    assignment_crops: int = spec(2, ge=1, help="the first crops (global) assignments are computed for")
    freeze_prototypes_steps: int = spec(313, ge=0)
    queue_length: int = spec(0, ge=0, help="past projections per process used in the assignments (0: none)")
    queue_start_step: int = spec(0, ge=0)


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float, iterations: int) -> torch.Tensor:
    """Soft assignments [B, K] of this process's rows: each column of the global ``Q`` (one sample)
    sums to 1, each row (one prototype) to ``B_global / K``. ``scores``: [B, K] (no gradient).

    >>> scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])  # all 4 lean to prototype 0
    >>> q = sinkhorn(scores, epsilon=0.05, iterations=50)
    >>> q.sum(1), q.sum(0)   # each sample's codes sum to 1; the prototypes share the batch equally
    (tensor([1., 1., 1., 1.]), tensor([2., 2.]))
    >>> q.argmax(1)          # so the two leaning least to prototype 0 are assigned to prototype 1
    tensor([0, 0, 1, 1])
    """
    q = torch.exp(scores.float() / epsilon).T  # K × B
    b_global = all_reduce_sum(torch.full((), float(q.shape[1]), device=q.device))  # filled there: no host copy
    k = q.shape[0]
    q /= all_reduce_sum(q.sum())
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True))
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b_global
    return (q * b_global).T


@register("objective", "swav", SwAVConfig)
class SwAVLoss(ViewObjective):
    """Holds the prototypes (trained with the model) and the optional queue.

    The queue holds this process's own past projections, as in SwAV: it is listed in
    ``per_process_buffers`` so that DDP does not overwrite it with rank 0's at each forward and
    every process's queue is checkpointed.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> swav = SwAVLoss(SwAVConfig(prototypes=6)); swav.setup(model, total_steps=100)
    >>> loss, metrics = swav(model({"views": views}), {"views": views})   # swapped prediction of the codes
    >>> sorted(metrics), swav.prototypes.weight.shape
    (['embedding_std', 'prototype_usage'], torch.Size([6, 16]))
    """

    needs_model_attributes = ("embed_dim",)
    per_process_buffers = ("queue",)

    def __init__(self, cfg: SwAVConfig):
        super().__init__(cfg)
        self.track_steps()
        self._queue_full = False  # kept once true (a full queue stays full); read from the device until then
        reset_after_load(self, "_queue_full", False)

    @classmethod
    def check_recipe(cls, cfg: SwAVConfig, recipe: Any) -> None:
        """Assignments are computed for global views of the data (``data.views``), not local crops;
        each is predicted from another crop; the queue holds at least one batch of this process."""
        d = recipe.data
        crops = d.views + (d.multi_crop.local_crops if d.multi_crop else 0)
        if crops < 2:
            raise ConfigError(f"objective swav predicts each crop's code from another crop: the data makes {crops} "
                              "crop; set data.views >= 2 (or data.multi_crop.local_crops >= 1)")
        if cfg.assignment_crops > d.views:
            raise ConfigError(f"objective.assignment_crops is {cfg.assignment_crops} but the data makes "
                              f"{d.views} global views (data.views); the crops after them are local crops")
        if 0 < cfg.queue_length < d.batch_size:
            raise ConfigError(f"objective.queue_length {cfg.queue_length} is below data.batch_size {d.batch_size} "
                              "(the queue holds whole batches of this process); use 0 (no queue) or more")

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """Prototypes sized to the model's embeddings; the queue, if any."""
        self.check_model(model)
        self.prototypes = nn.Linear(model.embed_dim, self.cfg.prototypes, bias=False)
        if self.cfg.queue_length:
            self.register_buffer("queue", torch.zeros(self.cfg.assignment_crops, self.cfg.queue_length,
                                                      model.embed_dim))

    def after_optimizer_step(self, step: int) -> None:
        self.set_step(step)

    @torch.compiler.disable
    def _queue_ready(self) -> bool:
        """Whether the queue is full: read on the device until it is, then kept."""
        if not self._queue_full:
            self._queue_full = bool(self.queue[:, -1].any())
        return self._queue_full

    def _scores(self, z: torch.Tensor) -> torch.Tensor:
        w = self.prototypes.weight
        if self.current_step() < self.cfg.freeze_prototypes_steps:
            w = w.detach() + 0.0 * w  # in the graph (DDP sees it used) but with zero gradient
        return z @ w.T

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        with torch.no_grad():
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        z = [F.normalize(x, dim=-1) for x in out["z"]]
        scores = [self._scores(x) for x in z]
        b, n_crops, losses = z[0].shape[0], len(z), []
        use_queue = cfg.queue_length and self.current_step() >= cfg.queue_start_step and self._queue_ready()
        for i in range(cfg.assignment_crops):
            s = scores[i].detach()
            if use_queue:
                s = torch.cat([s, self.queue[i].to(s.dtype) @ self.prototypes.weight.detach().T])
            q = sinkhorn(s, cfg.epsilon, cfg.sinkhorn_iterations)[:b]
            for v in range(n_crops):
                if v != i:
                    losses.append(-(q * F.log_softmax(scores[v].float() / cfg.temperature, dim=1)).sum(dim=1).mean())
        if cfg.queue_length:
            with torch.no_grad():
                for i in range(cfg.assignment_crops):
                    self.queue[i] = torch.cat([z[i].detach().to(self.queue.dtype), self.queue[i][:-b]])
        usage = gather_no_grad(scores[0].detach().argmax(dim=1))
        metrics = {"embedding_std": embedding_std(out["z"][0]),
                   # the share of prototypes some sample picked, counted on the device (unique() would wait)
                   "prototype_usage": scores[0].new_zeros(cfg.prototypes, dtype=torch.float32)
                   .index_fill_(0, usage, 1.0).mean()}
        return torch.stack(losses).mean(), metrics
