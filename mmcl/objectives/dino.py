"""DINO (Caron et al., 2021): self-distillation with no labels.

The student (the trained model) sees every crop, the teacher (an EMA of the student, momentum on
a cosine from 0.996 to 1) only the global crops. Both end in the DINO head: the model's projector
(MLP to a bottleneck, e.g. ``dims [2048, 2048, 256], norm none, activation gelu``), L2
normalisation, then a weight-normalised linear layer to ``out_dim`` (its weight rows have unit
norm; ``norm_last_layer: false`` learns their scale). The teacher's outputs are centred and
sharpened, ``softmax((t - c) / τ_t)``, and each student crop predicts every teacher crop other
than itself: ``-Σ p_t log softmax(s / τ_s)``, averaged over pairs. The centre follows the batch
mean of the teacher outputs over all processes, ``c ← m c + (1 - m) mean(t)``; τ_t warms up
linearly from ``warmup_teacher_temperature``. Logged, as in the paper's collapse study: the
teacher's mean entropy as a fraction of log(out_dim) (1: uniform, the collapse onto the centre,
whose distribution after centring is uniform, so KL to the centre is log(out_dim) × (1 - this);
0: one dimension dominates) and the mean KL between teacher and student (0 when both collapse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.dist import all_reduce_sum, world
from mmcl.errors import ConfigError
from mmcl.objectives.infonce import embedding_std
from mmcl.objectives.momentum import MomentumObjective, MomentumTarget, views_network
from mmcl.registry import register


@dataclass
class DINOConfig:
    """``objective: {name: dino, out_dim: 65536, teacher_temperature: 0.04, ...}``."""

    out_dim: int = spec(65536, ge=2)
    norm_last_layer: bool = True
    momentum: float = spec(0.996, ge=0, le=1, help="teacher EMA base, cosine to 1")
    student_temperature: float = spec(0.1, gt=0)
    teacher_temperature: float = spec(0.04, gt=0)
    warmup_teacher_temperature: float = spec(0.04, gt=0)
    warmup_teacher_steps: int = spec(0, ge=0)
    center_momentum: float = spec(0.9, ge=0, lt=1)
    global_crops: int = spec(2, ge=1, help="the first crops, seen by the teacher")
    freeze_last_layer_steps: int = spec(0, ge=0, help="the last layer gets no gradient for this many steps")


class WeightNormLinear(nn.Module):
    """``x`` (L2-normalised) times a weight whose rows are normalised to ``g`` (1 and frozen when
    ``learn_scale`` is false): DINO's last layer."""

    def __init__(self, d_in: int, d_out: int, learn_scale: bool):
        super().__init__()
        self.v = nn.Parameter(torch.empty(d_out, d_in))
        nn.init.trunc_normal_(self.v, std=0.02)
        self.g = nn.Parameter(torch.ones(d_out, 1), requires_grad=learn_scale)

    def forward(self, x: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """With ``frozen`` the weights are used but get zero gradient (still in the graph, so DDP
        sees them used)."""
        v, g = (self.v.detach() + 0.0 * self.v, self.g.detach() + 0.0 * self.g) if frozen else (self.v, self.g)
        return F.linear(F.normalize(x, dim=-1), g * F.normalize(v, dim=1))


class _Student(nn.Module):
    """The model followed by the last layer: what the teacher is an EMA copy of."""

    def __init__(self, model: nn.Module, last: nn.Module):
        super().__init__()
        self.model, self.last = model, last

    def forward(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        return [self.last(z) for z in self.model(batch)["z"]]


def teacher_temperature(step: int, cfg: DINOConfig) -> float:
    """Linear warm-up from ``warmup_teacher_temperature`` to ``teacher_temperature``."""
    if step >= cfg.warmup_teacher_steps:
        return cfg.teacher_temperature
    frac = step / cfg.warmup_teacher_steps
    return cfg.warmup_teacher_temperature + frac * (cfg.teacher_temperature - cfg.warmup_teacher_temperature)


def log_probs(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Log-distributions of the centred, sharpened teacher crops and of the student crops (float32)."""
    log_t = [F.log_softmax((t.float() - center) / teacher_temperature, dim=-1) for t in teacher]
    log_s = [F.log_softmax(s.float() / student_temperature, dim=-1) for s in student]
    return log_t, log_s


def cross_entropy_pairs(log_t: list[torch.Tensor], log_s: list[torch.Tensor]) -> torch.Tensor:
    """Mean over (teacher crop i, student crop v ≠ i) of ``-Σ p_t log p_s`` (batch mean)."""
    terms = [-(lt.exp() * log_s[v]).sum(dim=-1).mean() for i, lt in enumerate(log_t) for v in range(len(log_s))
             if v != i]
    return torch.stack(terms).mean()


def dino_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], center: torch.Tensor,
              student_temperature: float, teacher_temperature: float) -> torch.Tensor:
    """Mean over (teacher crop i, student crop v ≠ i) of the cross-entropy between the centred,
    sharpened teacher and the student.

    >>> t = [torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]])]   # the teacher on two global crops
    >>> loss = lambda s: dino_loss(s, t, torch.zeros(3), student_temperature=0.1, teacher_temperature=0.04)
    >>> bool(loss([t[1], t[0]]) < loss([t[0], t[1]]))   # crop v's student output is scored against crop i's teacher
    True
    """
    return cross_entropy_pairs(*log_probs(student, teacher, center, student_temperature, teacher_temperature))


@register("objective", "dino", DINOConfig)
class DINOLoss(MomentumObjective):
    """Holds the last layer (trained), the teacher and the centre.

    >>> import mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                                 projector={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]   # two augmented views of 4 images
    >>> dino = DINOLoss(DINOConfig(out_dim=12)); dino.setup(model, total_steps=100)
    >>> loss, metrics = dino(model({"views": views}), {"views": views})
    >>> loss.backward(); dino.after_optimizer_step(1)   # teacher EMA and centre update
    >>> sorted(metrics)
    ['embedding_std', 'kl_teacher_student', 'momentum', 'teacher_entropy', 'teacher_temperature']
    """

    schedule = "cosine"

    @classmethod
    def check_recipe(cls, cfg: DINOConfig, recipe: Any) -> None:
        """The teacher's crops must be global views of the data (``data.views``), not local crops, and
        the student needs a crop other than the teacher's."""
        d = recipe.data
        crops = d.views + (d.multi_crop.local_crops if d.multi_crop else 0)
        if crops < 2:
            raise ConfigError(f"objective dino compares the teacher on one crop with the student on another: the "
                              f"data makes {crops} crop; set data.views >= 2 (or data.multi_crop.local_crops >= 1)")
        if cfg.global_crops > recipe.data.views:
            raise ConfigError(f"objective.global_crops is {cfg.global_crops} but the data makes {recipe.data.views} "
                              "global views (data.views); the crops after them are local crops")

    def __init__(self, cfg: DINOConfig):
        super().__init__(cfg)
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))
        self.track_steps()

    def setup(self, model: nn.Module, total_steps: int) -> None:
        """The last layer on the model's embeddings, and the teacher: an EMA of model + last layer."""
        self.check_model(model)
        self.last = WeightNormLinear(model.embed_dim, self.cfg.out_dim, not self.cfg.norm_last_layer)
        self.target = MomentumTarget(_Student(views_network(model), self.last), self.cfg.momentum, "cosine",
                                     total_steps)

    def after_optimizer_step(self, step: int) -> None:
        super().after_optimizer_step(step)
        self.set_step(step)

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """``c ← m c + (1 - m) · mean of the teacher outputs over crops and the global batch``."""
        t = torch.cat(teacher).float()
        total = all_reduce_sum(t.sum(dim=0, keepdim=True))
        mean = total / (t.shape[0] * world()[1])
        self.center.mul_(self.cfg.center_momentum).add_(mean, alpha=1 - self.cfg.center_momentum)

    def forward(self, out: dict[str, Any], batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.cfg
        step = self.current_step()
        frozen = step < cfg.freeze_last_layer_steps
        student = [self.last(z, frozen) for z in out["z"]]
        teacher = self.target({"views": batch["views"][:cfg.global_crops]})
        temp = teacher_temperature(step, cfg)
        log_t, log_s = log_probs(student, teacher, self.center, cfg.student_temperature, temp)
        loss = cross_entropy_pairs(log_t, log_s)
        with torch.no_grad():  # the collapse monitors, from the same distributions
            entropy = torch.stack([-(lt.exp() * lt).sum(dim=-1).mean() for lt in log_t]).mean()
            kls = [(lt.exp() * (lt - ls)).sum(dim=-1).mean() for i, lt in enumerate(log_t)
                   for v, ls in enumerate(log_s[:cfg.global_crops]) if v != i]
            kl = torch.stack(kls).mean() if kls else torch.zeros((), device=loss.device)
        self.update_center(teacher)
        return loss, {"embedding_std": embedding_std(out["z"][0]), "teacher_entropy": entropy / math.log(cfg.out_dim),
                      "kl_teacher_student": kl, "teacher_temperature": torch.full((), temp, device=loss.device),
                      "momentum": self.momentum_metric(loss)}
