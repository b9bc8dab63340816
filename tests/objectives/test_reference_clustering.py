"""Memory-bank, clustering and predictive objectives (InstDisc, CMC, CPC, SwAV, DINO) driven the way
``mmcl.train`` drives them, over several optimizer steps, against plain-torch float64 references
written here from the papers' equations.

Each test builds the model and the objective through the registries (as a recipe does), calls
``setup(model, total_steps)``, then per step: ``loss, metrics = objective(model(batch), batch)``,
backward, an SGD step on the model's and the objective's parameters, ``after_optimizer_step(step)``.
The reference keeps its own copy of every piece of objective state (bank rows, NCE normaliser,
queue, prototypes, last layer, centre, teacher), seeded once from the library's initial values and
evolved by the reference alone; no mmcl objective helper (InfoNCE, gathers, banks, Sinkhorn,
momentum) is called by a reference. The only seam: the bank's random negative draws are recorded
(``MemoryBank.sample`` wrapped), so the reference scores the same rows.

Compared each step: the loss, the gradient of every embedding the model returned and of every
trainable parameter (model and objective), the metrics the trainer logs, and the state the step
leaves behind. Further tests pin the objectives' contracts the references do not reach: defaults,
checkpointed state, multi-crop counts, devices, and the statistics shared by two processes.
"""

from __future__ import annotations

import copy
import math
import re
import types
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.config import from_dict
from mmcl.errors import ConfigError, DataError
from mmcl.objectives.bank import MemoryBank, bank_logits, nce_loss
from mmcl.objectives.cpc import cpc_step_logits
from mmcl.objectives.dino import WeightNormLinear
from mmcl.registry import build, registered

D = torch.float64
LR = 0.5
# Ids of four steps of four samples on a 12-row bank: rows 0, 1 and 2 come back, so updates compound.
IDS = [[0, 1, 2, 3], [4, 5, 6, 1], [7, 8, 1, 9], [2, 10, 11, 0]]


def build_plugin(kind: str, raw: dict[str, Any]) -> Any:
    """A recipe section as mmcl.train gets it: checked by the named entry's dataclass, then built."""
    cfg_cls, _ = registered(kind)[raw["name"]]
    return build(kind, from_dict(cfg_cls, {k: v for k, v in raw.items() if k != "name"}, kind))


def close_top1(actual: torch.Tensor | float, logits: torch.Tensor | list[torch.Tensor],
               pos: torch.Tensor | list[torch.Tensor], what: str) -> None:
    """The library's top-1 accuracy against the reference ``logits`` (or the mean accuracy over a list of
    them): a row whose positive ties (to float32 round-off) with its best negative may count either
    way, every other row must agree."""
    bounds = []
    for lg, p in zip(*((logits, pos) if isinstance(logits, list) else ([logits], [pos]))):
        lg = lg.detach()
        target = lg.gather(1, p[:, None]).squeeze(1)
        best_other = lg.scatter(1, p[:, None], float("-inf")).max(1).values
        bounds.append(((target > best_other + 1e-4).to(D).mean(), (target >= best_other - 1e-4).to(D).mean()))
    surely, maybe = (sum(b[i] for b in bounds) / len(bounds) for i in (0, 1))
    a = float(torch.as_tensor(actual))
    assert surely - 1e-6 <= a <= maybe + 1e-6, f"{what}: {a} not in [{float(surely)}, {float(maybe)}]"


def close(actual: torch.Tensor | float, expected: torch.Tensor | float, what: str, rtol: float = 2e-5) -> None:
    """``actual`` (float32 library) within ``rtol`` of ``expected`` (float64 reference), relative to
    the reference's largest magnitude; a reference of exact zeros must be matched exactly."""
    a, e = torch.as_tensor(actual).detach().to(D), torch.as_tensor(expected).detach().to(D)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert bool(torch.isfinite(a).all()), f"{what}: not finite"
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} against a reference of scale {scale:.3g}"


def close_all(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str, rtol: float = 1e-4) -> None:
    """:func:`close` for several tensors against one scale, the largest reference among them (the
    gradient of a crop the loss barely depends on is float32 noise relative to its own size)."""
    scale = max(e.detach().abs().max().item() for e in expected)
    for n, (a, e) in enumerate(zip(actual, expected)):
        err = (a.detach().to(D) - e.detach().to(D)).abs().max().item()
        assert err <= rtol * scale, f"{what}[{n}]: max error {err:.3g} against a reference of scale {scale:.3g}"


