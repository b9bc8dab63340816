"""CLIP's symmetric image↔text InfoNCE with negatives from every process (Radford et al., 2021).

With ``local_loss`` each process scores only its own rows against all columns (memory linear
in the global batch, as open_clip's ``local_loss``); the sum over processes is the same loss,
so gradients match one process on the concatenated batch either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmcl.config import spec
from mmcl.dist import gather_with_grad, world
from mmcl.errors import ConfigError
from mmcl.objectives.base import Objective
from mmcl.objectives.infonce import symmetric_info_nce, top1
from mmcl.objectives.tiled import tiled_info_nce, tiled_symmetric_info_nce
from mmcl.registry import register


@dataclass
class ClipLossConfig:
    """``objective: {name: clip, local_loss: false, tile: 0}``."""

    local_loss: bool = spec(False, help="score this process's rows only (memory linear in the global batch)")
    tile: int = spec(0, ge=0, help="0: the whole logits matrix. N: the loss in N x N blocks recomputed in the "
                                   "backward pass (mmcl.objectives.tiled): never holds the [batch, global batch] "
                                   "logits, for batches whose logits exceed memory")


def clip_loss(image: torch.Tensor, text: torch.Tensor, image_all: torch.Tensor, text_all: torch.Tensor,
              scale: torch.Tensor, rank: int, local_loss: bool,
              tile: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Symmetric InfoNCE. ``image``/``text``: this process's [B, D] normalised features;
    ``*_all``: all processes' features [N*B, D] in rank order; ``scale``: 1/τ; ``tile``: compute it
    in blocks of that side (:func:`tiled_info_nce`), 0 for the whole matrix.

    In one process the gathered features are the features themselves:

    >>> import torch.nn.functional as F
    >>> image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    >>> loss, acc = clip_loss(image, text, image, text, torch.tensor(10.0), rank=0, local_loss=False)
    >>> logits, pairs = 10.0 * image @ text.T, torch.arange(6)
    >>> torch.allclose(loss, (F.cross_entropy(logits, pairs) + F.cross_entropy(logits.T, pairs)) / 2)
    True
    >>> tiled, _ = clip_loss(image, text, image, text, torch.tensor(10.0), rank=0, local_loss=False, tile=4)
    >>> torch.allclose(tiled, loss)   # the same loss in 4 x 4 blocks, never holding the 6 x 6 logits
    True
    """
    if tile and not local_loss:  # one square matrix: each block serves both directions
        loss, acc_i, acc_t = tiled_symmetric_info_nce(image_all, text_all, scale, tile)
        return loss, {"acc_i2t": acc_i, "acc_t2i": acc_t}
    if tile:  # this process's rows against all columns, each direction its own [B, N] matrix
        targets = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        loss_i, acc_i = tiled_info_nce(image, text_all, scale, targets, tile)
        loss_t, acc_t = tiled_info_nce(text, image_all, scale, targets, tile)
        return 0.5 * (loss_i + loss_t), {"acc_i2t": acc_i, "acc_t2i": acc_t}
    if local_loss:
        logits_i = scale * image @ text_all.T
        logits_t = scale * text @ image_all.T
        targets = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
    else:
        logits_i = scale * image_all @ text_all.T
        logits_t = logits_i.T
        targets = torch.arange(image_all.shape[0], device=image.device)
    loss = symmetric_info_nce(logits_i, logits_t, targets)
    return loss, {"acc_i2t": top1(logits_i, targets), "acc_t2i": top1(logits_t, targets)}


@register("objective", "clip", ClipLossConfig)
class ClipLoss(Objective):
    """Gathers features across processes and applies :func:`clip_loss`.

    >>> f = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> loss, m = ClipLoss()({"image_features": f, "text_features": f, "logit_scale": torch.tensor(10.)})
    >>> bool(loss < 1.0), float(m["acc_i2t"])
    (True, 1.0)
    """

    data_kinds = frozenset({"image_text"})
    needs_outputs = ("image_features", "text_features", "logit_scale")
    needs_model = "image and text towers"

    def __init__(self, cfg: ClipLossConfig | None = None):
        super().__init__(cfg or ClipLossConfig())

    @classmethod
    def check_recipe(cls, cfg: ClipLossConfig, recipe: Any) -> None:
        """A model with SigLIP's logit bias does not fit: this loss never reads the bias, so its
        parameter would get no gradient, which DDP stops on in the second step."""
        bias = getattr(recipe.model, "init_logit_bias", None)
        if bias is not None:
            raise ConfigError(f"model.init_logit_bias is {bias:g}, but objective.name clip does not read the logit "
                              "bias (its parameter would get no gradient, which stops DDP); remove "
                              "model.init_logit_bias or use objective.name siglip")

    def forward(self, out: dict[str, torch.Tensor], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics from the model's ``image_features``, ``text_features`` and ``logit_scale``."""
        image, text, scale = out["image_features"], out["text_features"], out["logit_scale"]
        rank, _ = world()
        loss, metrics = clip_loss(image, text, gather_with_grad(image), gather_with_grad(text), scale, rank,
                                  self.cfg.local_loss, self.cfg.tile)
        metrics["logit_scale"] = scale.detach()
        return loss, metrics
