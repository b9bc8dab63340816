"""MoCo v1/v2 (He et al., 2020; Chen et al., 2020): queries against a momentum-encoded key and a
FIFO queue of past keys from every process.

Query ``q`` = online projection of view 1, key ``k`` = momentum encoder's projection of view 2;
logits ``[q·k, q·queue] / τ`` with the positive in column 0. After the loss, the keys of all
processes are enqueued (in rank order, so the queue is the same everywhere). Shuffle-BN
(``shuffle_bn``) encodes keys on a random cross-process permutation of the batch, so BatchNorm
statistics cannot leak which query matches which key; SyncBN is ``train.sync_bn: true``.
v1 and v2 differ in the recipe only (projector, τ, augmentation).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import gather_no_grad, world
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.objectives.momentum import MomentumObjective
from mmcl.objectives.queue import KeyQueue
from mmcl.registry import register


@dataclass
class MoCoConfig:
    """``objective: {name: moco, queue_size: 65536, momentum: 0.999, temperature: 0.2}``."""

    queue_size: int = spec(65536, ge=1)
    momentum: float = spec(0.999, ge=0, le=1)
    temperature: float = spec(0.2, gt=0)
    shuffle_bn: bool = True
    symmetric: bool = spec(False, help="also use view 2 as query against view 1's key")


def moco_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, 1 + K] logits: column 0 the positive ``q·k``, then ``q`` against every queued key.

    >>> q, k, queue = torch.eye(2), torch.eye(2), torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]])
    >>> moco_logits(q, k, queue, temperature=0.5)
    tensor([[2.0000, 0.0000, 2.0000, 1.2000],
            [2.0000, 2.0000, 0.0000, 1.6000]])
    """
    pos = (q * k).sum(dim=-1, keepdim=True)
    return torch.cat([pos, q @ queue.T], dim=1) / temperature


@torch.no_grad()
def shuffled(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """``fn`` applied to a random cross-process permutation of the global batch, results returned
    to their owners (MoCo's shuffle-BN). With one process, ``fn(x)``."""
    rank, n = world()
    if n == 1:
        return fn(x)
    x_all = gather_no_grad(x)
    perm = torch.randperm(x_all.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    b = x.shape[0]
    y_all = gather_no_grad(fn(x_all[perm[rank * b:(rank + 1) * b]]))
    out = torch.empty_like(y_all)
    out[perm] = y_all
    return out[rank * b:(rank + 1) * b]


@register("objective", "moco", MoCoConfig)
class MoCoLoss(MomentumObjective):
    """MoCo v1 and v2 (they differ in the recipe only): holds the momentum encoder and the queue,
    built with :meth:`setup` once the model exists.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> moco = MoCoLoss(MoCoConfig(queue_size=8)); moco.setup(model, total_steps=100)
    >>> loss, metrics = moco(model({"views": views}), {"views": views})   # keys from the momentum encoder
    >>> sorted(metrics), tuple(moco.queue.keys.shape)   # this batch's 4 keys are queued, the oldest 4 dropped
    (['acc', 'embedding_std', 'momentum'], (8, 16))
    """

    couples_batch = False  # each query against its key and the queue; accumulating, micro-batches queue in turn

    schedule = "fixed"

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """The key encoder, and the queue sized to the model's embeddings."""
        super().setup(model, total_steps)
        self.queue = KeyQueue(self.cfg.queue_size, model.embed_dim)

    def _key(self, view: torch.Tensor) -> torch.Tensor:
        encode = lambda x: F.normalize(self.target({"views": [x]})["z"][0], dim=-1)  # noqa: E731
        return shuffled(encode, view) if self.cfg.shuffle_bn else encode(view)

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views, cfg = batch["views"], self.cfg
        pairs = [(0, 1), (1, 0)] if cfg.symmetric else [(0, 1)]
        queue = self.queue.keys.clone()
        losses, accs, keys = [], [], []
        for qi, ki in pairs:
            q = F.normalize(out["z"][qi], dim=-1)
            k = self._key(views[ki])
            logits = moco_logits(q, k, queue, cfg.temperature)
            labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
            losses.append(info_nce(logits, labels))
            accs.append(top1(logits, labels))
            keys.append(k)
        for k in keys:
            self.queue.push(gather_no_grad(k))
        metrics = {"acc": torch.stack(accs).mean(), "embedding_std": embedding_std(out["z"][0]),
                   "momentum": self.momentum_metric(q)}
        return torch.stack(losses).mean(), metrics