def spread(z: torch.Tensor) -> torch.Tensor:
    """The logged collapse monitor ``embedding_std``: per-dimension std of the L2-normalised rows, mean over dims."""
    return F.normalize(z.detach().to(D), dim=-1).std(dim=0).mean()


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A float64 copy of a library tensor that the reference differentiates against."""
    return x.detach().to(D).clone().requires_grad_()


class Loop:
    """mmcl.train's optimizer step without Accelerate: model and objective in training mode, SGD
    on every trainable parameter of both, ``after_optimizer_step`` with the count of steps done."""

    def __init__(self, model: nn.Module, objective: nn.Module, total_steps: int):
        self.model, self.objective, self.step = model.train(), objective.train(), 0
        if hasattr(objective, "setup"):  # as mmcl.train: hooks are optional
            objective.setup(model, total_steps)
        self.params = [p for m in (model, objective) for p in m.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(self.params, lr=LR)

    def forward(self, batch: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor, dict[str, torch.Tensor]]:
        """Model, objective and backward; every model output keeps its gradient for the checks."""
        out = self.model(batch)
        for v in out.values():
            for t in v if isinstance(v, list) else [v]:
                t.retain_grad()
        with warnings.catch_warnings():  # a warning here would repeat in the training log every step
            warnings.simplefilter("error")
            loss, metrics = self.objective(out, batch)
        loss.backward(retain_graph=True)
        return out, loss, metrics

    def check_model_grads(self, outputs: list[torch.Tensor], ref_grads: list[torch.Tensor]) -> None:
        """The model's parameter gradients are the reference's output gradients pulled back through
        the model (so the objective added no gradient of its own to the model)."""
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        expected = torch.autograd.grad(outputs, [p for _, p in named],
                                       [g.to(o.dtype) for o, g in zip(outputs, ref_grads)], retain_graph=True)
        scale = max(e.abs().max().item() for e in expected)  # float32 noise is absolute: one scale for all
        for (name, p), e in zip(named, expected):
            err = (p.grad - e).abs().max().item()
            assert err <= 1e-4 * scale, f"model grad {name}: max error {err:.3g} against a gradient scale {scale:.3g}"

    def finish(self) -> None:
        """Optimizer step, zero_grad, then the objective's hook with the number of steps done."""
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        hook = getattr(self.objective, "after_optimizer_step", None)
        if hook is not None:
            hook(self.step)


def record_draws(*banks: nn.Module) -> list[torch.Tensor]:
    """Every index tensor the banks' ``sample`` returns, in order (the draws are left untouched)."""
    drawn: list[torch.Tensor] = []
    for bank in banks:
        def recording(n: int, k: int, _sample: Any = bank.sample) -> torch.Tensor:
            idx = _sample(n, k)
            drawn.append(idx.clone())
            return idx

        bank.sample = recording
    return drawn


def check_draw(idx: torch.Tensor, seen: torch.Tensor, n: int, k: int) -> None:
    """Documented draw: ``k`` rows per sample, from the filled rows once ``k`` of them are filled."""
    assert idx.shape == (n, k) and int(idx.min()) >= 0 and int(idx.max()) < seen.numel()
    if int(seen.sum()) >= k:
        assert bool(seen[idx].all()), "a negative was drawn from a bank row that holds no sample yet"


def proximal(rows: torch.Tensor, ids: torch.Tensor, v: torch.Tensor, mu: float) -> None:
    """Wu et al. (2018), Sec. 3.2 (and CMC's memory): ``m_i ← normalise(μ m_i + (1 - μ) v_i)``."""
    rows[ids] = F.normalize(mu * rows[ids] + (1 - mu) * v.detach(), dim=1)


def small_cnn(**kw: Any) -> dict[str, Any]:
    """The recipes' ``cnn`` backbone, shrunk to one 4-channel block (fast on 2 CPU cores)."""
    return {"name": "cnn", "width": 4, "depth": 1, "norm": "bn", **kw}


# ---------------------------------------------------------------------------------------------
# InstDisc (Wu et al., 2018)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nce", "softmax"])
def test_instdisc_over_steps_matches_the_paper(kind: str) -> None:
    torch.manual_seed(0)
    n_rows, k, tau, mu = 12, 5, 0.1, 0.3  # μ ≠ 0.5, so μ and 1 - μ cannot be confused unseen
    model = build_plugin("model", {"name": "encoder", "backbone": small_cnn(),
                                   "projector": {"dims": [6], "norm": "none"}})
    objective = build_plugin("objective", {"name": "instdisc", "bank_size": n_rows, "negatives": k,
                                           "temperature": tau, "momentum": mu, "loss": kind})
    loop = Loop(model, objective, total_steps=len(IDS))
    drawn = record_draws(objective.bank)
    rows = objective.bank.rows.detach().to(D).clone()  # the random initial rows; the reference's own from here
    seen, log_z = torch.zeros(n_rows, dtype=torch.bool), None
    for step, id_list in enumerate(IDS):
        ids = torch.tensor(id_list)
        out, loss, metrics = loop.forward({"views": [torch.randn(4, 3, 8, 8)], "id": ids})
        assert len(drawn) == step + 1
        idx = drawn[-1]
        check_draw(idx, seen, 4, k)
        z = leaf(out["z"][0])
        v = F.normalize(z, dim=1)
        logits = torch.cat([(v * rows[ids]).sum(1, keepdim=True), torch.einsum("bd,bkd->bk", v, rows[idx])], 1) / tau
        if kind == "softmax":
            ref = F.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        else:  # NCE, Eq. (5)-(7): P = exp(v·f/τ)/Z, Pn = 1/n, h = P / (P + k Pn); Z fixed from the first batch
            if log_z is None:
                log_z = torch.log(logits.detach().exp().mean() * n_rows)
            p, k_pn = torch.exp(logits - log_z), k / n_rows
            h = p / (p + k_pn)
            ref = -(torch.log(h[:, 0]) + torch.log(1 - h[:, 1:]).sum(1)).mean()
            close(objective.log_z, log_z, f"step {step}: log Z")
        ref.backward()
        close(loss, ref, f"step {step}: loss")
        close(out["z"][0].grad, z.grad, f"step {step}: grad z")
        loop.check_model_grads(out["z"], [z.grad])
        close_top1(metrics["acc"], logits, torch.zeros(4, dtype=torch.long), f"step {step}: acc")
        assert set(metrics) == {"acc", "embedding_std"}
        close(metrics["embedding_std"], spread(z), f"step {step}: embedding_std")
        proximal(rows, ids, v, mu)
        seen[ids] = True
        loop.finish()
        close(objective.bank.rows, rows, f"step {step}: bank rows", rtol=1e-6)
        assert torch.equal(objective.bank.seen, seen)


