"""The in-batch and queue contrastive objectives driven as ``mmcl.train`` drives them, step by step,
against plain-torch references written here from the papers' equations (float64).

Each test builds its objective through the registry (``build("objective", cfg)``), calls ``setup``,
then for several steps: ``loss, metrics = objective(model_out, batch)``, backward, an optimizer step
over the model's and the objective's parameters, and ``after_optimizer_step(step)``. After every
step it compares the loss, the gradients of the objective's inputs and of its own parameters
(predictors), and the state the step leaves (queue contents and pointer, momentum targets).
It also checks the metrics each step logs (``acc``, ``embedding_std``, ``momentum``, ...). The
references never call mmcl's own helpers (InfoNCE, gathers, queues, momentum targets).

The last sections check what the step-by-step runs cannot show: batches with a third view, a
negative that takes all the probability, inputs on another device, and the momentum target's
defaults.
"""

from __future__ import annotations

import copy
import importlib
import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.config import from_dict
from mmcl.objectives.momentum import MomentumTarget
from mmcl.optim import build_optimizer
from mmcl.recipe import OptimConfig
from mmcl.registry import build, registered

B = 6  # images per batch (per simulated process in the rank tests)
STEPS = 4  # optimizer steps per test: queues wrap, momentum updates run, schedules move
IMAGE = 8  # pixels per side of the random views
ENCODER = {"backbone": {"name": "cnn", "width": 4, "depth": 2, "norm": "bn"}, "projector": {"dims": [16, 8]}}
HEAD = {"dims": [16, 8]}  # predictor heads (BatchNorm between the layers, as in BYOL / SimSiam)


# --------------------------------------------------------------------------------------------- the trainer's calls
def objective_from(name: str, **params: Any) -> nn.Module:
    """The objective a recipe's ``objective: {name: ..., **params}`` section builds."""
    config_cls, _ = registered("objective")[name]
    return build("objective", from_dict(config_cls, params, "objective"))


def model_from(name: str, **params: Any) -> nn.Module:
    """The model a recipe's ``model: {name: ..., **params}`` section builds, in training mode."""
    config_cls, _ = registered("model")[name]
    return build("model", from_dict(config_cls, params, "model")).train()


def start(model: nn.Module, objective: nn.Module, total_steps: int) -> torch.optim.Optimizer:
    """``setup`` (heads, momentum copies) and the optimizer over model and objective, as mmcl.train does."""
    if hasattr(objective, "setup"):
        objective.setup(model, total_steps)
    return build_optimizer(OptimConfig(name="adamw", lr=1e-2, weight_decay=0.0), [model, objective])


def forward(model: nn.Module, objective: nn.Module,
            batch: dict[str, Any]) -> tuple[Any, torch.Tensor, dict[str, torch.Tensor]]:
    """Model outputs (their gradients kept for inspection), the objective's loss, back-propagated, and
    the metrics the trainer logs."""
    out = model(batch)
    for t in [*out.get("z", []), *(out[k] for k in ("image_features", "text_features", "logit_scale") if k in out)]:
        if t.requires_grad:
            t.retain_grad()
    loss, metrics = objective(out, batch)
    assert loss.ndim == 0 and all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values())
    loss.backward()
    return out, loss, metrics


