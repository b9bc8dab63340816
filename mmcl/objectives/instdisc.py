"""Instance discrimination with a memory bank (Wu et al., 2018): every training image is its own
class, represented by a slowly moving row of a memory bank.

One augmented view per image; its normalised projection ``v`` is scored against its own bank row
(the positive) and ``K`` rows drawn uniformly from the bank, at temperature τ, with either
noise-contrastive estimation (the paper's NCE, normaliser ``Z`` estimated once from the first
batch, averaged over processes) or softmax-NCE (cross-entropy over the ``1 + K`` scores). The
bank rows of the whole global batch are then updated on every process (see :mod:`bank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import all_reduce_sum, world
from mmcl.objectives.bank import MemoryBank, bank_logits, nce_loss
from mmcl.objectives.base import ViewObjective, reset_after_load
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.registry import register


@dataclass
class InstDiscConfig:
    """``objective: {name: instdisc, bank_size: N, negatives: 4096, temperature: 0.07, loss: nce}``."""

    bank_size: int = spec(ge=1, help="rows of the memory bank: more than the largest training sample id")
    negatives: int = spec(4096, ge=1)
    temperature: float = spec(0.07, gt=0)
    momentum: float = spec(0.5, ge=0, lt=1, help="proximal update of the bank rows")
    loss: Literal["nce", "softmax"] = "nce"


@register("objective", "instdisc", InstDiscConfig)
class InstDiscLoss(ViewObjective):
    """Holds the memory bank (sized to the model's embeddings in :meth:`setup`).

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> instdisc = InstDiscLoss(InstDiscConfig(bank_size=100, negatives=16)); instdisc.setup(model, total_steps=100)
    >>> batch = {"views": views[:1], "id": torch.tensor([3, 14, 15, 92])}   # each sample's row in the bank
    >>> loss, metrics = instdisc(model(batch), batch)
    >>> sorted(metrics)
    ['acc', 'embedding_std']
    """

    couples_batch = False  # each sample against the memory bank; accumulating, micro-batches update it in turn

    min_views = 1  # one view against the memory bank
    needs_model_attributes = ("embed_dim",)

    def __init__(self, cfg: InstDiscConfig):
        super().__init__(cfg)
        self.register_buffer("log_z", torch.tensor(float("nan")))
        # whether log_z is set, on the host: read from the buffer once after construction or a checkpoint's load
        self._z_known: bool | None = None
        reset_after_load(self, "_z_known", None)

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """The bank, one ``embed_dim`` row per sample id."""
        self.check_model(model)
        self.bank = MemoryBank(self.cfg.bank_size, model.embed_dim, self.cfg.momentum)

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, ids = self.cfg, batch["id"]  # checked through the bank's update (MemoryBank.check_ids), clamped until then
        v = F.normalize(out["z"][0], dim=-1)
        logits = bank_logits(v, self.bank.rows, self.bank.clamp(ids), self.bank.sample(v.shape[0], cfg.negatives),
                             cfg.temperature)
        labels = torch.zeros(v.shape[0], dtype=torch.long, device=v.device)
        if cfg.loss == "softmax":
            loss = info_nce(logits, labels)
        else:
            if self._z_known is None:
                self._z_known = not bool(torch.isnan(self.log_z))
            if not self._z_known:  # the first batch (a host synchronisation, once)
                with torch.no_grad():
                    mean_exp = all_reduce_sum(logits.detach().exp().mean()) / world()[1]
                    self.log_z.fill_(float(mean_exp.log()) + math.log(cfg.bank_size))
                self._z_known = True
            loss = nce_loss(logits, self.log_z, cfg.bank_size)
        self.bank.update(ids, v)
        return loss, {"acc": top1(logits, labels), "embedding_std": embedding_std(out["z"][0])}