# ---------------------------------------------------------------------------------------------
# CMC (Tian et al., 2019)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("negatives", ["batch", "bank"])
@pytest.mark.parametrize("mode", ["core", "full"])
def test_cmc_over_steps_matches_the_paper(mode: str, negatives: str) -> None:
    torch.manual_seed(1)
    n_rows, k, tau, mu = 12, 5, 0.1, 0.3
    model = build_plugin("model", {"name": "multiview", "channels": [[0], [1], [2]], "backbone": small_cnn(),
                                   "projector": {"dims": [6], "norm": "none"}})  # 3 views: core ≠ full
    objective = build_plugin("objective", {"name": "cmc", "mode": mode, "negatives": negatives, "temperature": tau,
                                           "bank_size": n_rows, "bank_negatives": k, "momentum": mu})
    loop = Loop(model, objective, total_steps=len(IDS))
    pairs = [(0, 1), (0, 2)] if mode == "core" else [(0, 1), (0, 2), (1, 2)]
    if negatives == "bank":
        drawn = record_draws(*objective.banks)
        rows = [b.rows.detach().to(D).clone() for b in objective.banks]
        seen = torch.zeros(n_rows, dtype=torch.bool)
    for step, id_list in enumerate(IDS):
        ids = torch.tensor(id_list)
        out, loss, metrics = loop.forward({"views": [torch.randn(4, 3, 8, 8)], "id": ids})
        zs = [leaf(x) for x in out["z"]]
        v = [F.normalize(x, dim=1) for x in zs]
        terms, acc_logits, acc_pos = [], [], []
        if negatives == "batch":  # L(V_i, V_j) = L^{i→j} + L^{j→i}, each an InfoNCE over the batch
            labels = torch.arange(4)
            for i, j in pairs:
                logits = v[i] @ v[j].T / tau
                terms += [F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)]
                acc_logits += [logits, logits.T]
                acc_pos += [labels, labels]
        else:  # each view's embedding against the other view's memory: own row positive, K drawn rows
            assert len(drawn) == step + 1, "one draw per step, shared by every view pair (as CMC's NCEAverage)"
            idx = drawn[-1]
            check_draw(idx, seen, 4, k)
            for i, j in pairs:
                for a, b in ((i, j), (j, i)):
                    logits = torch.cat([(v[a] * rows[b][ids]).sum(1, keepdim=True),
                                        torch.einsum("bd,bkd->bk", v[a], rows[b][idx])], 1) / tau
                    terms.append(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))
                    acc_logits.append(logits)
                    acc_pos.append(torch.zeros(4, dtype=torch.long))
        ref = torch.stack(terms).sum()
        ref.backward()
        close(loss, ref, f"step {step}: loss")
        assert set(metrics) == {"acc", "embedding_std"}
        # acc: every direction of every view pair, averaged (view triples differ per pair, so one pair's is not it)
        close_top1(metrics["acc"], acc_logits, acc_pos, f"step {step}: acc")
        close(metrics["embedding_std"], spread(zs[0]), f"step {step}: embedding_std of the first view")
        close_all([x.grad for x in out["z"]], [r.grad for r in zs], f"step {step}: grad z")
        loop.check_model_grads(out["z"], [r.grad for r in zs])
        if negatives == "bank":
            for r, x in zip(rows, v):
                proximal(r, ids, x, mu)
            seen[ids] = True
        loop.finish()
        if negatives == "bank":
            for n, (bank, r) in enumerate(zip(objective.banks, rows)):
                close(bank.rows, r, f"step {step}: bank {n} rows", rtol=1e-6)
                assert torch.equal(bank.seen, seen)


