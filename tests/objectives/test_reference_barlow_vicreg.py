"""Barlow Twins and VICReg driven as ``mmcl.train`` drives them, step by step, against plain float64
references written here from the papers' pseudo-code (Zbontar et al., 2021, Algorithm 1; Bardes et
al., 2022, Algorithm 1), never calling mmcl's helpers.

Then what the step-by-step runs cannot show: two simulated processes on halves of a batch against
one process on the whole batch (the statistics must be the global batch's: a per-process
normalisation fails here), a third view, bfloat16 autocast, and the configs' checks.
"""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch

from mmcl.errors import ConfigError

from .test_reference_contrastive import (
    IMAGE,
    B,
    assert_close,
    assert_loss,
    assert_two_view_steps,
    leaf,
    objective_from,
)


# --------------------------------------------------------------------------------------------- reference maths
def off_diagonal_mask(d: int) -> torch.Tensor:
    """True off the diagonal of a d × d matrix."""
    return ~torch.eye(d, dtype=torch.bool)


def barlow_reference(z_a: torch.Tensor, z_b: torch.Tensor, lambd: float,
                     eps: float = 1e-5) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Zbontar et al. (2021), Algorithm 1, with the official code's normalisation (``BatchNorm1d``
    without affine: biased std with ``eps``; the pseudo-code writes ``z.std(0)``):

    ``c = z_a_normᵀ z_b_norm / N``; ``c_diff = (c − I)²``, off-diagonal entries × λ; ``loss = Σ c_diff``."""
    n, d = z_a.shape

    def norm(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.sum(dim=0) / n
        return centred / torch.sqrt((centred ** 2).sum(dim=0) / n + eps)

    c = norm(z_a).T @ norm(z_b) / n
    c_diff = (c - torch.eye(d, dtype=c.dtype)) ** 2
    weights = torch.where(off_diagonal_mask(d), torch.tensor(lambd, dtype=c.dtype), torch.tensor(1.0, dtype=c.dtype))
    on = c_diff.diagonal().sum()
    off = (c ** 2)[off_diagonal_mask(d)].sum()
    return (c_diff * weights).sum(), {"on_diag": on, "off_diag": off}


def vicreg_terms(z_a: torch.Tensor, z_b: torch.Tensor, gamma: float = 1.0,
                 eps: float = 1e-4) -> dict[str, torch.Tensor]:
    """Bardes et al. (2022), Algorithm 1, per term, unweighted:

    - ``invariance``: ``mse_loss(z_a, z_b)`` (mean over N × D),
    - ``variance``: ``mean(relu(γ − sqrt(var(z) + ε)))`` per branch (unbiased variance), the two
      branches averaged (the official code's ``/ 2``, with which the paper's coefficients were tuned;
      the pseudo-code adds them),
    - ``covariance``: ``Σ off-diagonal(cov(z))² / D`` per branch (unbiased covariance), the two added."""
    n, d = z_a.shape

    def std(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.sum(dim=0) / n
        return torch.sqrt((centred ** 2).sum(dim=0) / (n - 1) + eps)

    def cov(z: torch.Tensor) -> torch.Tensor:
        centred = z - z.sum(dim=0) / n
        return torch.einsum("ni,nj->ij", centred, centred) / (n - 1)

    return {"invariance": ((z_a - z_b) ** 2).sum() / (n * d),
            "variance": sum(torch.clamp(gamma - std(z), min=0).sum() / d for z in (z_a, z_b)) / 2,
            "covariance": sum((cov(z) ** 2)[off_diagonal_mask(d)].sum() / d for z in (z_a, z_b))}


def vicreg_reference(z_a: torch.Tensor, z_b: torch.Tensor, sim: float = 25.0, std: float = 25.0,
                     cov: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``λ s + μ v + ν c`` and its terms."""
    t = vicreg_terms(z_a, z_b)
    return sim * t["invariance"] + std * t["variance"] + cov * t["covariance"], t


