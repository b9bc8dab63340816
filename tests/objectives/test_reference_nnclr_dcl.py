"""NNCLR and DCL / DCLW driven as ``mmcl.train`` drives them, step by step, against plain float64
references written here from the papers' equations (Dwibedi et al., 2021; Yeh et al., 2022).

Each step-by-step test builds its objective through the registry, calls ``setup``, then for several
steps: forward, backward, an optimizer step over the model's and the objective's parameters, and
``after_optimizer_step``; it compares the loss, the gradients of the objective's inputs and of its
predictor, the logged metrics and (NNCLR) the support set the step leaves. The references use no
mmcl helper (no InfoNCE, gather, queue or nearest-neighbour function of the library).
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from mmcl.config import from_dict
from mmcl.errors import ConfigError
from mmcl.registry import registered

from .test_reference_contrastive import (
    ENCODER,
    HEAD,
    STEPS,
    B,
    assert_close,
    assert_grads,
    assert_loss,
    assert_metrics,
    assert_two_view_steps,
    cross_entropy_rows,
    fake_topology,
    forward,
    head_forward,
    head_leaves,
    leaf,
    model_from,
    nt_xent_rows,
    objective_from,
    spread,
    start,
    top1_rows,
    two_views,
    unit,
    update,
)


# --------------------------------------------------------------------------------------------- DCL, DCLW
def dcl_rows(z1: torch.Tensor, z2: torch.Tensor, tau: float, sigma: float | None = None) -> torch.Tensor:
    """Yeh et al. (2022), both views as anchors: ``−w_i s(i, i⁺)/τ + log Σ_{k ∉ {i, i⁺}} exp(s(i, k)/τ)``
    over the 2n unit rows; ``w_i = 1`` (DCL) or ``2 − exp(s(i, i⁺)/σ) / mean_j exp(s(j, j⁺)/σ)`` (DCLW),
    written row by row."""
    z = unit(torch.cat([z1, z2]))
    n = z1.shape[0]
    positive_cos = (unit(z1) * unit(z2)).sum(dim=1)
    rows = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        negatives = torch.stack([z[i] @ z[k] / tau for k in range(2 * n) if k not in (i, pos)])
        weight = 1.0
        if sigma is not None:
            e = torch.exp(positive_cos / sigma)
            weight = 2 - e[i % n] / e.mean()
        rows.append(-weight * (z[i] @ z[pos]) / tau + torch.log(torch.exp(negatives).sum()))
    return torch.stack(rows)


DCL = {"dcl": ({"temperature": 0.2}, None), "dclw": ({"temperature": 0.2, "sigma": 0.5}, 0.5)}


@pytest.mark.parametrize("name", sorted(DCL))
def test_dcl_over_steps_of_a_real_encoder(name: str) -> None:
    """DCL / DCLW on a tiny CNN encoder: loss, gradients of both views and metrics, every step."""
    params, sigma = DCL[name]
    tau = params["temperature"]
    assert_two_view_steps(name, params, lambda z1, z2: (
        dcl_rows(z1, z2, tau, sigma).mean(), {"acc": top1_rows(*nt_xent_rows(z1, z2, tau))}))


def test_dclw_weights_differ_from_dcl_and_dcl_from_nt_xent() -> None:
    """The three losses are different functions of the same embeddings (any of them computed with
    another's formula fails here), related row by row as the paper says: with the positive back in
    the denominator, ``NT-Xent_i = −s⁺ + log(e^{s⁺} + e^{DCL_i + s⁺}) = log(1 + e^{DCL_i})``."""
    gen = torch.Generator().manual_seed(5)
    z = [torch.randn(B, 8, generator=gen, dtype=torch.float64) for _ in range(2)]
    tau = 0.2
    dcl = objective_from("dcl", temperature=tau)({"z": z})[0]
    dclw = objective_from("dclw", temperature=tau, sigma=0.5)({"z": z})[0]
    nt = objective_from("simclr", temperature=tau)({"z": z})[0]
    assert abs(dcl.item() - dclw.item()) > 1e-3 and abs(dcl.item() - nt.item()) > 1e-3
    assert dcl.item() == pytest.approx(dcl_rows(*z, tau).mean().item(), rel=1e-6)
    assert dclw.item() == pytest.approx(dcl_rows(*z, tau, 0.5).mean().item(), rel=1e-6)
    assert nt.item() == pytest.approx(F.softplus(dcl_rows(*z, tau)).mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", sorted(DCL))
def test_dcl_processes_together_match_one_process_on_the_global_batch(name: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Two simulated processes: each one's loss is the reference mean over its rows (DCLW's weights
    normalised over the global batch), and the mean of their losses has the gradient of the
    reference on the global batch (what DDP's averaging trains)."""
    params, sigma = DCL[name]
    n = 2
    gen = torch.Generator().manual_seed(3)
    a = leaf(torch.randn(n * B, 8, generator=gen, dtype=torch.float64))
    b = leaf(torch.randn(n * B, 8, generator=gen, dtype=torch.float64))
    per_row = dcl_rows(a, b, params["temperature"], sigma)
    idx = [torch.arange(r * B, (r + 1) * B) for r in range(n)]
    ref_r = [per_row[torch.cat([i, i + n * B])].mean() for i in idx]
    objective = objective_from(name, **params)
    losses = []
    for r in range(n):
        with monkeypatch.context() as m:
            fake_topology(m, "mmcl.objectives.dcl", r, n, [a, b], lambda t: F.normalize(t, dim=-1))
            loss, _ = objective({"z": [a[idx[r]], b[idx[r]]]}, None)
        assert loss.item() == pytest.approx(ref_r[r].item(), rel=1e-6, abs=1e-6), f"process {r}'s loss"
        losses.append(loss)
    torch.stack(losses).mean().backward()
    ref = torch.stack(ref_r).mean()
    for i, (t, g) in enumerate(zip([a, b], torch.autograd.grad(ref, [a, b]))):
        assert_close(t.grad, g, f"gradient of input {i}")


# --------------------------------------------------------------------------------------------- NNCLR
def nnclr_reference(z: list[torch.Tensor], p: list[torch.Tensor], support: torch.Tensor, tau: float,
                    symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dwibedi et al. (2021): ``NN(z)`` = the support row of largest cosine with ``unit(z)`` (a
    constant); ``L(nn, p) = CE(unit(nn)·unit(p)ᵀ / τ, own index)``; loss ``(L(NN1, p2) + L(NN2, p1))/2``,
    and with ``symmetric`` the transposed terms ``CE(unit(p)·unit(nn)ᵀ / τ)`` averaged in. Returns the
    loss and the mean top-1 accuracy of the terms."""
    own = torch.arange(z[0].shape[0])
    terms, accs = [], []
    for zi, pj in ((z[0], p[1]), (z[1], p[0])):
        cos = unit(zi.detach()) @ support.T
        nn_ = support[torch.tensor([int(row.argmax()) for row in cos])]
        directions = [unit(nn_) @ unit(pj).T / tau]
        if symmetric:
            directions.append(unit(pj) @ unit(nn_).T / tau)
        for logits in directions:
            terms.append(cross_entropy_rows(logits, own).mean())
            accs.append(top1_rows(logits, own))
    return torch.stack(terms).mean(), torch.stack(accs).mean()


@pytest.mark.parametrize(("symmetric", "predictor"), [(True, True), (False, False)])
def test_nnclr_support_set_neighbours_and_loss_over_steps(symmetric: bool, predictor: bool) -> None:
    """Loss, gradients of the projections (through the predictions only: the neighbours are
    constants) and of the predictor, metrics; after every optimizer step, view 1's normalised
    projections are written into the support set at the pointer (wrapping: 16 rows, 6 per step)."""
    tau, size = 0.2, 16
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    model = model_from("encoder", **ENCODER)
    objective = objective_from("nnclr", queue_size=size, temperature=tau, symmetric=symmetric,
                               predictor=HEAD if predictor else None)
    optimizer = start(model, objective, STEPS)
    assert hasattr(objective, "predictor") == predictor
    support, ptr = objective.support.keys.detach().double().clone(), 0
    assert support.shape == (size, model.embed_dim)
    torch.testing.assert_close(support.norm(dim=1), torch.ones(size, dtype=torch.float64), msg="initial support set")
    for step in range(1, STEPS + 1):
        w = head_leaves(objective.predictor) if predictor else {}
        out, loss, metrics = forward(model, objective, two_views(gen))
        z = [leaf(t) for t in out["z"]]
        p = [head_forward(objective.predictor, w, zi) for zi in z] if predictor else z
        ref, acc = nnclr_reference(z, p, support, tau, symmetric)
        assert_loss(loss, ref)
        assert_grads([t.grad for t in out["z"]], z, ref, "z")
        assert_metrics(metrics, {"acc": acc, "embedding_std": spread(z[0])})
        if predictor:
            names = list(w)
            assert_grads([dict(objective.predictor.named_parameters())[k].grad for k in names], [w[k] for k in names],
                         ref, "predictor")
        torch.testing.assert_close(objective.support.keys.double(), support, msg="support set changed before the step")
        update(model, objective, optimizer, step)
        support[(ptr + torch.arange(B)) % size] = unit(z[0].detach())  # view 1's projections, never view 2's
        ptr = (ptr + B) % size
        assert int(objective.support.ptr) == ptr, f"support pointer after step {step}"
        torch.testing.assert_close(objective.support.keys.double(), support, rtol=1e-5, atol=1e-6,
                                   msg=f"support set after step {step}")


def test_nnclr_positive_is_the_neighbour_not_the_other_view() -> None:
    """Hand-made support sets: holding the batch's own embeddings, each image's neighbour is itself
    (loss ``log(e² + 3) − 2`` at τ 0.5, accuracy 1); holding one vector, every image has the same
    neighbour and the loss is ``log 4`` whatever the views, which pairing the views would not give."""
    model = model_from("encoder", backbone=ENCODER["backbone"], projector={"dims": [8, 4]})
    objective = objective_from("nnclr", queue_size=4, temperature=0.5, predictor=None)
    objective.setup(model, 1)
    eye = torch.eye(4)
    objective.support.keys.copy_(eye[[2, 0, 3, 1]])
    loss, metrics = objective({"z": [eye, eye]})
    assert loss.item() == pytest.approx(math.log(math.e ** 2 + 3) - 2, rel=1e-6) and metrics["acc"].item() == 1.0
    objective.support.keys.copy_(torch.full((4, 4), 0.5))
    loss, _ = objective({"z": [eye, eye]})
    assert loss.item() == pytest.approx(math.log(4), rel=1e-6)


def test_nnclr_support_set_is_in_the_checkpoint() -> None:
    """The support set and its pointer are buffers of the objective: its state dict carries them and
    loading it restores them (what a resumed run needs)."""
    model = model_from("encoder", **ENCODER)
    objective = objective_from("nnclr", queue_size=10, predictor=HEAD)
    optimizer = start(model, objective, 2)
    forward(model, objective, two_views(torch.Generator().manual_seed(2)))
    update(model, objective, optimizer, 1)
    state = objective.state_dict()
    assert {"support.keys", "support.ptr"} <= set(state) and int(state["support.ptr"]) == B
    fresh = objective_from("nnclr", queue_size=10, predictor=HEAD)
    fresh.setup(model, 2)
    assert not torch.equal(fresh.support.keys, state["support.keys"])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.support.keys, objective.support.keys) and int(fresh.support.ptr) == B


@pytest.mark.parametrize(("name", "params", "key"), [
    ("nnclr", {"queue_size": 0}, "queue_size"), ("nnclr", {"temperature": 0.0}, "temperature"),
    ("nnclr", {"support": 10}, "support"), ("dcl", {"temperature": -1.0}, "temperature"),
    ("dclw", {"sigma": 0.0}, "sigma"), ("dcl", {"sigma": 0.5}, "sigma")])
def test_bad_configs_are_refused_naming_the_key(name: str, params: dict[str, Any], key: str) -> None:
    """Out-of-range values and unknown keys (DCL has no σ: that is ``dclw``) are ConfigErrors naming the key."""
    config_cls, _ = registered("objective")[name]
    with pytest.raises(ConfigError, match=key):
        from_dict(config_cls, params, "objective")
