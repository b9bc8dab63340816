"""SigLIP: a sigmoid loss on every image-text pair (Zhai et al., 2023, "Sigmoid Loss for Language
Image Pre-Training"), as open_clip's ``SigLipLoss``.

Each pair is a binary problem of its own: logit ``z_ij = s · x_i·t_j + b`` (scale ``s`` and bias
``b`` both learned; the paper starts them at 10 and -10), label ``y_ij = +1`` for an image and its
own text and -1 for every other pair, loss ``-Σ_ij log σ(y_ij z_ij) / B`` over the ``B`` images.
No softmax ties a row together, so the sum splits into blocks of texts: each process scores its
own ``B`` images against all ``N·B`` texts of the global batch (positives only among its own
pairs), and the processes' losses average to the loss of one process on the whole batch, as DDP
averages their gradients.

``exchange`` says how a process sees the other processes' texts:

- ``gather``: all-gathered with gradient (:func:`mmcl.dist.gather_with_grad`), ``N·B`` rows;
- ``ring``: passed around the ring of processes one block at a time (open_clip's neighbour
  exchange): ``N - 1`` passes forward; in the backward the blocks go round again, each with the
  gradient the processes it has passed have added to it, and the last pass brings every block's
  gradient home. A process holds its own block and the one in transit (sent on, received), never
  the ``N·B`` rows; it sends ``N - 1`` blocks forward and ``2N - 1`` backward.

The logits are recomputed in the backward instead of kept, ``tile`` texts at a time when
``tile`` is set: logits memory ``B × tile`` instead of ``B × N·B`` (``B × B`` per ring block).
Every mode gives the same loss and gradients, to float round-off. The loss is taken in float32
(float64 inputs stay float64) with autocast off: the sum runs over ``B × N·B`` terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: F401  (the doctests use it)

from mmcl.config import spec
from mmcl.dist import gather_with_grad, pass_right, world
from mmcl.errors import ConfigError
from mmcl.objectives.base import Objective
from mmcl.registry import register


@dataclass
class SigLipConfig:
    """``objective: {name: siglip, exchange: gather, tile: 0}``."""

    exchange: Literal["gather", "ring"] = spec("gather", help="how each process sees the other processes' texts: "
                                                              "all-gathered (gather), or passed around the ring of "
                                                              "processes one block at a time (ring)")
    tile: int = spec(0, ge=0, help="score this many texts at a time (logits memory: local batch x tile), as CLIP's "
                                   "objective.tile; 0: a whole block at once")


def _flipped_logits_(sim: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                     positive_from: int | None) -> torch.Tensor:
    """``sim`` turned, in place, into ``w = -y · (scale · sim + bias)``: the logits as they are for the
    negative pairs (``y = -1``) and with their sign flipped for each image's own text (``y = +1``, at
    ``(i, i + positive_from)``: a diagonal, empty when it lies off the block; ``None``: all negatives).
    Each pair's loss is then ``softplus(w)`` and its derivative ``σ(w)``. In place, so a block costs
    one ``[B, M]`` matrix (a diagonal, not a mask: a masked index would wait for the device)."""
    w = sim.mul_(scale).add_(bias)
    if positive_from is not None:
        w.diagonal(positive_from).neg_()
    return w


def sigmoid_terms(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  positive_from: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SigLIP on one block: ``image`` [B, D] against ``text`` [M, D], image ``i``'s positive being
    text ``i + positive_from`` (``None``: none in the block). Returns the sum over the pairs of
    ``-log σ(y · (scale · x·t + bias))`` (differentiable; divide by the images for the loss) and,
    for the accuracy, each image's similarity to its own text (0 when not in the block) and its
    highest similarity to a text that is not its own (-inf when there is none). The logits are
    computed in place and again in the backward (:func:`sigmoid_grads`), never kept.

    >>> f64 = dict(dtype=torch.float64)   # float32 gradients near zero differ by round-off beyond allclose's atol
    >>> image = F.normalize(torch.randn(3, 8, **f64), dim=-1).requires_grad_()
    >>> text = F.normalize(torch.randn(5, 8, **f64), dim=-1)
    >>> total, own, best_other = sigmoid_terms(image, text, torch.tensor(10.0, **f64), torch.tensor(-5.0, **f64),
    ...                                        positive_from=2)
    >>> y = -torch.ones(3, 5, **f64); y[[0, 1, 2], [2, 3, 4]] = 1   # image i's own text is text i + 2
    >>> direct = -F.logsigmoid(y * (10.0 * image @ text.T - 5.0)).sum()
    >>> ours_grad, direct_grad = (torch.autograd.grad(t, image)[0] for t in (total, direct))
    >>> torch.allclose(total, direct), torch.allclose(ours_grad, direct_grad)
    (True, True)
    """
    return _GatheredSigmoidLoss.apply(image, text, scale, bias, positive_from, None)