# ---------------------------------------------------------------------------------------------
# CPC (van den Oord et al., 2018; Hénaff et al., 2019)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [False, True])
def test_cpc_over_steps_matches_the_paper(normalize: bool) -> None:
    """A prediction k rows ahead is scored against every patch k or more rows down, at every
    position of every image of the batch (mmcl's documented candidate set; CPC v2's pseudo-code also
    scores the rows above, which the context has seen)."""
    torch.manual_seed(2)
    k_max, tau, g, b = 2, 0.2, 4, 3
    model = build_plugin("model", {"name": "cpc", "backbone": small_cnn(norm="gn"), "patch_size": 4,
                                   "patch_stride": 2, "context": "conv", "context_dim": 5, "context_layers": 1})
    objective = build_plugin("objective", {"name": "cpc", "steps": k_max, "normalize": normalize,
                                           "temperature": tau})
    loop = Loop(model, objective, total_steps=3)
    w_ref = [p.weight.detach().to(D).clone() for p in objective.predictors]
    for step in range(3):
        out, loss, metrics = loop.forward({"views": [torch.randn(b, 3, 10, 10)]})
        assert out["z"].shape[1:3] == (g, g)
        z, c, ws = leaf(out["z"]), leaf(out["c"]), [leaf(w) for w in w_ref]
        terms, accs = [], {}
        for k in range(1, k_max + 1):  # f_k(x_{t+k}, c_t) = exp(z_{t+k}ᵀ W_k c_t): rows t and t + k
            pred = c[:, :g - k] @ ws[k - 1].T  # [B, G-k, G, D]
            cand = z[:, k:]
            if normalize:
                pred, cand = F.normalize(pred, dim=-1) / tau, F.normalize(cand, dim=-1)
            logits = pred.reshape(-1, pred.shape[-1]) @ cand.reshape(-1, cand.shape[-1]).T
            bi, ri, ci = torch.meshgrid(torch.arange(b), torch.arange(g - k), torch.arange(g), indexing="ij")
            rows_per_image = cand.shape[1]
            pos = (bi * rows_per_image * g + ri * g + ci).reshape(-1)
            terms.append(F.cross_entropy(logits, pos))
            accs[f"acc_k{k}"] = (logits, pos)
        ref = torch.stack(terms).mean()
        ref.backward()
        close(loss, ref, f"step {step}: loss")
        assert set(metrics) == {*accs, "embedding_std"}
        for name, (lg, p) in accs.items():
            close_top1(metrics[name], lg, p, f"step {step}: {name}")
        close(metrics["embedding_std"], spread(z.mean(dim=(1, 2))), f"step {step}: embedding_std of the pooled grid")
        close(out["c"].grad, c.grad, f"step {step}: grad c")
        # z's gradient: its own (as target) plus what reaches it through the context network (read
        # first: autograd.grad below also feeds the retained gradient of a view such as z)
        lib_dz = out["z"].grad.clone()
        dz_total = z.grad + torch.autograd.grad(out["c"], out["z"], c.grad.float(), retain_graph=True)[0]
        close(lib_dz, dz_total, f"step {step}: grad z", rtol=1e-4)
        for k, (p, w) in enumerate(zip(objective.predictors, ws), start=1):
            close(p.weight.grad, w.grad, f"step {step}: grad W_{k}", rtol=1e-4)
        loop.check_model_grads([out["z"], out["c"]], [z.grad, c.grad])
        w_ref = [w.detach() - LR * w.grad for w in ws]
        loop.finish()
        for k, (p, w) in enumerate(zip(objective.predictors, w_ref), start=1):
            close(p.weight, w, f"step {step}: W_{k} after the step", rtol=5e-5)


# ---------------------------------------------------------------------------------------------
# SwAV (Caron et al., 2020)
# ---------------------------------------------------------------------------------------------


def sinkhorn_knopp(scores: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """SwAV, Algorithm 1 / appendix A.1: ``Q = exp(Cᵀz / ε)`` (K × B), total mass 1, then per
    iteration rows (prototypes) to 1/K each, then columns (samples) to 1/B each; returns B·Qᵀ."""
    q = torch.exp(scores / eps).T
    q = q / q.sum()
    n_proto, n = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_proto
        q = q / q.sum(dim=0, keepdim=True) / n
    return (q * n).T


def test_swav_over_steps_matches_the_paper() -> None:
    torch.manual_seed(3)
    b, n_proto, eps, iters, tau, freeze, q_len, q_start, steps = 4, 5, 0.05, 3, 0.1, 2, 8, 3, 5
    model = build_plugin("model", {"name": "encoder", "backbone": small_cnn(), "group_views": True,
                                   "projector": {"dims": [8, 6], "norm": "bn"}})
    objective = build_plugin("objective", {"name": "swav", "prototypes": n_proto, "epsilon": eps,
                                           "sinkhorn_iterations": iters, "temperature": tau, "assignment_crops": 2,
                                           "freeze_prototypes_steps": freeze, "queue_length": q_len,
                                           "queue_start_step": q_start})
    loop = Loop(model, objective, total_steps=steps)
    protos = objective.prototypes.weight.detach().to(D).clone()
    queue = torch.zeros(2, q_len, 6, dtype=D)
    used_queue = []
    for step in range(steps):
        views = [torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8), torch.randn(b, 3, 4, 4), torch.randn(b, 3, 4, 4)]
        out, loss, metrics = loop.forward({"views": views})
        protos = F.normalize(protos, dim=1)  # renormalised (in place) before every step
        close(objective.prototypes.weight, protos, f"step {step}: prototypes renormalised", rtol=1e-6)
        c = protos.clone().requires_grad_()
        zs = [leaf(x) for x in out["z"]]
        scores = [F.normalize(x, dim=1) @ c.T for x in zs]
        use = step >= q_start and bool(queue[:, -1].abs().sum(dim=-1).gt(0).all())
        used_queue.append(use)
        terms = []
        for i in range(2):  # codes of the global crops, each predicted by every other crop
            s = scores[i].detach()
            if use:
                s = torch.cat([s, queue[i] @ protos.T])
            q = sinkhorn_knopp(s, eps, iters)[:b]
            terms += [-(q * F.log_softmax(scores[v] / tau, dim=1)).sum(1).mean() for v in range(4) if v != i]
        ref = torch.stack(terms).mean()
        ref.backward()
        grad_c = c.grad if step >= freeze else torch.zeros_like(protos)
        close(loss, ref, f"step {step}: loss")
        close_all([x.grad for x in out["z"]], [r.grad for r in zs], f"step {step}: grad z")
        close(objective.prototypes.weight.grad, grad_c, f"step {step}: grad prototypes", rtol=1e-4)
        loop.check_model_grads(out["z"], [r.grad for r in zs])
        usage = scores[0].argmax(1).unique().numel() / n_proto
        assert set(metrics) == {"embedding_std", "prototype_usage"}
        close(metrics["prototype_usage"], usage, f"step {step}: prototype usage")
        close(metrics["embedding_std"], spread(zs[0]), f"step {step}: embedding_std of the first crop")
        for i in range(2):  # newest first, the oldest b rows drop out
            queue[i] = torch.cat([F.normalize(zs[i].detach(), dim=1), queue[i][:-b]])
        close(objective.queue, queue, f"step {step}: queue", rtol=1e-6)
        frozen_before = objective.prototypes.weight.detach().clone()
        protos = protos - LR * grad_c
        loop.finish()
        if step < freeze:
            assert torch.equal(objective.prototypes.weight, frozen_before), f"step {step}: prototypes moved (frozen)"
        close(objective.prototypes.weight, protos, f"step {step}: prototypes after the step", rtol=5e-5)
    assert used_queue == [False, False, False, True, True]  # full after 2 steps, used from queue_start_step