def update(model: nn.Module, objective: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Optimizer step, then every ``after_optimizer_step`` hook with the 1-based step count."""
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for m in (model, objective):
        hook = getattr(m, "after_optimizer_step", None)
        if hook is not None:
            hook(step)


def two_views(gen: torch.Generator, n: int = B) -> dict[str, Any]:
    """A multi-view batch of random images."""
    return {"views": [torch.randn(n, 3, IMAGE, IMAGE, generator=gen) for _ in range(2)], "key": list(range(n))}


# --------------------------------------------------------------------------------------------- reference maths
def leaf(t: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``t`` that the reference differentiates with respect to."""
    return t.detach().double().requires_grad_()


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length."""
    return x / x.norm(dim=-1, keepdim=True)


def cross_entropy_rows(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Per row: ``-log(exp(l_pos) / Σ_j exp(l_j))``."""
    return torch.logsumexp(logits, dim=1) - logits[torch.arange(logits.shape[0]), pos]


def top1_rows(logits: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose largest logit is the positive column (the logged ``acc``)."""
    return (logits.argmax(dim=1) == pos).double().mean()


def spread(z: torch.Tensor) -> torch.Tensor:
    """The collapse monitor the trainer logs as ``embedding_std``: per-dimension std of the unit rows,
    averaged over dimensions."""
    return unit(z.detach().double()).std(dim=0).mean()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity."""
    return (unit(a) * unit(b)).sum(dim=-1)


def head_leaves(head: nn.Module) -> dict[str, torch.Tensor]:
    """float64 copies of a head's current weights, to differentiate with respect to."""
    return {name: leaf(p) for name, p in head.named_parameters()}


def head_forward(head: nn.Module, w: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """An MLP head (Linear, BatchNorm1d on batch statistics, ReLU) written out by hand with weights ``w``."""
    for i, layer in enumerate(head):
        if isinstance(layer, nn.Linear):
            x = x @ w[f"{i}.weight"].T + (w[f"{i}.bias"] if f"{i}.bias" in w else 0.0)
        elif isinstance(layer, nn.BatchNorm1d):
            x = (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, unbiased=False) + layer.eps)
            if layer.affine:
                x = x * w[f"{i}.weight"] + w[f"{i}.bias"]
        elif isinstance(layer, nn.ReLU):
            x = x.clamp(min=0)
        else:
            raise AssertionError(f"the reference head has no rule for {layer}")
    return x


def cosine_momentum(step: int, total: int, base: float) -> float:
    """BYOL / MoCo v3: ``1 − (1 − base)(cos(πk/K) + 1)/2`` for the update after ``k`` optimizer steps."""
    return 1 - (1 - base) * (math.cos(math.pi * step / total) + 1) / 2


class ReferenceTarget:
    """A float64 momentum copy of the online model: ``θ_t ← m θ_t + (1 − m) θ_o``, buffers copied."""

    def __init__(self, model: nn.Module):
        self.net = copy.deepcopy(model).double()

    @torch.no_grad()
    def projections(self, views: list[torch.Tensor]) -> list[torch.Tensor]:
        """The target's projections of each view (no gradient)."""
        return self.net({"views": [v.double() for v in views]})["z"]

    @torch.no_grad()
    def update(self, online: nn.Module, m: float) -> None:
        """One EMA step towards the online model's current weights."""
        params = dict(online.named_parameters())
        for name, t in self.net.named_parameters():
            t.copy_(m * t + (1 - m) * params[name].double())
        buffers = dict(online.named_buffers())
        for name, t in self.net.named_buffers():
            t.copy_(buffers[name])

    def assert_matches(self, target: nn.Module, online: nn.Module) -> None:
        """``target``'s weights equal the reference EMA; its buffers are the online model's."""
        mine = dict(self.net.named_parameters())
        for name, p in target.named_parameters():
            assert not p.requires_grad, f"momentum target parameter {name} is trained"
            torch.testing.assert_close(p.double(), mine[name], rtol=1e-5, atol=1e-6, msg=f"target {name}")
        online_buffers = dict(online.named_buffers())
        for name, b in target.named_buffers():
            assert torch.equal(b, online_buffers[name]), f"target buffer {name} is not the online model's"


def assert_close(actual: torch.Tensor | None, expected: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """float32 ``actual`` against the float64 reference, relative to the reference's largest entry."""
    assert actual is not None, f"{what}: no gradient"
    scale = expected.detach().abs().max().item()
    torch.testing.assert_close(actual.detach().double(), expected.detach(), rtol=rtol, atol=rtol * scale,
                               msg=lambda m: f"{what}: {m}")


def assert_loss(loss: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5) -> None:
    """The library's loss equals the reference loss."""
    assert loss.item() == pytest.approx(expected.item(), rel=rtol, abs=rtol), "loss differs from the reference"


def assert_metrics(metrics: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    """The objective logs exactly the metrics named in ``expected``, with those values."""
    assert set(metrics) == set(expected), f"logged metrics {sorted(metrics)}, expected {sorted(expected)}"
    for k, v in expected.items():
        v = v.detach() if isinstance(v, torch.Tensor) else v
        assert float(metrics[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-6), f"metric {k}"


def assert_grads(out_grads: list[torch.Tensor | None], leaves: list[torch.Tensor], ref_loss: torch.Tensor,
                 what: str, rtol: float = 1e-5) -> None:
    """The library's gradients equal the reference's (``None`` where the reference has no path)."""
    ref = torch.autograd.grad(ref_loss, leaves, allow_unused=True, retain_graph=True)
    for i, (g, r) in enumerate(zip(out_grads, ref)):
        if r is None or not r.abs().max() > 0:
            assert g is None or not g.abs().max() > 0, f"{what}[{i}]: gradient where the reference has none"
        else:
            assert_close(g, r, f"{what}[{i}]", rtol)


# --------------------------------------------------------------------------------------------- CLIP
def clip_rows(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Radford et al. (2021): per-row cross-entropies of ``s·I·Tᵀ`` (image→text) and of its transpose."""
    logits = scale * image @ text.T
    targets = torch.arange(image.shape[0])
    return cross_entropy_rows(logits, targets), cross_entropy_rows(logits.T, targets)


def test_clip_trains_features_and_temperature_like_the_paper() -> None:
    """Symmetric InfoNCE over several steps of a tiny real CLIP: loss, feature and temperature gradients."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("clip", open_clip_config="mmcl-tiny-vit")
    objective = objective_from("clip")
    optimizer = start(model, objective, STEPS)
    param = model.clip.logit_scale
    initial = param.item()
    for step in range(1, STEPS + 1):
        batch = {"image": torch.randn(B, 3, 32, 32, generator=gen),
                 "text": torch.randint(1, 49407, (B, 16), generator=gen)}
        out, loss, metrics = forward(model, objective, batch)
        assert "logit_bias" not in out  # mmcl's CLIP has no SigLIP-style bias to train
        image, text, scale = leaf(out["image_features"]), leaf(out["text_features"]), leaf(out["logit_scale"])
        i2t, t2i = clip_rows(image, text, scale)
        ref = 0.5 * (i2t.mean() + t2i.mean())
        assert_loss(loss, ref)
        assert_grads([out["image_features"].grad, out["text_features"].grad], [image, text], ref, "features")
        logits, own = scale * image @ text.T, torch.arange(B)
        assert_metrics(metrics, {"acc_i2t": top1_rows(logits, own), "acc_t2i": top1_rows(logits.T, own),
                                 "logit_scale": scale})
        (d_scale,) = torch.autograd.grad(ref, scale)
        # s = exp(p) below the clamp: dL/dp = dL/ds · s reaches the stored log-temperature
        assert_close(param.grad, d_scale * scale.detach(), "logit_scale parameter")
        update(model, objective, optimizer, step)
    assert abs(param.item() - initial) > 1e-3, "the temperature was not trained"


# --------------------------------------------------------------------------------------------- SimCLR, InvaSpread
def nt_xent_rows(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Chen et al. (2020): rows ``[z1; z2]`` (normalised), similarity ÷ τ, self excluded, positive the
    other view. Returns the masked logits and each row's positive column."""
    z = unit(torch.cat([z1, z2]))
    n = z1.shape[0]
    sim = z @ z.T / tau
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    pos = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return sim, pos


def simclr_rows(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """NT-Xent per row: ``-log exp(s_ij/τ) / Σ_{k≠i} exp(s_ik/τ)``."""
    return cross_entropy_rows(*nt_xent_rows(z1, z2, tau))


def invaspread_rows(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """Ye et al. (2019), both views as queries: ``-log P(pos|i) - Σ_{c≠pos,i} log(1 - P(c|i))`` with
    ``P(c|i) = exp(f_c·f_i/τ) / Σ_{k≠i} exp(f_k·f_i/τ)``."""
    sim, pos = nt_xent_rows(z1, z2, tau)
    p = torch.softmax(sim, dim=1)
    rows = torch.arange(sim.shape[0])
    neg = torch.ones_like(p, dtype=torch.bool)
    neg[rows, rows] = False
    neg[rows, pos] = False
    return -torch.log(p[rows, pos]) - torch.where(neg, torch.log(1 - p), torch.zeros_like(p)).sum(dim=1)


IN_BATCH = {"simclr": (simclr_rows, 0.2), "invaspread": (invaspread_rows, 0.1)}


Reference = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def assert_two_view_steps(name: str, params: dict[str, Any], reference: Reference) -> None:
    """A tiny CNN encoder trained with objective ``name`` (no trained parameters of its own) for
    ``STEPS`` steps on two views: at every step the loss, the gradients of both views' projections
    and every logged metric equal ``reference(z1, z2)``'s loss and metrics (plus ``embedding_std``)."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("encoder", **ENCODER)
    objective = objective_from(name, **params)
    optimizer = start(model, objective, STEPS)
    assert not list(objective.parameters())
    for step in range(1, STEPS + 1):
        out, loss, metrics = forward(model, objective, two_views(gen))
        z1, z2 = leaf(out["z"][0]), leaf(out["z"][1])
        ref, expected = reference(z1, z2)
        assert_loss(loss, ref)
        assert_grads([z.grad for z in out["z"]], [z1, z2], ref, "z")
        assert_metrics(metrics, {**expected, "embedding_std": spread(z1)})
        update(model, objective, optimizer, step)


@pytest.mark.parametrize("name", sorted(IN_BATCH))
def test_in_batch_objective_over_steps_of_a_real_encoder(name: str) -> None:
    """NT-Xent / invariance-spreading on a tiny CNN encoder: loss and gradients of both views, every step."""
    rows, tau = IN_BATCH[name]
    assert_two_view_steps(name, {"temperature": tau}, lambda z1, z2: (
        rows(z1, z2, tau).mean(), {"acc": top1_rows(*nt_xent_rows(z1, z2, tau))}))


# --------------------------------------------------------------------------------------------- simulated processes
def fake_topology(monkeypatch: pytest.MonkeyPatch, module: str, rank: int, n: int, full: list[torch.Tensor],
                  prepare: Any) -> None:
    """Make ``module`` see process ``rank`` of ``n``: its gather-with-gradient returns every process's
    rows (``prepare`` applied to the others' slices of ``full``, as their own processes would) with
    this process's tensor in its slot; the gradient of the sum of the processes' losses then reaches
    every row, as the real all-gather's backward (a sum over processes) delivers it."""
    mod = importlib.import_module(module)

    def gather(x: torch.Tensor) -> torch.Tensor:
        for t in full:  # which of the gathered inputs this is, by value
            mine = prepare(t[rank * B:(rank + 1) * B])
            if mine.shape == x.shape and torch.allclose(mine, x):
                return torch.cat([x if r == rank else prepare(t[r * B:(r + 1) * B]) for r in range(n)])
        raise AssertionError("the objective gathered a tensor that is not one of its inputs")

    monkeypatch.setattr(mod, "world", lambda: (rank, n))
    monkeypatch.setattr(mod, "gather_with_grad", gather)


@pytest.mark.parametrize("name", ["clip", "clip_local", "simclr", "invaspread"])
def test_processes_together_match_one_process_on_the_global_batch(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated processes: each one's loss is the reference loss of its rows (CLIP ``local_loss``,
    SimCLR, InvaSpread) or of the whole batch (CLIP), and the mean of their losses has the gradient
    of the reference on the global batch (what DDP's gradient averaging trains)."""
    n = 2
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(n * B, 8, generator=gen, dtype=torch.float64)
    b = torch.randn(n * B, 8, generator=gen, dtype=torch.float64)
    idx = [torch.arange(r * B, (r + 1) * B) for r in range(n)]
    if name.startswith("clip"):
        a, b = leaf(unit(a)), leaf(unit(b))  # the model hands CLIP normalised features
        scale = leaf(torch.tensor(7.0))
        objective = objective_from("clip", local_loss=name == "clip_local")
        i2t, t2i = clip_rows(a, b, scale)
        ref_r = [0.5 * (i2t[i].mean() + t2i[i].mean()) if name == "clip_local" else 0.5 * (i2t.mean() + t2i.mean())
                 for i in idx]
        module, prepare, leaves = "mmcl.objectives.clip", (lambda t: t), [a, b, scale]

        def out_of(r: int) -> dict[str, Any]:
            return {"image_features": a[idx[r]], "text_features": b[idx[r]], "logit_scale": scale}
    else:
        a, b = leaf(a), leaf(b)
        rows, tau = IN_BATCH[name]
        objective = objective_from(name, temperature=tau)
        per_row = rows(a, b, tau)
        ref_r = [per_row[torch.cat([i, i + n * B])].mean() for i in idx]
        module, prepare, leaves = f"mmcl.objectives.{name}", (lambda t: F.normalize(t, dim=-1)), [a, b]

        def out_of(r: int) -> dict[str, Any]:
            return {"z": [a[idx[r]], b[idx[r]]]}
    ref = torch.stack(ref_r).mean()
    losses = []
    for r in range(n):
        with monkeypatch.context() as m:
            fake_topology(m, module, r, n, [a, b], prepare)
            loss, _ = objective(out_of(r), None)
        assert loss.item() == pytest.approx(ref_r[r].item(), rel=1e-6), f"process {r}'s loss"  # float32 logits
        losses.append(loss)
    mean = torch.stack(losses).mean()
    mean.backward()
    for i, (t, g) in enumerate(zip(leaves, torch.autograd.grad(ref, leaves))):
        assert_close(t.grad, g, f"gradient of input {i}")


# --------------------------------------------------------------------------------------------- MoCo v1/v2
@pytest.mark.parametrize(("symmetric", "shuffle_bn"), [(False, True), (True, False)])
def test_moco_queue_of_momentum_keys_over_steps(symmetric: bool, shuffle_bn: bool) -> None:
    """He et al. (2020): ``-log exp(q·k₊/τ) / (exp(q·k₊/τ) + Σ_queue exp(q·k/τ))`` against the queue
    as it was before the step (random unit keys at first); then this step's momentum keys are written
    at the pointer (wrapping), the pointer advances, and the key encoder moves by ``m θ_k + (1 − m) θ_q``.
    One process: shuffle-BN changes nothing (``test_gather_processes`` checks it across processes)."""
    tau, m, size = 0.2, 0.9, 16  # 16 rows: the queue wraps on the third step (and every step, symmetric)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("encoder", **ENCODER)
    objective = objective_from("moco", queue_size=size, momentum=m, temperature=tau, symmetric=symmetric,
                               shuffle_bn=shuffle_bn)
    optimizer = start(model, objective, STEPS)
    reference = ReferenceTarget(model)
    queue, ptr = objective.queue.keys.detach().double().clone(), 0
    assert queue.shape == (size, model.embed_dim) and int(objective.queue.ptr) == 0
    torch.testing.assert_close(queue.norm(dim=1), torch.ones(size, dtype=torch.float64), msg="initial queue rows")
    pairs = [(0, 1), (1, 0)] if symmetric else [(0, 1)]
    for step in range(1, STEPS + 1):
        batch = two_views(gen)
        out, loss, metrics = forward(model, objective, batch)
        z = [leaf(t) for t in out["z"]]
        keys = [unit(k) for k in reference.projections(batch["views"])]
        terms, accs, positive = [], [], torch.zeros(B, dtype=torch.long)
        for qi, ki in pairs:
            q = unit(z[qi])
            logits = torch.cat([(q * keys[ki]).sum(dim=1, keepdim=True), q @ queue.T], dim=1) / tau
            terms.append(cross_entropy_rows(logits, positive).mean())
            accs.append(top1_rows(logits, positive))
        ref = torch.stack(terms).mean()
        assert_loss(loss, ref, rtol=1e-5)
        assert_grads([t.grad for t in out["z"]], z, ref, "z")
        assert_metrics(metrics, {"acc": torch.stack(accs).mean(), "embedding_std": spread(z[0]), "momentum": m})
        pushed = torch.cat([keys[ki] for _, ki in pairs])  # the KEYS of this step, never the queries
        rows = (ptr + torch.arange(pushed.shape[0])) % size
        queue[rows] = pushed
        ptr = (ptr + pushed.shape[0]) % size
        update(model, objective, optimizer, step)
        assert int(objective.queue.ptr) == ptr, f"queue pointer after step {step}"
        torch.testing.assert_close(objective.queue.keys.double(), queue, rtol=1e-5, atol=1e-6,
                                   msg=f"queue after step {step}")
        reference.update(model, m)
        reference.assert_matches(objective.target.net, model)


# --------------------------------------------------------------------------------------------- MoCo v3, BYOL
def mocov3_reference(p: list[torch.Tensor], keys: list[torch.Tensor],
                     tau: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Chen, Xie & He (2021): ``ctr(q₁, k₂) + ctr(q₂, k₁)``, ``ctr(q, k) = 2τ · CE(q·kᵀ/τ, own index)``;
    ``acc``: the mean of both directions' top-1."""
    q1, q2 = unit(p[0]), unit(p[1])
    k1, k2 = unit(keys[0]), unit(keys[1])
    own = torch.arange(q1.shape[0])
    loss = 2 * tau * (cross_entropy_rows(q1 @ k2.T / tau, own).mean() + cross_entropy_rows(q2 @ k1.T / tau, own).mean())
    return loss, {"acc": (top1_rows(q1 @ k2.T, own) + top1_rows(q2 @ k1.T, own)) / 2}


def byol_reference(p: list[torch.Tensor], targets: list[torch.Tensor],
                   tau: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Grill et al. (2020): ``ℓ(p₁, t₂) + ℓ(p₂, t₁)``, ``ℓ(p, t) = mean ‖p/‖p‖ − t/‖t‖‖²``, target fixed;
    no accuracy (there are no negatives)."""
    return sum(((unit(pi) - unit(ti.detach())) ** 2).sum(dim=1).mean() for pi, ti in ((p[0], targets[1]),
                                                                                      (p[1], targets[0]))), {}


PREDICTIVE = {"mocov3": (mocov3_reference, {"temperature": 0.2, "momentum": 0.6,
                                            "predictor": {**HEAD, "last_norm": "bn_noaffine"}}),
              "byol": (byol_reference, {"momentum": 0.6, "predictor": HEAD})}


@pytest.mark.parametrize("name", sorted(PREDICTIVE))
def test_predictor_and_cosine_momentum_target_over_steps(name: str) -> None:
    """Online predictions against the momentum target's projections of the other view: loss and
    gradients of the projections and of the predictor; the target follows the cosine schedule from
    ``momentum`` to 1 over ``total_steps`` (here: every step of the run, so it reaches 1), and each
    step logs the momentum of the update before it."""
    reference_loss, params = PREDICTIVE[name]
    tau = params.get("temperature", 0.0)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("encoder", **ENCODER)
    objective = objective_from(name, **params)
    optimizer = start(model, objective, STEPS)
    reference = ReferenceTarget(model)
    predictor = objective.predictor
    assert {id(p) for p in predictor.parameters()} <= {id(p) for g in optimizer.param_groups for p in g["params"]}
    for step in range(1, STEPS + 1):
        batch = two_views(gen)
        w = head_leaves(predictor)
        out, loss, metrics = forward(model, objective, batch)
        z = [leaf(t) for t in out["z"]]
        p = [head_forward(predictor, w, zi) for zi in z]  # the predictor on the online branch only
        ref, logged = reference_loss(p, reference.projections(batch["views"]), tau)
        assert_loss(loss, ref, rtol=1e-5)
        assert_grads([t.grad for t in out["z"]], z, ref, "z")
        assert_metrics(metrics, {**logged, "embedding_std": spread(z[0]),
                                 "momentum": cosine_momentum(step - 1, STEPS, params["momentum"])})
        names = list(w)
        assert_grads([dict(predictor.named_parameters())[k].grad for k in names], [w[k] for k in names], ref,
                     "predictor")
        update(model, objective, optimizer, step)
        reference.update(model, cosine_momentum(step, STEPS, params["momentum"]))
        reference.assert_matches(objective.target.net, model)


# --------------------------------------------------------------------------------------------- SimSiam
def test_simsiam_stops_the_gradient_of_the_targets_over_steps() -> None:
    """Chen & He (2021): ``−½ (cos(p₁, sg(z₂)) + cos(p₂, sg(z₁)))``; gradients reach ``z`` only through
    the predictor, which is trained."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("encoder", **ENCODER)
    objective = objective_from("simsiam", predictor=HEAD)
    optimizer = start(model, objective, STEPS)
    predictor = objective.predictor
    for step in range(1, STEPS + 1):
        w = head_leaves(predictor)
        out, loss, metrics = forward(model, objective, two_views(gen))
        z = [leaf(t) for t in out["z"]]
        p = [head_forward(predictor, w, zi) for zi in z]
        ref = -0.5 * (cosine(p[0], z[1].detach()).mean() + cosine(p[1], z[0].detach()).mean())
        assert loss.item() == pytest.approx(ref.item(), abs=1e-6)  # a sum of cosines near cancelling: absolute
        assert_grads([t.grad for t in out["z"]], z, ref, "z")
        assert_metrics(metrics, {"embedding_std": spread(z[0])})
        names = list(w)
        assert_grads([dict(predictor.named_parameters())[k].grad for k in names], [w[k] for k in names], ref,
                     "predictor")
        update(model, objective, optimizer, step)


# --------------------------------------------------------------------------------------------- more than two views
TWO_VIEW = {"simclr": {"temperature": 0.2}, "invaspread": {"temperature": 0.1}, "mocov3": PREDICTIVE["mocov3"][1],
            "byol": PREDICTIVE["byol"][1], "simsiam": {"predictor": HEAD}}


@pytest.mark.parametrize("name", sorted(TWO_VIEW))
def test_two_view_objectives_use_the_first_two_of_more_views(name: str) -> None:
    """A batch with a third view (multi-crop augmentation): loss, gradients and metrics are those of
    the first two views alone, and the third view gets no gradient."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("encoder", **ENCODER)
    objective = objective_from(name, **TWO_VIEW[name])
    start(model, objective, STEPS)
    views = [torch.randn(B, 3, IMAGE, IMAGE, generator=gen) for _ in range(3)]
    z = [t.detach().requires_grad_() for t in model({"views": views})["z"]]
    loss3, metrics3 = objective({"z": z}, {"views": views})
    grads3 = torch.autograd.grad(loss3, z, allow_unused=True)
    loss2, metrics2 = objective({"z": z[:2]}, {"views": views[:2]})
    grads2 = torch.autograd.grad(loss2, z[:2])
    assert loss3.item() == loss2.item()
    assert metrics3.keys() == metrics2.keys() and all(float(metrics3[k]) == float(metrics2[k]) for k in metrics2)
    assert all(torch.equal(a, b) for a, b in zip(grads3, grads2)) and grads3[2] is None


# --------------------------------------------------------------------------------------------- a certain negative
def test_invaspread_stays_finite_when_a_negative_takes_all_the_probability() -> None:
    """The same image twice in a batch at a low temperature: for each copy the other copy is a negative
    with probability 1 in float32, and ``log(1 − P)`` must not reach −inf. No warning either (the
    trainer's logs stay clean)."""
    a, b, c = torch.eye(3)
    z = [torch.stack([a, a]).requires_grad_(), torch.stack([b, c]).requires_grad_()]
    objective = objective_from("invaspread", temperature=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, metrics = objective({"z": z}, None)
        loss.backward()
    assert torch.isfinite(loss), "the loss of a batch with a repeated image is not finite"
    assert all(torch.isfinite(t.grad).all() for t in z), "gradients of a batch with a repeated image"


# --------------------------------------------------------------------------------------------- devices
CONTRASTIVE = {"clip": {}, "clip_local": {"local_loss": True}, "simclr": {}, "invaspread": {},
               "moco": {"queue_size": 16}, "moco_noshuffle": {"queue_size": 16, "shuffle_bn": False},
               "mocov3": PREDICTIVE["mocov3"][1], "byol": PREDICTIVE["byol"][1], "simsiam": {"predictor": HEAD}}
DEVICES = ["meta", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", sorted(CONTRASTIVE))
def test_objectives_keep_their_tensors_on_the_inputs_device(name: str, device: str) -> None:
    """Labels, masks and positives are made on the inputs' device. "meta" stands in for an accelerator
    on a CPU-only machine: mixing it with CPU tensors fails as CUDA does."""
    torch.manual_seed(0)
    objective = objective_from(name.split("_")[0], **CONTRASTIVE[name])
    if hasattr(objective, "setup"):
        objective.setup(model_from("encoder", **ENCODER), STEPS)
    objective.to(device)
    if name.startswith("clip"):
        z = [F.normalize(torch.randn(B, 8, device=device), dim=-1).requires_grad_() for _ in range(2)]
        scale = torch.tensor(10.0, device=device, requires_grad=True)
        out: dict[str, Any] = {"image_features": z[0], "text_features": z[1], "logit_scale": scale}
    else:
        z = [torch.randn(B, 8, device=device, requires_grad=True) for _ in range(2)]
        out = {"z": z}
    loss, metrics = objective(out, {"views": [torch.randn(B, 3, IMAGE, IMAGE, device=device) for _ in range(2)]})
    loss.backward()
    assert loss.device.type == device and z[0].grad is not None  # MoCo (not symmetric) uses view 1 as query only
    assert all(t.grad is None or t.grad.device.type == device for t in z)
    assert all(v.device.type == device for k, v in metrics.items() if k.startswith("acc"))


# --------------------------------------------------------------------------------------------- momentum targets
class Scaled(nn.Module):
    """A network whose forward takes a keyword argument."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return self.lin(x) * scale


def test_momentum_target_defaults_to_a_fixed_ema_and_is_called_like_its_network() -> None:
    """``MomentumTarget(online, m)``: every update is ``m θ_t + (1 − m) θ_o``; calling it calls the copy
    with the same positional and keyword arguments, without gradient."""
    torch.manual_seed(0)
    online = Scaled()
    target = MomentumTarget(online, 0.5)
    expected = target.net.lin.weight.detach().clone()
    for step in (1, 2):
        with torch.no_grad():
            online.lin.weight.add_(1.0)
        target.update(step)
        expected = 0.5 * expected + 0.5 * online.lin.weight.detach()
        assert target.momentum == 0.5, f"momentum of update {step}"
        torch.testing.assert_close(target.net.lin.weight, expected, msg=f"target after update {step}")
    x = torch.randn(4, 3, requires_grad=True)
    y = target(x, scale=3.0)
    assert not y.requires_grad
    torch.testing.assert_close(y, 3.0 * target.net.lin(x).detach())


@pytest.mark.parametrize("total_steps", [None, 0, 1])
def test_cosine_momentum_of_a_run_of_at_most_one_step_ends_at_one(total_steps: int | None) -> None:
    """A one-step run (a smoke test), a length of 0, or the default length: the cosine schedule is over
    after the first update, whose momentum is 1 (the target keeps its weights)."""
    torch.manual_seed(0)
    online = Scaled()
    target = MomentumTarget(online, 0.5, "cosine", **({} if total_steps is None else {"total_steps": total_steps}))
    before = target.net.lin.weight.detach().clone()
    with torch.no_grad():
        online.lin.weight.add_(1.0)
    target.update(1)
    assert target.momentum == 1.0
    torch.testing.assert_close(target.net.lin.weight, before)
