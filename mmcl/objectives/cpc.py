"""CPC's InfoNCE over a patch grid (van den Oord et al., 2018): from the context ``c`` of grid
position (i, j), a bias-free linear map ``W_k`` predicts the patch embedding ``z`` at (i + k, j),
for k = 1..K.

For each k the score of a prediction against a target is the dot product ``z_t · W_k c``
(the paper's log-bilinear ``f_k``), or with ``normalize`` the cosine divided by ``temperature``:
a component shared by every patch (background) then cannot grow unchecked and swamp the pooled
features that evaluation uses. Each prediction's positive is its true future patch; its
negatives are every other target patch (other positions, other images) of the global batch,
gathered across processes with gradient. The loss is the mean over k of the InfoNCE over this
process's predictions, so the mean over processes equals one process on the whole batch. The
accuracy of picking the true future patch is logged per k (``acc_k1`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import gather_with_grad, world
from mmcl.errors import ConfigError
from mmcl.objectives.base import Objective
from mmcl.objectives.infonce import embedding_std, info_nce, top1
from mmcl.registry import register


@dataclass
class CPCConfig:
    """``objective: {name: cpc, steps: 3}``: predict 1..``steps`` rows ahead."""

    steps: int = spec(3, ge=1, help="K: rows predicted ahead")
    normalize: bool = spec(False, help="cosine scores / temperature instead of dot products")
    temperature: float = spec(0.1, gt=0, help="with normalize")


def cpc_step_logits(pred: torch.Tensor, target: torch.Tensor, target_all: torch.Tensor,
                    rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of this process's predictions against every target of the global batch.

    ``pred``, ``target``: [B, R, W, D] predictions and their true targets (R = G - k rows);
    ``target_all``: [N·B, R, W, D] all processes' targets in rank order. Returns the
    [B·R·W, N·B·R·W] logits and each row's positive column.

    >>> pred = torch.eye(24).reshape(2, 3, 4, 24)   # 2 images, 3 rows x 4 columns of patches, orthogonal
    >>> logits, pos = cpc_step_logits(pred, pred, pred, rank=0)   # one process: its targets are all there are
    >>> logits.shape, torch.equal(logits.argmax(1), pos)   # each of the 24 patches against all 24 targets
    (torch.Size([24, 24]), True)
    """
    rows = pred.flatten(0, 2)
    logits = rows @ target_all.flatten(0, 2).T
    pos = torch.arange(rows.shape[0], device=rows.device) + rank * target.flatten(0, 2).shape[0]
    return logits.float(), pos


@register("objective", "cpc", CPCConfig)
class CPCLoss(Objective):
    """Holds the K prediction maps (trained with the model), sized in :meth:`setup`.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("cpc", backbone={"name": "cnn", "width": 8, "depth": 2}, patch_size=8,
    ...                                 patch_stride=4, context_dim=16)
    >>> cpc = CPCLoss(CPCConfig(steps=2)); cpc.setup(model, total_steps=100)
    >>> views = [torch.randn(4, 3, 32, 32)]   # each image cut into a 7 x 7 grid of overlapping 8 px patches
    >>> loss, metrics = cpc(model({"views": views}), {"views": views})   # rows predicted 1 and 2 ahead
    >>> [name for name in sorted(metrics) if name.startswith("acc")]   # the share of patches found, per step ahead
    ['acc_k1', 'acc_k2']
    """

    data_kinds = frozenset({"multi_view"})
    needs_outputs = ("z:grid", "c:grid")
    needs_model = "a patch grid with a context network"
    needs_model_attributes = ("embed_dim", "context_dim")

    @classmethod
    def check_recipe(cls, cfg: CPCConfig, recipe: Any) -> None:
        """The rows predicted ahead fit in the grid the model (``model: cpc``, as the declared outputs
        ensure) cuts from the recipe's images."""
        grid = recipe.model.grid(recipe.data.image_size)
        if cfg.steps >= grid:
            raise ConfigError(f"objective.steps {cfg.steps} must be below the grid height {grid} (data.image_size "
                              f"{recipe.data.image_size}, model.patch_size {recipe.model.patch_size}, "
                              f"patch_stride {recipe.model.patch_stride})")

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """``W_k``: context dim → patch embedding dim, no bias, one per step ahead."""
        self.check_model(model)
        self.predictors = nn.ModuleList(nn.Linear(model.context_dim, model.embed_dim, bias=False)
                                        for _ in range(self.cfg.steps))

    def forward(self, out: dict[str, Any], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        z, c = out["z"], out["c"]
        grid = z.shape[1]
        if self.cfg.steps >= grid:
            raise ConfigError(f"objective.steps {self.cfg.steps} must be below the grid height {grid}")
        rank, losses, metrics = world()[0], [], {}
        for k, w_k in enumerate(self.predictors, start=1):
            pred, target = w_k(c[:, :-k]), z[:, k:]
            if self.cfg.normalize:
                pred = F.normalize(pred, dim=-1) / self.cfg.temperature
                target = F.normalize(target, dim=-1)
            logits, pos = cpc_step_logits(pred, target, gather_with_grad(target.contiguous()), rank)
            losses.append(info_nce(logits, pos))
            metrics[f"acc_k{k}"] = top1(logits, pos)
        metrics["embedding_std"] = embedding_std(z.mean(dim=(1, 2)))
        return torch.stack(losses).mean(), metrics