@torch.no_grad()
def _block_terms(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 positive_from: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`sigmoid_terms` without a graph, in place: at most two ``[B, M]`` matrices at once."""
    sim = image @ text.T
    own = sim.new_zeros(sim.shape[0])
    if positive_from is not None:
        diagonal = sim.diagonal(positive_from)
        first = max(0, -positive_from)  # the first image whose own text lies in the block
        own_here = own[first:first + diagonal.numel()]
        own_here.copy_(diagonal)
        diagonal.fill_(float("-inf"))  # for the best other text; put back below
        best_other = sim.amax(dim=1)
        diagonal.copy_(own_here)
    else:
        best_other = sim.amax(dim=1)
    w = _flipped_logits_(sim, scale, bias, positive_from)
    # softplus(w) = max(w, 0) + log(1 + e^-|w|), stable for any w (torch's log-sigmoid computes the same)
    total = w.clamp_min(0).sum() + w.abs_().neg_().exp_().log1p_().sum()
    return total, own, best_other


@torch.no_grad()
def sigmoid_grads(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  positive_from: int | None, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Gradients of ``grad`` × :func:`sigmoid_terms`'s sum with respect to ``image``, ``text``,
    ``scale`` and ``bias``, written out: with ``u = scale · x·t + bias`` and ``w = -y u``, a pair's
    ``∂/∂u = -y σ(w)``; then ``∂/∂x_i = scale Σ_j ∂u_ij t_j``, ``∂/∂t_j = scale Σ_i ∂u_ij x_i``,
    ``∂/∂scale = Σ_ij ∂u_ij x_i·t_j = Σ_i x_i · (Σ_j ∂u_ij t_j)``, ``∂/∂bias = Σ_ij ∂u_ij``. The
    logits are recomputed, in place: one ``[B, M]`` matrix.

    >>> image, text = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    >>> leaves = [x.clone().requires_grad_() for x in (image, text, torch.tensor(2.0, dtype=torch.float64),
    ...                                                 torch.tensor(-1.0, dtype=torch.float64))]
    >>> y = -torch.ones(3, 5, dtype=torch.float64); y[[1, 2], [0, 1]] = 1   # positive_from=-1
    >>> (-F.logsigmoid(y * (leaves[2] * leaves[0] @ leaves[1].T + leaves[3])).sum() * 3).backward()
    >>> ours = sigmoid_grads(image, text, leaves[2].detach(), leaves[3].detach(), -1, torch.tensor(3.0))
    >>> all(torch.allclose(a, l.grad) for a, l in zip(ours, leaves))
    True
    """
    du = _flipped_logits_(image @ text.T, scale, bias, positive_from).sigmoid_()  # σ(w), then × -y:
    if positive_from is not None:
        du.diagonal(positive_from).neg_()  # -σ(w) on the positives
    du.mul_(grad)
    along_text = du @ text  # Σ_j ∂u_ij t_j
    d_scale = (along_text * image).sum()
    return along_text.mul_(scale), (du.T @ image).mul_(scale), d_scale, du.sum()


def _column_chunks(n: int, chunk: int | None) -> list[tuple[int, int]]:
    step = chunk or n
    return [(start, min(start + step, n)) for start in range(0, n, step)]


def _shifted(positive_from: int | None, start: int) -> int | None:
    return None if positive_from is None else positive_from - start


def _score_block(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 positive_from: int | None, chunk: int | None) -> tuple[torch.Tensor, ...]:
    """:func:`sigmoid_terms` of a block, ``chunk`` texts at a time, without a graph."""
    total, own = image.new_zeros(()), image.new_zeros(image.shape[0])
    best_other = image.new_full((image.shape[0],), float("-inf"))
    for start, end in _column_chunks(text.shape[0], chunk):
        loss, o, b = _block_terms(image, text[start:end], scale, bias, _shifted(positive_from, start))
        total, own, best_other = total + loss, own + o, torch.maximum(best_other, b)
    return total, own, best_other


def _block_grads(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 positive_from: int | None, chunk: int | None, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """:func:`sigmoid_grads` of a block, its logits recomputed ``chunk`` texts at a time."""
    d_image, d_text = torch.zeros_like(image), torch.empty_like(text)
    d_scale, d_bias = torch.zeros_like(scale), torch.zeros_like(bias)
    for start, end in _column_chunks(text.shape[0], chunk):
        gi, gt, gs, gb = sigmoid_grads(image, text[start:end], scale, bias, _shifted(positive_from, start), grad)
        d_image += gi
        d_text[start:end] = gt
        d_scale += gs
        d_bias += gb
    return d_image, d_text, d_scale, d_bias


class _GatheredSigmoidLoss(torch.autograd.Function):
    """Loss sum of this process's images against all processes' texts (gathered, ``[N·B, D]``), or
    of any block of images against texts (:func:`sigmoid_terms`)."""

    @staticmethod
    def forward(ctx, image, texts, scale, bias, positive_from, chunk):  # type: ignore[override]
        ctx.save_for_backward(image, texts, scale, bias)
        ctx.positive_from, ctx.chunk = positive_from, chunk
        total, own, best_other = _score_block(image, texts, scale, bias, positive_from, chunk)
        ctx.mark_non_differentiable(own, best_other)
        return total, own, best_other

    @staticmethod
    def backward(ctx, grad, _own, _best):  # type: ignore[override]
        image, texts, scale, bias = ctx.saved_tensors
        return (*_block_grads(image, texts, scale, bias, ctx.positive_from, ctx.chunk, grad), None, None)


class _RingSigmoidLoss(torch.autograd.Function):
    """Loss sum of this process's images against all processes' texts, the text blocks passed
    around the ring: after ``k`` passes this process holds the block of process ``rank - k``."""

    @staticmethod
    def forward(ctx, image, text, scale, bias, chunk):  # type: ignore[override]
        ctx.save_for_backward(image, text, scale, bias)
        ctx.chunk = chunk
        total, own, best_other = _score_block(image, text, scale, bias, 0, chunk)  # the positives are here
        block = text
        for _ in range(world()[1] - 1):
            (block,) = pass_right(block)
            loss, _, best = _score_block(image, block, scale, bias, None, chunk)
            total, best_other = total + loss, torch.maximum(best_other, best)
        ctx.mark_non_differentiable(own, best_other)
        return total, own, best_other

    @staticmethod
    def backward(ctx, grad, _own, _best):  # type: ignore[override]
        image, text, scale, bias = ctx.saved_tensors
        n = world()[1]
        d_image, d_block, d_scale, d_bias = _block_grads(image, text, scale, bias, 0, ctx.chunk, grad)
        block = text
        for _ in range(n - 1):
            # a block travels with the gradient the processes it has passed gave it
            block, d_block = pass_right(block, d_block)
            gi, gt, gs, gb = _block_grads(image, block, scale, bias, None, ctx.chunk, grad)
            d_image, d_block, d_scale, d_bias = d_image + gi, d_block + gt, d_scale + gs, d_bias + gb
        if n > 1:  # the block this process holds now belongs to the next one: its gradient goes home
            (d_block,) = pass_right(d_block)
        return d_image, d_block, d_scale, d_bias, None


@register("objective", "siglip", SigLipConfig)
class SigLipLoss(Objective):
    """SigLIP's sigmoid loss over the global batch (see the module docstring); metrics: the learned
    scale and bias, and ``acc_i2t``, the share of images whose own text is their most similar.

    >>> f = torch.eye(4)  # four orthogonal pairs: logit 10·1 - 5 for a pair, 10·0 - 5 for a non-pair
    >>> loss, m = SigLipLoss()({"image_features": f, "text_features": f, "logit_scale": torch.tensor(10.),
    ...                         "logit_bias": torch.tensor(-5.)})
    >>> round(loss.item(), 4), float(m["acc_i2t"])  # 4 · log(1 + e^-5) per image
    (0.0269, 1.0)
    """

    data_kinds = frozenset({"image_text"})
    needs_outputs = ("image_features", "text_features", "logit_scale")
    needs_configured_outputs = ("logit_bias",)
    needs_model = "image and text towers with a logit bias, model.init_logit_bias"

    def __init__(self, cfg: SigLipConfig | None = None):
        super().__init__(cfg or SigLipConfig())

    @classmethod
    def check_recipe(cls, cfg: SigLipConfig, recipe: Any) -> None:
        """The model must have the learnable bias (``logit_bias`` is produced only when it is set)."""
        if getattr(recipe.model, "init_logit_bias", None) is None:
            raise ConfigError("objective.name siglip needs the model's learnable logit bias: set "
                              "model.init_logit_bias: -10 (the SigLIP paper's start, with model.init_logit_scale: 10)")

    def forward(self, out: dict[str, torch.Tensor], batch: Any = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics from the model's features, ``logit_scale`` and ``logit_bias``."""
        if out.get("logit_bias") is None:
            raise ConfigError("objective siglip reads the model output logit_bias: build the model with "
                              "model.init_logit_bias (e.g. -10)")
        image, text = out["image_features"], out["text_features"]
        dtype = torch.promote_types(image.dtype, torch.float32)
        with torch.autocast(image.device.type, enabled=False):
            image, scale, bias = image.to(dtype), out["logit_scale"].to(dtype), out["logit_bias"].to(dtype)
            if self.cfg.exchange == "ring":
                total, own, best_other = _RingSigmoidLoss.apply(image, text.to(dtype), scale, bias, self.cfg.tile)
            else:
                texts = gather_with_grad(text).to(dtype)
                total, own, best_other = _GatheredSigmoidLoss.apply(image, texts, scale, bias,
                                                                    world()[0] * image.shape[0], self.cfg.tile)
        # a copy of the bias, which is the model's parameter: under train.fsdp its gathered storage is freed once
        # the step's backward is done, and the metric is read when the logging window closes
        metrics = {"acc_i2t": (own >= best_other).float().mean(), "logit_scale": scale.detach(),
                   "logit_bias": bias.detach().clone()}
        return total / image.shape[0], metrics