# ---------------------------------------------------------------------------------------------
# DINO (Caron et al., 2021)
# ---------------------------------------------------------------------------------------------


def test_dino_over_steps_matches_the_paper() -> None:
    torch.manual_seed(4)
    b, out_dim, base_m, tau_s, tau_t, tau_w, warm, c_m, freeze, total = 4, 7, 0.8, 0.1, 0.06, 0.03, 2, 0.7, 2, 5
    model = build_plugin("model", {"name": "encoder", "backbone": small_cnn(), "group_views": True,
                                   "projector": {"dims": [8, 6], "norm": "bn", "activation": "gelu"}})
    objective = build_plugin("objective", {"name": "dino", "out_dim": out_dim, "norm_last_layer": False,
                                           "momentum": base_m, "student_temperature": tau_s,
                                           "teacher_temperature": tau_t, "warmup_teacher_temperature": tau_w,
                                           "warmup_teacher_steps": warm, "center_momentum": c_m, "global_crops": 2,
                                           "freeze_last_layer_steps": freeze})
    loop = Loop(model, objective, total_steps=total)
    last = {"v": objective.last.v.detach().to(D).clone(), "g": objective.last.g.detach().to(D).clone()}
    # the teacher starts as the student (model + last layer) and is evaluated with the same architecture
    teacher = {f"model.{n}": p.detach().to(D).clone() for n, p in model.named_parameters()}
    teacher.update({f"last.{n}": t.clone() for n, t in last.items()})
    arch = copy.deepcopy(model).double().train()
    center = torch.zeros(1, out_dim, dtype=D)
    momentum = base_m  # the logged momentum: that of the last teacher update (the base before any)

    def head(x: torch.Tensor, v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """DINO's last layer: L2-normalised bottleneck times a weight-normalised matrix (rows g·v/|v|)."""
        return F.normalize(x, dim=-1) @ (g * F.normalize(v, dim=1)).T

    for step in range(4):
        views = [torch.randn(b, 3, 8, 8), torch.randn(b, 3, 8, 8), torch.randn(b, 3, 4, 4), torch.randn(b, 3, 4, 4)]
        out, loss, metrics = loop.forward({"views": views})
        temp = tau_w + step / warm * (tau_t - tau_w) if step < warm else tau_t  # linear warm-up of τ_t
        zs = [leaf(x) for x in out["z"]]
        v, g = leaf(last["v"]), leaf(last["g"])
        student = [head(x, v, g) for x in zs]
        with torch.no_grad():
            params = {n[len("model."):]: t for n, t in teacher.items() if n.startswith("model.")}
            tz = functional_call(arch, params, ({"views": [x.double() for x in views[:2]]},))["z"]
            t_out = [head(x, teacher["last.v"], teacher["last.g"]) for x in tz]
        p_t = [F.softmax((t - center) / temp, dim=1) for t in t_out]  # centred, sharpened teacher
        terms = [-(p_t[i] * F.log_softmax(student[s] / tau_s, dim=1)).sum(1).mean()
                 for i in range(2) for s in range(4) if s != i]
        ref = torch.stack(terms).mean()
        ref.backward()
        close(loss, ref, f"step {step}: loss")
        close(metrics["teacher_temperature"], temp, f"step {step}: teacher temperature")
        assert set(metrics) == {"embedding_std", "teacher_entropy", "kl_teacher_student", "teacher_temperature",
                                "momentum"}
        close(metrics["embedding_std"], spread(zs[0]), f"step {step}: embedding_std of the first crop")
        close(metrics["momentum"], momentum, f"step {step}: momentum")
        with torch.no_grad():  # the collapse monitors: teacher entropy / log K, KL(teacher ‖ student) on global pairs
            entropy = torch.stack([-(p * p.log()).sum(1).mean() for p in p_t]).mean() / math.log(out_dim)
            p_s = [F.softmax(s / tau_s, dim=1) for s in student]
            kl = torch.stack([(p_t[i] * (p_t[i].log() - p_s[s].log())).sum(1).mean()
                              for i in range(2) for s in range(2) if s != i]).mean()
        close(metrics["teacher_entropy"], entropy, f"step {step}: teacher_entropy")
        close(metrics["kl_teacher_student"], kl, f"step {step}: kl_teacher_student", rtol=1e-4)
        close_all([x.grad for x in out["z"]], [r.grad for r in zs], f"step {step}: grad z")
        grads = {"v": v.grad, "g": g.grad} if step >= freeze else {"v": torch.zeros_like(v), "g": torch.zeros_like(g)}
        close(objective.last.v.grad, grads["v"], f"step {step}: grad last.v", rtol=1e-4)
        close(objective.last.g.grad, grads["g"], f"step {step}: grad last.g", rtol=1e-4)
        loop.check_model_grads(out["z"], [r.grad for r in zs])
        center = c_m * center + (1 - c_m) * torch.cat(t_out).mean(0, keepdim=True)  # after the loss
        close(objective.center, center, f"step {step}: centre", rtol=1e-5)
        last = {n: last[n] - LR * grads[n] for n in last}
        loop.finish()
        for n in last:
            close(getattr(objective.last, n), last[n], f"step {step}: last.{n} after the step", rtol=5e-5)
        m = momentum = 1 - (1 - base_m) * (math.cos(math.pi * loop.step / total) + 1) / 2  # cosine to 1 over the run
        online = {f"model.{n}": p.detach().to(D) for n, p in model.named_parameters()}
        online.update({f"last.{n}": t for n, t in last.items()})
        teacher = {n: m * t + (1 - m) * online[n] for n, t in teacher.items()}
        lib_teacher = dict(objective.target.net.named_parameters())
        assert set(lib_teacher) == set(teacher)
        for n, t in teacher.items():
            close(lib_teacher[n], t, f"step {step}: teacher {n}", rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Contracts the step-by-step references do not reach
# ---------------------------------------------------------------------------------------------


def stub_model(embed_dim: int, **attrs: Any) -> Any:
    """What ``setup`` reads from a model: its embedding size (and, for CMC, its per-view encoders)."""
    return types.SimpleNamespace(embed_dim=embed_dim, **attrs)


def test_memory_bank_state_defaults_and_id_check() -> None:
    """The bank's checkpointed state: unit float32 rows, a boolean ``seen`` per row, an integer draw
    count; the default momentum is the paper's 0.5; out-of-range ids name the setting to change."""
    torch.manual_seed(5)
    bank = MemoryBank(12, 5)
    assert bank.rows.shape == (12, 5) and bank.rows.dtype == torch.float32
    close(bank.rows.norm(dim=1), torch.ones(12), "initial rows are unit vectors", rtol=1e-6)
    assert bank.seen.dtype == torch.bool and bank.seen.shape == (12,) and not bool(bank.seen.any())
    assert bank.draws.dtype == torch.int64 and bank.draws.shape == ()
    before, v = bank.rows.detach().to(D).clone(), torch.randn(2, 5)
    bank.update(torch.tensor([3, 7]), v)
    expected = F.normalize(0.5 * before[[3, 7]] + 0.5 * F.normalize(v.to(D), dim=1), dim=1)
    close(bank.rows[[3, 7]], expected, "default proximal update, μ = 0.5", rtol=1e-6)
    assert bank.seen.nonzero().squeeze(1).tolist() == [3, 7]
    message = ("sample ids range {} but the memory bank has 12 rows: set objective.bank_size above the largest "
               "training id (samples need an integer 'id' in their .json or a numeric key)")
    for ids, shown in (([4, 12], "4..12"), ([-1, 2], "-1..2")):
        with pytest.raises(DataError, match=f"^{re.escape(message.format(shown))}$"):
            bank.check_ids(torch.tensor(ids))


def test_bank_scores_and_nce_keep_precision_and_device() -> None:
    """bank_logits scores bfloat16 features (mixed precision) in float32; nce_loss computes in the logits'
    own dtype (float64 stays float64) and on their device (meta: any tensor made on the CPU is rejected)."""
    torch.manual_seed(6)
    rows = F.normalize(torch.randn(10, 4), dim=1)
    v = F.normalize(torch.randn(3, 4), dim=1).to(torch.bfloat16)
    pos, neg = torch.tensor([1, 5, 9]), torch.randint(10, (3, 6))
    logits = bank_logits(v, rows, pos, neg, 0.1)
    assert logits.dtype == torch.float32
    close(logits, bank_logits(v.float(), rows, pos, neg, 0.1), "bfloat16 features scored in float32", rtol=1e-6)
    lg, log_z, n = torch.randn(3, 7, dtype=D), torch.tensor(1.3, dtype=D), 50
    p_over = torch.exp(lg - log_z) / (6 / n)  # P / (K Pn): h = P / (P + K Pn) = 1 / (1 + 1 / p_over)
    ref = -(-torch.log1p(1 / p_over[:, 0]) - torch.log1p(p_over[:, 1:]).sum(1)).mean()
    loss = nce_loss(lg, log_z, n)
    assert loss.dtype == D
    close(loss, ref, "NCE in float64", rtol=1e-12)
    meta = nce_loss(torch.randn(3, 7, device="meta"), torch.tensor(0.0, device="meta"), n)
    assert meta.device.type == "meta"


def test_instdisc_keeps_its_tensors_on_the_features_device() -> None:
    """Labels and scores live on the features' device (meta here: a CPU tensor among them fails, as it
    would on a GPU). The bank's draws are replaced: a generator cannot live on the meta device."""
    objective = build_plugin("objective", {"name": "instdisc", "bank_size": 10, "negatives": 3, "loss": "softmax"})
    objective.setup(stub_model(4), 1)
    objective.to("meta")
    objective.bank.sample = lambda n, k: torch.zeros(n, k, dtype=torch.long, device="meta")
    loss, metrics = objective({"z": [torch.randn(2, 4, device="meta")]}, {"id": torch.tensor([0, 1])})
    assert loss.device.type == "meta" and metrics["acc"].device.type == "meta"


def test_cmc_one_bank_per_view_and_acc_over_every_pair() -> None:
    """A shared encoder over 2 views (no per-view backbones) gets 2 banks; one view is refused with the
    fix; ``acc`` averages both directions of every view pair."""
    torch.manual_seed(7)
    model = build_plugin("model", {"name": "encoder", "backbone": small_cnn(), "projector": {"dims": [6]}})
    objective = build_plugin("objective", {"name": "cmc", "negatives": "bank", "bank_size": 9, "bank_negatives": 3})
    objective.setup(model, 1)
    assert len(objective.banks) == 2 and all(b.rows.shape == (9, 6) for b in objective.banks)
    with pytest.raises(ConfigError, match="^CMC needs at least 2 views: a multiview model with channel groups or "
                                          "view_fields$"):
        objective({"z": [torch.randn(3, 6)]}, {"id": torch.arange(3)})
    # 3 views: view 1 matches view 0 exactly, view 2 is orthogonal noise, so pair (0, 1) scores 1, pairs with 2 score 0
    base = torch.eye(4)[:3]
    z = [base, base.clone(), torch.tensor([[0.0, 0, 0, 1]] * 3)]
    cmc = build_plugin("objective", {"name": "cmc", "mode": "full", "temperature": 0.1})
    _, metrics = cmc({"z": z}, {})
    close(metrics["acc"], (2 * 1.0 + 2 * 1 / 3 + 2 * 1 / 3) / 6, "acc over (0,1), (0,2), (1,2), both ways")


def test_cpc_positives_of_a_later_rank_and_grid_limit() -> None:
    """On rank r the positives sit after the r earlier processes' B·R·W targets; steps must stay below the
    grid height (a model fed other images than the recipe's), naming both numbers; a non-CPC model is refused."""
    torch.manual_seed(8)
    b, r, w, d = 2, 3, 4, 5
    pred, target, other = torch.randn(b, r, w, d), torch.randn(b, r, w, d), torch.randn(b, r, w, d)
    logits, pos = cpc_step_logits(pred, target, torch.cat([other, target]), rank=1)
    assert logits.shape == (b * r * w, 2 * b * r * w)
    assert torch.equal(pos, torch.arange(b * r * w) + b * r * w)
    close(logits.gather(1, pos[:, None]).squeeze(1), (pred * target).sum(-1).flatten(), "positive = own target")
    _, pos_meta = cpc_step_logits(*(x.to("meta") for x in (pred, target, target)), rank=0)
    assert pos_meta.device.type == "meta"
    objective = build_plugin("objective", {"name": "cpc", "steps": 4})
    objective.setup(types.SimpleNamespace(embed_dim=d, context_dim=3), 1)
    out = {"z": torch.randn(b, 4, 4, d), "c": torch.randn(b, 4, 4, 3)}
    with pytest.raises(ConfigError, match="^objective.steps 4 must be below the grid height 4$"):
        objective(out)
    with pytest.raises(ConfigError, match=f"^{re.escape('objective cpc needs model: {name: cpc}')}$"):
        objective.setup(stub_model(d), 1)


def swav_objective(queue_length: int, **kw: Any) -> Any:
    """A SwAV objective on 4-d embeddings, 3 prototypes (seeded, so twins share them)."""
    torch.manual_seed(9)
    objective = build_plugin("objective", {"name": "swav", "prototypes": 3, "queue_length": queue_length,
                                           "queue_start_step": 0, "freeze_prototypes_steps": 0, **kw})
    objective.setup(stub_model(4), 1)
    return objective


def test_swav_queue_joins_the_assignments_once_full() -> None:
    """A queue of 5 rows fed 4 embeddings a step fills at the second step and is used from the third, newest
    rows first; until then the loss is that of SwAV without a queue."""
    with_queue, without = swav_objective(5), swav_objective(0)
    torch.manual_seed(10)
    crops = [[torch.randn(4, 4) for _ in range(3)] for _ in range(3)]
    for step, z in enumerate(crops):
        loss, _ = with_queue({"z": z})
        loss_plain, _ = without({"z": z})
        if step < 2:
            close(loss, loss_plain, f"step {step}: queue not full, not used")
        else:
            gap = float((loss - loss_plain).detach().abs())
            assert gap > 1e-4, "step 2: the full queue must enter the assignments"
        newest = torch.stack([F.normalize(x, dim=1) for x in z[:2]])
        close(with_queue.queue[:, :4], newest, f"step {step}: newest rows first")
    close(with_queue.queue[:, 4], F.normalize(torch.stack([crops[1][0][0], crops[1][1][0]]), dim=1),
          "the oldest row left: the first of the previous step")


def test_frozen_weights_change_gradients_never_values() -> None:
    """SwAV's frozen prototypes and DINO's frozen last layer score exactly as unfrozen ones, also for weights
    with exact zeros (a frozen copy must not divide by them); DINO's last layer trains by default, its scale
    only with ``norm_last_layer: false``, and maps each vector of any leading shape (e.g. [B, tokens, D]) on its
    own; SwAV's prototypes are one bias-free matrix (nothing else to train)."""
    frozen, live = swav_objective(0, freeze_prototypes_steps=1), swav_objective(0)
    for objective in (frozen, live):
        with torch.no_grad():
            objective.prototypes.weight.copy_(torch.eye(3, 4))
    torch.manual_seed(11)
    z = [torch.randn(4, 4) for _ in range(3)]
    loss_frozen, loss_live = frozen({"z": z})[0], live({"z": z})[0]
    close(loss_frozen, loss_live, "frozen prototypes score as live ones")
    assert [n for n, p in live.named_parameters() if p.requires_grad] == ["prototypes.weight"]
    init_std = float(WeightNormLinear(64, 32, learn_scale=False).v.detach().std())
    assert 0.019 < init_std < 0.021, "DINO's init, trunc_normal(std 0.02): the step size of v scales with 1/|v|"
    layer = WeightNormLinear(4, 3, learn_scale=True)
    with torch.no_grad():
        layer.v[0, 1] = 0.0
        layer.g[2] = 0.0
    x = torch.randn(5, 4)
    close(layer(x, frozen=True), layer(x), "frozen last layer")
    tokens = torch.randn(2, 5, 4)
    close(layer(tokens)[:, 3], layer(tokens[:, 3]), "each token on its own")
    layer(x).sum().backward()
    assert layer.v.grad.abs().sum() > 0 and layer.g.grad.abs().sum() > 0, "not frozen unless asked"
    for norm_last_layer, trainable in ((True, ["last.v"]), (False, ["last.v", "last.g"])):
        dino = build_plugin("objective", {"name": "dino", "out_dim": 3, "norm_last_layer": norm_last_layer})
        dino.setup(build_plugin("model", {"name": "encoder", "backbone": small_cnn(), "projector": {"dims": [4]}}), 1)
        assert [n for n, p in dino.named_parameters() if p.requires_grad and n.startswith("last.")] == trainable
        assert dino.step.dtype == torch.int64
    assert frozen.step.dtype == torch.int64


def test_dino_with_one_global_crop_pairs_it_with_the_local_crops() -> None:
    """``global_crops: 1`` with 2 local crops: the teacher sees crop 0, the loss averages the 2 local crops'
    cross-entropies with it, and no global pair is left for the KL monitor (logged as 0)."""
    torch.manual_seed(12)
    model = build_plugin("model", {"name": "encoder", "backbone": small_cnn(), "group_views": True,
                                   "projector": {"dims": [6]}})
    objective = build_plugin("objective", {"name": "dino", "out_dim": 5, "global_crops": 1})
    objective.setup(model, 1)
    views = [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    out = model({"views": views})
    loss, metrics = objective(out, {"views": views})
    assert float(metrics["kl_teacher_student"]) == 0.0
    with torch.no_grad():
        teacher = objective.target({"views": views[:1]})
        assert len(teacher) == 1
        p_t = F.softmax(teacher[0].to(D) / 0.04, dim=1)  # centre 0 at the first step
        ref = torch.stack([-(p_t * F.log_softmax(objective.last(z).to(D) / 0.1, dim=1)).sum(1).mean()
                           for z in out["z"][1:]]).mean()
    close(loss, ref, "one global crop against 2 local crops", rtol=1e-5)


def _two_process_statistics(rank: int, world_size: int, init_file: str) -> None:
    """On each of ``world_size`` gloo processes (or one without a process group): InstDisc's NCE normaliser
    from the mean over the whole global batch, and CMC's in-batch loss over this process's rows against
    every process's rows. The global batch is the same whatever the split."""
    if world_size > 1:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        g, b, n_rows, tau = 6, 6 // world_size, 12, 0.2
        mine = slice(rank * b, (rank + 1) * b)
        torch.manual_seed(13)  # the same global data, and the same initial bank, on every process
        v_all, idx_all = F.normalize(torch.randn(g, 4, dtype=D), dim=1), torch.randint(n_rows, (g, 3))
        ids_all = torch.arange(g)
        objective = build_plugin("objective", {"name": "instdisc", "bank_size": n_rows, "negatives": 3,
                                               "temperature": tau})
        objective.setup(stub_model(4), 1)
        objective.bank.sample = lambda n, k: idx_all[mine]
        rows = objective.bank.rows.detach().to(D).clone()
        logits = torch.cat([(v_all * rows[ids_all]).sum(1, keepdim=True),
                            torch.einsum("bd,bkd->bk", v_all, rows[idx_all])], 1) / tau
        objective({"z": [v_all[mine].float()]}, {"id": ids_all[mine]})
        close(objective.log_z, torch.log(logits.exp().mean() * n_rows), f"rank {rank}: log Z over the global batch")
        a, c = F.normalize(torch.randn(g, 4, dtype=D), dim=1), F.normalize(torch.randn(g, 4, dtype=D), dim=1)
        cmc = build_plugin("objective", {"name": "cmc", "temperature": tau})
        loss, metrics = cmc({"z": [a[mine].float(), c[mine].float()]}, {})
        labels = torch.arange(g)[mine]
        ab, ba = a[mine] @ c.T / tau, c[mine] @ a.T / tau
        close(loss, F.cross_entropy(ab, labels) + F.cross_entropy(ba, labels), f"rank {rank}: CMC over its own rows")
        close_top1(metrics["acc"], [ab, ba], [labels, labels], f"rank {rank}: CMC acc over its own rows")
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def test_statistics_shared_by_two_processes(tmp_path: Path) -> None:
    """The same global batch on one process and split over two gloo processes (a few seconds)."""
    _two_process_statistics(0, 1, "")
    mp.spawn(_two_process_statistics, args=(2, str(tmp_path / "rendezvous")), nprocs=2)
