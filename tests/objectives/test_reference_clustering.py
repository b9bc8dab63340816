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
trainable parameter (model and objective), and the state the step leaves behind.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mmcl.config import build, from_dict, registered

D = torch.float64
LR = 0.5
# Ids of four steps of four samples on a 12-row bank: rows 0, 1 and 2 come back, so updates compound.
IDS = [[0, 1, 2, 3], [4, 5, 6, 1], [7, 8, 1, 9], [2, 10, 11, 0]]


def build_plugin(kind: str, raw: dict[str, Any]) -> Any:
    """A recipe section as mmcl.train gets it: checked by the named entry's dataclass, then built."""
    cfg_cls, _ = registered(kind)[raw["name"]]
    return build(kind, from_dict(cfg_cls, {k: v for k, v in raw.items() if k != "name"}, kind))


def close_top1(actual: torch.Tensor | float, logits: torch.Tensor, pos: torch.Tensor, what: str) -> None:
    """The library's top-1 accuracy against the reference ``logits``: a row whose positive ties (to
    float32 round-off) with its best negative may count either way, every other row must agree."""
    logits = logits.detach()
    target = logits.gather(1, pos[:, None]).squeeze(1)
    best_other = logits.scatter(1, pos[:, None], float("-inf")).max(1).values
    surely, maybe = (target > best_other + 1e-4).to(D).mean(), (target >= best_other - 1e-4).to(D).mean()
    a = float(torch.as_tensor(actual))
    assert surely - 1e-6 <= a <= maybe + 1e-6, f"{what}: {a} not in [{float(surely)}, {float(maybe)}]"


def close(actual: torch.Tensor | float, expected: torch.Tensor | float, what: str, rtol: float = 2e-5) -> None:
    """``actual`` (float32 library) within ``rtol`` of ``expected`` (float64 reference), relative to
    the reference's largest magnitude; a reference of exact zeros must be matched exactly."""
    a, e = torch.as_tensor(actual).detach().to(D), torch.as_tensor(expected).detach().to(D)
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    err, scale = (a - e).abs().max().item(), e.abs().max().item()
    assert err <= rtol * scale, f"{what}: max error {err:.3g} against a reference of scale {scale:.3g}"


def close_all(actual: list[torch.Tensor], expected: list[torch.Tensor], what: str, rtol: float = 1e-4) -> None:
    """:func:`close` for several tensors against one scale, the largest reference among them (the
    gradient of a crop the loss barely depends on is float32 noise relative to its own size)."""
    scale = max(e.detach().abs().max().item() for e in expected)
    for n, (a, e) in enumerate(zip(actual, expected)):
        err = (a.detach().to(D) - e.detach().to(D)).abs().max().item()
        assert err <= rtol * scale, f"{what}[{n}]: max error {err:.3g} against a reference of scale {scale:.3g}"


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
        out, loss, _ = loop.forward({"views": [torch.randn(4, 3, 8, 8)], "id": ids})
        zs = [leaf(x) for x in out["z"]]
        v = [F.normalize(x, dim=1) for x in zs]
        terms = []
        if negatives == "batch":  # L(V_i, V_j) = L^{i→j} + L^{j→i}, each an InfoNCE over the batch
            labels = torch.arange(4)
            for i, j in pairs:
                logits = v[i] @ v[j].T / tau
                terms += [F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)]
        else:  # each view's embedding against the other view's memory: own row positive, K drawn rows
            assert len(drawn) == step + 1, "one draw per step, shared by every view pair (as CMC's NCEAverage)"
            idx = drawn[-1]
            check_draw(idx, seen, 4, k)
            for i, j in pairs:
                for a, b in ((i, j), (j, i)):
                    logits = torch.cat([(v[a] * rows[b][ids]).sum(1, keepdim=True),
                                        torch.einsum("bd,bkd->bk", v[a], rows[b][idx])], 1) / tau
                    terms.append(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))
        ref = torch.stack(terms).sum()
        ref.backward()
        close(loss, ref, f"step {step}: loss")
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
        for name, (lg, p) in accs.items():
            close_top1(metrics[name], lg, p, f"step {step}: {name}")
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
        close(metrics["prototype_usage"], usage, f"step {step}: prototype usage")
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
        m = 1 - (1 - base_m) * (math.cos(math.pi * loop.step / total) + 1) / 2  # cosine to 1 over the run
        online = {f"model.{n}": p.detach().to(D) for n, p in model.named_parameters()}
        online.update({f"last.{n}": t for n, t in last.items()})
        teacher = {n: m * t + (1 - m) * online[n] for n, t in teacher.items()}
        lib_teacher = dict(objective.target.net.named_parameters())
        assert set(lib_teacher) == set(teacher)
        for n, t in teacher.items():
            close(lib_teacher[n], t, f"step {step}: teacher {n}", rtol=1e-5)
