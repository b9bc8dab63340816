"""The two optimizer pieces mmcl keeps by hand, checked against the libraries that also have them,
where the formulas agree (docs/libraries.md says why each is kept): LARS against timm's ``Lars``
(timm comes with open_clip) and the warm-up + cosine schedule against transformers'."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mmcl.optim import LARS, build_optimizer, param_groups
from mmcl.train import lr_factor


def _steps(make_optimizer, steps: int = 4) -> list[torch.Tensor]:
    """The parameters of a small net after ``steps`` updates on fixed data."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    optimizer = make_optimizer(net)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    for _ in range(steps):
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("foreach", [False, True])
def test_lars_is_timms_lars_without_weight_decay(foreach: bool) -> None:
    """Without weight decay both trust ratios are ``η ‖w‖ / ‖g‖``; with it, mmcl divides by
    ``‖g + λw‖`` (SimCLR, BYOL, MoCo v3) and timm by ``‖g‖ + λ‖w‖`` (You et al.), so only here
    can the two agree. Biases and norms (``lars_exclude``) take plain SGD steps in both."""
    from timm.optim import Lars

    def timm_lars(net: nn.Module) -> torch.optim.Optimizer:
        groups = param_groups([net], 0.0)
        for g in groups:
            g["always_adapt"] = not g.pop("lars_exclude", False)
        return Lars(groups, lr=0.5, momentum=0.9, trust_coeff=0.001, eps=0.0, foreach=foreach)

    ours = _steps(lambda net: LARS(param_groups([net], 0.0), lr=0.5, momentum=0.9))
    theirs = _steps(timm_lars)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


class _LarsOneByOne(torch.optim.Optimizer):
    """mmcl's LARS until 2026-11, one parameter at a time: the reference of its multi-tensor step."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "eta": eta,
                                  "lars_exclude": False})

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad.clone()
                if not g["lars_exclude"]:
                    w_norm, d_norm = p.norm(), d.norm()
                    ok = (w_norm > 0) & (d_norm > 0)
                    trust = torch.where(ok, g["eta"] * w_norm / d_norm.clamp(min=1e-12), torch.ones_like(w_norm))
                    d = d.mul(trust)
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    buf = self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lars_multi_tensor_step_is_the_one_parameter_at_a_time_step(dtype: torch.dtype) -> None:
    """The multi-tensor step against the step it replaced, over 6 steps of a net with weight decay,
    momentum, a schedule, exempt biases and norms at their own rate, a weight of zeros (trust 1), a
    frozen layer and one left without a gradient: the same weights and momentum buffers, bit for bit."""
    def net() -> nn.Module:
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3),
                          nn.Linear(5, 2)).to(dtype)
        nn.init.zeros_(m[3].weight)
        m[0].bias.requires_grad_(False)
        return m

    nets = [net(), net()]
    optimizers = [cls(param_groups([m], 0.05, lr=0.3, exempt_lr_scale=0.1), lr=0.3, momentum=0.9)
                  for cls, m in zip((LARS, _LarsOneByOne), nets)]
    schedules = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)) for o in optimizers]
    for step in range(6):
        x = torch.randn(16, 5, dtype=dtype, generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(step))
        for m, opt, sched in zip(nets, optimizers, schedules):
            opt.zero_grad()
            nn.functional.cross_entropy(m[:5](x), y).backward()  # the last layer: no gradient
            opt.step()
            sched.step()
    assert nets[0][5].weight.grad is None and nets[0][0].bias.grad is None
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        assert torch.equal(a, b), (name, (a - b).abs().max().item())
        if a.requires_grad and name != "5.weight" and name != "5.bias":
            assert torch.equal(optimizers[0].state[a]["momentum_buffer"], optimizers[1].state[b]["momentum_buffer"])
    assert not torch.equal(nets[0][3].weight, torch.zeros_like(nets[0][3].weight))  # the zero weight moved


def test_schedule_is_transformers_cosine_one_step_earlier_in_the_warmup() -> None:
    """After the warm-up, ``lr_factor`` is transformers' cosine-with-minimum schedule; during it,
    mmcl's factor at step ``s`` is transformers' at ``s + 1``: the first step trains at
    ``1 / warmup`` of the rate, not at 0, and the last warm-up step at the full rate."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    total, warmup, floor = 50, 8, 0.1
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, warmup, total, min_lr_rate=floor).lr_lambdas[0]
    for s in range(total + 3):
        want = theirs(s + 1) if s < warmup else theirs(s) if s <= total else floor  # mmcl stays at the floor
        assert math.isclose(lr_factor(s, total, warmup, "cosine", floor), want, rel_tol=1e-12), s
    assert lr_factor(0, total, warmup, "cosine", floor) == 1 / warmup
    assert [lr_factor(s, total, 2, "constant", floor) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_exempt_lr_scale_gives_biases_and_norms_their_own_rate_on_the_same_schedule(name: str) -> None:
    """``optim.exempt_lr_scale`` (Barlow Twins trains biases and norms at 0.0048 against 0.2 for the
    weights): in the first step, under a schedule at half the rate, matrices move exactly as without
    it and every exempt parameter moves ``scale`` times as far (for AdamW, whose first step is
    ``lr · sign(g)``, too)."""
    from mmcl.optim import build_optimizer
    from mmcl.recipe import OptimConfig

    def first_step(scale: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        optimizer = build_optimizer(OptimConfig(name=name, lr=0.5, weight_decay=0.01, exempt_lr_scale=scale), [net])
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5)
        assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.25 * scale]
        x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
        nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        return {n: p.detach() - before[n] for n, p in net.named_parameters()}

    plain, scaled = first_step(1.0), first_step(0.024)
    for n, moved in plain.items():
        exempt = n.endswith("bias") or n.startswith("1.")  # "1." is the LayerNorm
        assert moved.abs().sum() > 0, n
        torch.testing.assert_close(scaled[n], moved * 0.024 if exempt else moved, rtol=1e-9, atol=0), n


def test_fused_sgd_whose_first_step_is_skipped_then_steps_as_plain_sgd() -> None:
    """The device vote skips a non-finite step through ``found_inf``; torch's fused SGD would keep the
    uninitialised momentum buffers of a skipped first step (NaN here: deterministic mode fills
    uninitialised memory) and poison every later update. mmcl's starts them at zero."""
    cfg = SimpleNamespace(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.0, exempt_lr_scale=1.0, fused=True)
    fused_net, plain_net = nn.Linear(4, 3), nn.Linear(4, 3)
    plain_net.load_state_dict(fused_net.state_dict())
    fused, plain = build_optimizer(cfg, [fused_net]), build_optimizer(SimpleNamespace(**{**vars(cfg), "fused": False}),
                                                                      [plain_net])
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for p in fused_net.parameters():
            p.grad = torch.full_like(p, float("nan"))
        fused.found_inf = torch.tensor(1.0)
        fused.step()  # skipped
        for step in range(2):
            x = torch.randn(8, 4, generator=torch.Generator().manual_seed(step))
            for net, opt in ((fused_net, fused), (plain_net, plain)):
                opt.zero_grad()
                net(x).square().sum().backward()
                if opt is fused:
                    opt.found_inf = torch.tensor(0.0)
                opt.step()
    finally:
        torch.use_deterministic_algorithms(was)
    for a, b in zip(fused_net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b)
