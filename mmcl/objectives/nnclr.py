"""NNCLR (Dwibedi et al., 2021): each view's positive is the nearest neighbour, in a support set of
past projections, of the other view's projection.

With ``z1, z2`` the normalised projections of the two views, ``p1, p2`` the normalised predictions
(``predictor`` applied to the projections before normalising, as in the paper; ``z`` itself
without a predictor) and ``NN(z)`` the support-set row closest to
``z`` (cosine, no gradient), the loss is the paper's pseudo-code ``(L(NN(z1), p2) + L(NN(z2), p1)) / 2``
with ``L(n, p) = CE(n·p_allᵀ / τ, own index)``: each neighbour against the predictions of the global
batch. ``symmetric: true`` (the default, as the paper's released loss and the Keras example) also
scores each prediction against every image's neighbour, ``CE(p·n_allᵀ / τ, own index)``, and
averages the four terms. Gradients reach the model through the predictions only.

The support set is a FIFO queue (:class:`~mmcl.objectives.queue.KeyQueue`) of view 1's
projections: after each optimizer step the projections of the last forward, gathered from every
process in rank order, are enqueued, so every process holds the same support set (a buffer: saved
in checkpoints, not per process).

Across processes: the predictions are gathered with gradient, the neighbours without (each process
looks up its own rows in the shared support set), and the queue receives the gathered
projections, so the mean of the processes' losses, its gradients and the support set equal those
of one process holding the whole batch (``tests/dist``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import gather_no_grad, gather_with_grad, world
from mmcl.models.heads import HeadConfig, build_head
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.objectives.queue import KeyQueue
from mmcl.registry import register


@dataclass
class NNCLRConfig:
    """``objective: {name: nnclr, queue_size: 98304, temperature: 0.1, predictor: {dims: [4096, 256]}}``
    (the paper's ImageNet settings); ``predictor: null`` compares the neighbours with the projections."""

    queue_size: int = spec(98304, ge=1, help="rows of the support set (past projections of view 1)")
    temperature: float = spec(0.1, gt=0)
    symmetric: bool = spec(True, help="also each prediction against the neighbours of the global batch")
    predictor: HeadConfig | None = field(default_factory=lambda: HeadConfig(dims=[4096, 256]))


@torch.no_grad()
def nearest_neighbours(z: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    """For each normalised row of ``z`` [B, D], the row of ``support`` [K, D] with the largest dot
    product (cosine similarity, for unit rows), without gradient.

    >>> support = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    >>> nearest_neighbours(torch.tensor([[0.8, 0.6], [0.0, -1.0]]), support)
    tensor([[0.6000, 0.8000],
            [1.0000, 0.0000]])
    """
    return support[(z.detach().to(support.dtype) @ support.T).argmax(dim=1)].to(z.dtype)


def nnclr_terms(nn_: torch.Tensor, p: torch.Tensor, nn_all: torch.Tensor, p_all: torch.Tensor, temperature: float,
                rank: int, symmetric: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """InfoNCE of this process's neighbours ``nn_`` [B, D] against every prediction ``p_all``
    [N·B, D] (positive: the same image's), and with ``symmetric`` of its predictions ``p``
    against every neighbour ``nn_all``. Returns (losses, top-1 accuracies), one per direction.

    >>> n, p = torch.eye(3), torch.eye(3)   # each neighbour matches its own image's prediction only
    >>> losses, accs = nnclr_terms(n, p, n, p, temperature=0.5, rank=0, symmetric=True)
    >>> [round(loss.item(), 4) for loss in losses], [a.item() for a in accs]
    ([0.2395, 0.2395], [1.0, 1.0])
    """
    labels = torch.arange(p.shape[0], device=p.device) + rank * p.shape[0]
    pairs = [(nn_, p_all), (p, nn_all)] if symmetric else [(nn_, p_all)]
    logits = [(rows @ cols.T / temperature).float() for rows, cols in pairs]
    return [info_nce(lg, labels) for lg in logits], [top1(lg, labels) for lg in logits]


@register("objective", "nnclr", NNCLRConfig)
class NNCLRLoss(ViewObjective):
    """Holds the predictor (trained) and the support set, built with :meth:`setup` once the model exists.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> nnclr = NNCLRLoss(NNCLRConfig(queue_size=8, predictor=HeadConfig(dims=[32, 16])))
    >>> nnclr.setup(model, total_steps=100)
    >>> loss, metrics = nnclr(model({"views": views}), {"views": views})
    >>> loss.backward(); nnclr.after_optimizer_step(1)   # after the optimizer: view 1's 4 projections are queued
    >>> sorted(metrics), tuple(nnclr.support.keys.shape), int(nnclr.support.ptr)
    (['acc', 'embedding_std'], (8, 16), 4)
    """

    couples_batch = True  # the predictions of the other images are the negatives
    needs_model_attributes = ("embed_dim",)

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """The predictor and the support set, sized to the model's embeddings."""
        self.check_model(model)
        if self.cfg.predictor is not None:
            self.predictor = build_head(self.cfg.predictor, model.embed_dim)
        self.support = KeyQueue(self.cfg.queue_size, model.embed_dim)
        self._pending: list[torch.Tensor] = []

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, rank = self.cfg, world()[0]
        head = getattr(self, "predictor", None)
        z1, z2 = (F.normalize(z, dim=-1) for z in out["z"][:2])
        p1, p2 = (F.normalize(head(z), dim=-1) if head is not None else F.normalize(z, dim=-1) for z in out["z"][:2])
        support = self.support.keys.clone()
        losses, accs = [], []
        for z, p in ((z1, p2), (z2, p1)):  # the neighbour of one view against the prediction of the other
            nn_ = nearest_neighbours(z, support)
            terms, term_accs = nnclr_terms(nn_, p, gather_no_grad(nn_), gather_with_grad(p), cfg.temperature, rank,
                                           cfg.symmetric)
            losses += terms
            accs += term_accs
        self._pending.append(gather_no_grad(z1.detach()))
        metrics = {"acc": torch.stack(accs).mean(), "embedding_std": embedding_std(out["z"][0])}
        return torch.stack(losses).mean(), metrics

    def after_optimizer_step(self, step: int) -> None:
        """Enqueue the (gathered) view-1 projections of the forwards since the last step."""
        for z in self._pending:
            self.support.push(z)
        self._pending.clear()