METHODS = {"barlow_twins": ({"lambd": 0.05}, lambda a, b: barlow_reference(a, b, 0.05)),
           "vicreg": ({"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0}, vicreg_reference)}


# --------------------------------------------------------------------------------------------- over steps
@pytest.mark.parametrize("name", sorted(METHODS))
def test_objective_over_steps_of_a_real_encoder(name: str) -> None:
    """A tiny CNN encoder trained for several steps: the loss, the gradients of both views'
    projections and every logged metric equal the reference's at every step."""
    params, reference = METHODS[name]
    assert_two_view_steps(name, params, reference)


def test_barlow_twins_defaults_are_the_papers() -> None:
    """λ = 0.0051 (the official code's default) and BatchNorm's ε; the loss of random projections
    with those defaults equals the reference's."""
    objective = objective_from("barlow_twins")
    assert (objective.cfg.lambd, objective.cfg.eps) == (0.0051, 1e-5)
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(32, 16, generator=g, dtype=torch.float64) for _ in range(2)]
    assert_loss(objective({"z": z})[0], barlow_reference(*z, 0.0051)[0], rtol=1e-9)


def test_vicreg_defaults_are_the_papers() -> None:
    """λ = μ = 25, ν = 1, γ = 1, ε = 1e-4."""
    cfg = objective_from("vicreg").cfg
    assert (cfg.sim_coeff, cfg.std_coeff, cfg.cov_coeff, cfg.std_target, cfg.eps) == (25.0, 25.0, 1.0, 1.0, 1e-4)


# --------------------------------------------------------------------------------------------- simulated processes
def fake_gather(monkeypatch: pytest.MonkeyPatch, module: str, rank: int, n: int, full: list[torch.Tensor]) -> None:
    """Make ``module``'s gather-with-gradient return every process's rows of ``full`` with this
    process's own tensor in its slot, as the real all-gather does; the other processes' rows stay
    differentiable slices of ``full``, so the gradient of the sum of the processes' losses reaches
    every row (what the real all-gather's backward, a sum over processes, delivers)."""
    mod = importlib.import_module(module)

    def gather(x: torch.Tensor) -> torch.Tensor:
        for t in full:  # which of the inputs this is, by value
            if torch.equal(t[rank * B:(rank + 1) * B], x):
                return torch.cat([x if r == rank else t[r * B:(r + 1) * B] for r in range(n)])
        raise AssertionError("the objective gathered a tensor that is not one of its inputs")

    monkeypatch.setattr(mod, "gather_with_grad", gather)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_processes_together_match_one_process_on_the_global_batch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated processes: each one's loss is the reference loss with the statistics of the whole
    batch (VICReg: plus its own rows' invariance term), and the mean of their losses has the gradient
    of the reference on the global batch (what DDP's gradient averaging trains). The batch is chosen so
    that per-process statistics would give another loss: the check can fail."""
    n = 2
    params, reference = METHODS[name]
    gen = torch.Generator().manual_seed(3)
    shift = torch.arange(n * B, dtype=torch.float64)[:, None] / B  # the halves' means and spreads differ
    a = leaf(torch.randn(n * B, 8, generator=gen, dtype=torch.float64) + shift)
    b = leaf(torch.randn(n * B, 8, generator=gen, dtype=torch.float64) * (1 + shift))
    idx = [torch.arange(r * B, (r + 1) * B) for r in range(n)]
    ref, terms = reference(a, b)
    if name == "vicreg":  # invariance over each process's rows, variance and covariance over all
        ref_r = [ref - 25.0 * terms["invariance"] + 25.0 * vicreg_terms(a[i], b[i])["invariance"] for i in idx]
    else:
        ref_r = [ref] * n
    local = [reference(a[i], b[i])[0] for i in idx]  # what per-process statistics would give
    assert all(abs(loc.item() - r.item()) > 1e-2 * abs(r.item()) for loc, r in zip(local, ref_r))
    objective = objective_from(name, **params)
    losses = []
    for r in range(n):
        with monkeypatch.context() as m:
            fake_gather(m, f"mmcl.objectives.{'barlow' if name == 'barlow_twins' else name}", r, n, [a, b])
            loss, _ = objective({"z": [a[idx[r]], b[idx[r]]]}, None)
        assert loss.item() == pytest.approx(ref_r[r].item(), rel=1e-9), f"process {r}'s loss"
        losses.append(loss)
    torch.stack(losses).mean().backward()
    for i, (t, g) in enumerate(zip((a, b), torch.autograd.grad(torch.stack(ref_r).mean(), (a, b)))):
        assert_close(t.grad, g, f"gradient of input {i}", rtol=1e-9)


# --------------------------------------------------------------------------------------------- views, precision
@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_third_view_is_ignored(name: str) -> None:
    """A batch with a third view: loss, metrics and gradients are those of the first two views."""
    torch.manual_seed(0)
    z = [torch.randn(B, 8, requires_grad=True) for _ in range(3)]
    objective = objective_from(name, **METHODS[name][0])
    loss3, metrics3 = objective({"z": z})
    grads3 = torch.autograd.grad(loss3, z, allow_unused=True)
    loss2, metrics2 = objective({"z": z[:2]})
    grads2 = torch.autograd.grad(loss2, z[:2])
    assert loss3.item() == loss2.item() and all(float(metrics3[k]) == float(metrics2[k]) for k in metrics2)
    assert all(torch.equal(g3, g2) for g3, g2 in zip(grads3, grads2)) and grads3[2] is None


@pytest.mark.parametrize("name", sorted(METHODS))
def test_bfloat16_autocast_still_computes_in_float32(name: str) -> None:
    """Under a bf16 recipe's autocast the statistics and the D × D matrices stay float32: the loss is
    the float32 loss (bf16 matmuls are off by 2e-3 to 3e-3 relative on such inputs)."""
    torch.manual_seed(0)
    z = [torch.randn(64, 32) * 2 for _ in range(2)]
    objective = objective_from(name, **METHODS[name][0])
    plain, _ = objective({"z": z})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed, _ = objective({"z": z})
    assert mixed.dtype == torch.float32 and mixed.item() == pytest.approx(plain.item(), rel=1e-6)


def test_objectives_follow_the_inputs_device() -> None:
    """No tensor is made on a default device ("meta" stands in for an accelerator)."""
    for name in METHODS:
        z = [torch.randn(B, 8, device="meta", requires_grad=True) for _ in range(2)]
        loss, metrics = objective_from(name, **METHODS[name][0])({"z": z, "views": [torch.randn(B, 3, IMAGE, IMAGE)]})
        assert loss.device.type == "meta" and all(v.device.type == "meta" for v in metrics.values())


# --------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize(("name", "params", "key"), [
    ("barlow_twins", {"lambd": -0.1}, "lambd"), ("barlow_twins", {"eps": 0.0}, "eps"),
    ("vicreg", {"std_coeff": -1.0}, "std_coeff"), ("vicreg", {"std_target": 0.0}, "std_target"),
    ("vicreg", {"eps": 0.0}, "eps"), ("vicreg", {"lambda": 25}, "lambda"),
])
def test_bad_settings_are_refused_naming_the_key(name: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=f"objective.{key}"):
        objective_from(name, **params)
