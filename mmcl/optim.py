"""Optimizers by name (AdamW, SGD, LARS), with parameter groups that exempt biases and norms
from weight decay (and, for LARS, from the trust-ratio scaling, as in SimCLR and BYOL), and may
give them their own learning rate (``optim.exempt_lr_scale``, as in Barlow Twins)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def param_groups(modules: list[nn.Module], weight_decay: float, lr: float | None = None,
                 exempt_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Two groups over the trainable parameters of ``modules``: decayed matrices, and exempt
    biases, norms, gains and anything a module lists in ``no_weight_decay()``. With ``lr``, each
    group carries its own rate: ``lr`` and ``lr * exempt_lr_scale`` (Barlow Twins' biases and norms
    train 0.024× slower); a ``LambdaLR`` then scales both by the same schedule.

    >>> net = nn.Sequential(nn.Linear(3, 2), nn.LayerNorm(2))
    >>> [(len(g["params"]), g["weight_decay"], g["lr"]) for g in param_groups([net], 0.1, lr=1.0, exempt_lr_scale=0.5)]
    [(1, 0.1, 1.0), (3, 0.0, 0.5)]
    """
    decay, no_decay = [], []
    for module in modules:
        exempt = set(getattr(module, "no_weight_decay", lambda: set())())
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim < 2 or name in exempt or "bias" in name or ".ln" in name or "norm" in name:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]
    if lr is not None:
        groups[0]["lr"], groups[1]["lr"] = lr, lr * exempt_lr_scale
    return groups


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio ``η ‖w‖ / ‖g + λw‖`` (You et al., 2017, as the
    SimCLR, BYOL and MoCo v3 code computes it), skipped for groups marked ``lars_exclude`` (biases
    and norms).

    Kept by hand: timm's ``Lars`` (installed with open_clip) divides by ``‖g‖ + λ‖w‖``, the paper's
    formula, which the recipes reproducing those methods do not use; without weight decay the two
    agree (``tests/test_optim.py``).

    One step updates a group's parameters of one device and dtype together with torch's multi-tensor
    (``_foreach``) operations: the norms of every weight and update at once, the trust ratios as
    one vector, the momentum buffers and weights at once; nothing waits for the device. Equal to
    the update of one parameter at a time to float round-off (the norms' reductions, bit for bit on
    the CPU)."""

    def __init__(self, params: Any, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = closure() if closure is not None else None
        for g in self.param_groups:
            kinds: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
            for p in g["params"]:
                if p.grad is not None:
                    kinds.setdefault((p.device, p.dtype), []).append(p)
            for params in kinds.values():
                self._update(g, params)
        return loss

    def _update(self, g: dict[str, Any], params: list[torch.Tensor]) -> None:
        """One step of ``params`` (of one group, device and dtype)."""
        grads = [p.grad for p in params]
        # g + λw, in new tensors (the gradients stay as they are)
        d = torch._foreach_add(grads, params, alpha=g["weight_decay"]) if g["weight_decay"] else grads
        if not g["lars_exclude"]:
            w_norm, d_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d))
            ok = (w_norm > 0) & (d_norm > 0)
            trust = torch.where(ok, g["eta"] * w_norm / d_norm.clamp(min=1e-12), torch.ones_like(w_norm))
            d = torch._foreach_mul(d, list(trust.unbind()))
        bufs = []
        for p in params:
            buf = self.state[p].get("momentum_buffer")
            if buf is None:
                buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(buf)
        torch._foreach_mul_(bufs, g["momentum"])
        torch._foreach_add_(bufs, d)
        torch._foreach_add_(params, bufs, alpha=-g["lr"])


class FusedSGD(torch.optim.SGD):
    """torch's fused SGD with its momentum buffers started at zero before the first step.

    torch's fused kernel starts them with ``torch.empty_like`` and its first step fills them; when
    that step is skipped by ``found_inf`` (mmcl's vote on the device, :meth:`mmcl.train.Trainer.train_step`)
    nothing fills them, and the next step reads uninitialised memory. A zero buffer gives the same
    first update: ``momentum * 0 + g = g``, exactly."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        for g in self.param_groups:
            if g["momentum"]:
                for p in g["params"]:
                    if p.grad is not None and self.state[p].get("momentum_buffer") is None:
                        self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return super().step(closure)


def build_optimizer(cfg: Any, modules: list[nn.Module]) -> torch.optim.Optimizer:
    """The optimizer an ``OptimConfig`` names, over the trainable parameters of ``modules``."""
    groups = param_groups(modules, cfg.weight_decay, cfg.lr, cfg.exempt_lr_scale)
    if cfg.name == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.momentum)
    for g in groups:
        g.pop("lars_exclude", None)
    if cfg.name == "sgd":
        if cfg.fused:
            return FusedSGD(groups, lr=cfg.lr, momentum=cfg.momentum, fused=True)
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=cfg.fused or None)
