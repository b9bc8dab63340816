"""Contrastive Multiview Coding (Tian et al., 2019): views of one sample (colour channels, image
fields) encoded by separate encoders (``model: {name: multiview}``) agree, across samples they differ.

For a view pair (i, j) the loss is ``L(V_i, V_j) = L^{i→j} + L^{j→i}``, each an InfoNCE of one
view's embedding against the other view's embeddings of the same sample (positive) and of other
samples (negatives), at temperature τ; summed over pairs: ``core`` (view 1 against each other
view) or ``full`` (every pair), as in the paper. Negatives are either

- ``batch``: the other samples of the global batch, gathered across processes with gradient
  (CLIP's symmetric loss per pair), or
- ``bank``: ``K`` rows drawn from a per-view memory bank indexed by the sample id (softmax-NCE;
  the banks are updated with every process's features, proximal momentum μ).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import gather_with_grad, world
from mmcl.errors import ConfigError
from mmcl.objectives.bank import MemoryBank, bank_logits
from mmcl.objectives.base import ViewObjective
from mmcl.objectives.clip import clip_loss
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.registry import register


@dataclass
class CMCConfig:
    """``objective: {name: cmc, mode: core | full, negatives: batch | bank, ...}``."""

    mode: Literal["core", "full"] = "core"
    negatives: Literal["batch", "bank"] = "batch"
    temperature: float = spec(0.07, gt=0)
    bank_size: int | None = spec(None, ge=1, help="bank: more than the largest training sample id")
    bank_negatives: int = spec(16384, ge=1, help="bank: negatives K per sample")
    momentum: float = spec(0.5, ge=0, lt=1, help="bank: proximal update of the rows")

    def validate(self) -> None:
        """A bank needs its size."""
        if self.negatives == "bank" and self.bank_size is None:
            raise ConfigError("objective.bank_size is required with negatives: bank")


def view_pairs(n_views: int, mode: str) -> list[tuple[int, int]]:
    """Core view: (0, j) for every other view j; full graph: every pair i < j."""
    return [(0, j) for j in range(1, n_views)] if mode == "core" else list(itertools.combinations(range(n_views), 2))


@register("objective", "cmc", CMCConfig)
class CMCLoss(ViewObjective):
    """Cross-view InfoNCE over the model's per-view projections ``out["z"]``.

    >>> z = torch.eye(8)   # e.g. the L and ab views of 8 images (model: multiview)
    >>> cmc = CMCLoss(CMCConfig(temperature=0.5))
    >>> matched, shuffled = cmc({"z": [z, z]}, {})[0], cmc({"z": [z, z.roll(1, 0)]}, {})[0]
    >>> bool(matched < shuffled)
    True
    """

    needs_model_attributes = ("embed_dim",)

    @classmethod
    def check_recipe(cls, cfg: CMCConfig, recipe: Any) -> None:
        """Bank negatives keep one bank per view encoder, or two for an encoder shared by the views
        (see :meth:`setup`): a shared encoder then needs exactly two views."""
        from mmcl.models.multiview import MultiViewModelConfig

        views = getattr(recipe.model, "output_views", None)
        if cfg.negatives == "bank" and views is not None and not isinstance(recipe.model, MultiViewModelConfig) \
                and views(recipe.data) != 2:
            raise ConfigError(f"objective.negatives bank with an encoder shared by the views keeps 2 memory banks, "
                              f"but the model makes {views(recipe.data)} views; use 2 views, or model: "
                              "{name: multiview} (one encoder and one bank per view)")

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """With bank negatives: one memory bank per view encoder (``model.backbones`` of a multiview
        model), or 2 for an encoder shared by the views."""
        if self.cfg.negatives == "bank":
            self.check_model(model)
            n_views = len(getattr(model, "backbones", [])) or 2
            self.banks = nn.ModuleList(MemoryBank(self.cfg.bank_size, model.embed_dim, self.cfg.momentum)
                                       for _ in range(n_views))

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z = [F.normalize(x, dim=-1) for x in out["z"]]
        if len(z) < 2:
            raise ConfigError("CMC needs at least 2 views: a multiview model with channel groups or view_fields")
        pairs = view_pairs(len(z), self.cfg.mode)
        losses, accs = [], []
        if self.cfg.negatives == "batch":
            rank, gathered = world()[0], [gather_with_grad(x) for x in z]
            for i, j in pairs:
                loss, m = clip_loss(z[i], z[j], gathered[i], gathered[j], torch.tensor(1 / self.cfg.temperature),
                                    rank, local_loss=True)
                losses.append(2 * loss)
                accs += [m["acc_i2t"], m["acc_t2i"]]
        else:
            ids = batch["id"]  # checked through the banks' updates (MemoryBank.check_ids), clamped until then
            rows = self.banks[0].clamp(ids)
            neg = self.banks[0].sample(ids.shape[0], self.cfg.bank_negatives)
            labels = torch.zeros_like(ids)
            for i, j in pairs:
                for a, b in ((i, j), (j, i)):  # view a's embedding against view b's memory
                    logits = bank_logits(z[a], self.banks[b].rows, rows, neg, self.cfg.temperature)
                    losses.append(info_nce(logits, labels))
                    accs.append(top1(logits, labels))
            for bank, x in zip(self.banks, z):
                bank.update(ids, x)
        return torch.stack(losses).sum(), {"acc": torch.stack(accs).mean(), "embedding_std": embedding_std(out["z"][0])}
