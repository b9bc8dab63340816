"""Single-modal objectives against independent plain-Python reference computations, and their
state: the MoCo queue, momentum targets and schedules; kNN and the linear probe."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.evaluate.knn import knn_classify, linear_probe
from mmcl.objectives.byol import byol_loss
from mmcl.objectives.moco import moco_logits
from mmcl.objectives.mocov3 import mocov3_ctr
from mmcl.objectives.momentum import MomentumTarget, cosine_momentum
from mmcl.objectives.queue import KeyQueue
from mmcl.objectives.simclr import SimCLRConfig, SimCLRLoss, nt_xent
from mmcl.objectives.simsiam import simsiam_loss

from . import dot, unit

torch.manual_seed(0)


def test_nt_xent_matches_the_definition() -> None:
    z1, z2, tau = unit(5, 4), unit(5, 4), 0.3
    views = list(z1) + list(z2)
    n = len(z1)
    ref = 0.0
    for i, zi in enumerate(views):
        pos = (i + n) % (2 * n)
        denom = sum(math.exp(dot(zi, zj) / tau) for j, zj in enumerate(views) if j != i)
        ref += -math.log(math.exp(dot(zi, views[pos]) / tau) / denom)
    loss, _ = SimCLRLoss(SimCLRConfig(temperature=tau))({"z": [z1 * 3, z2 * 2]})  # the loss normalises
    assert loss.item() == pytest.approx(ref / (2 * n), rel=1e-6)
    # two simulated processes, each scoring its own rows against everyone's: same mean loss
    z1e, z2e = unit(6, 4), unit(6, 4)
    full = nt_xent(z1e, z2e, z1e, z2e, tau, 0)[0]
    split = [nt_xent(z1e[r * 3:(r + 1) * 3], z2e[r * 3:(r + 1) * 3], z1e, z2e, tau, r)[0] for r in (0, 1)]
    assert (sum(split) / 2).item() == pytest.approx(full.item(), rel=1e-6)


def test_moco_logits_and_loss_match_the_definition() -> None:
    q, k, queue, tau = unit(3, 4), unit(3, 4), unit(7, 4), 0.2
    logits = moco_logits(q, k, queue, tau)
    loss = F.cross_entropy(logits, torch.zeros(3, dtype=torch.long))
    ref = 0.0
    for qi, ki in zip(q, k):
        pos = math.exp(dot(qi, ki) / tau)
        ref += -math.log(pos / (pos + sum(math.exp(dot(qi, kj) / tau) for kj in queue)))
    assert loss.item() == pytest.approx(ref / 3, rel=1e-6)


def test_mocov3_contrastive_term_matches_the_definition() -> None:
    q, k_all, tau = unit(2, 4), unit(4, 4), 0.5
    loss, _ = mocov3_ctr(q, k_all, tau, rank=1)  # this process holds rows 2..3 of the global batch
    ref = 0.0
    for i, qi in enumerate(q):
        own = 2 + i
        ref += -math.log(math.exp(dot(qi, k_all[own]) / tau) / sum(math.exp(dot(qi, kj) / tau) for kj in k_all))
    assert loss.item() == pytest.approx(2 * tau * ref / 2, rel=1e-6)  # the loss runs in float32


def test_byol_and_simsiam_match_the_definitions_and_stop_gradients() -> None:
    torch.manual_seed(0)  # the draws must not depend on which tests ran before
    p, t = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    ref = sum(sum((a / a.norm() - b / b.norm()) ** 2).item() for a, b in zip(p, t)) / 4
    assert byol_loss(p, t).item() == pytest.approx(ref, rel=1e-6)
    p1, p2 = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    z1, z2 = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    cos = lambda a, b: [dot(x, y) / (x.norm().item() * y.norm().item()) for x, y in zip(a, b)]  # noqa: E731
    ref = -0.5 * (sum(cos(p1, z2)) / 4 + sum(cos(p2, z1)) / 4)
    loss = simsiam_loss(p1, p2, z1, z2)
    # float32 cosines of about 1 summed to a value that can be near 0: an absolute tolerance
    assert loss.item() == pytest.approx(ref, abs=1e-6)
    loss.backward()
    assert z1.grad is None and z2.grad is None and p1.grad is not None  # stop-gradient on the targets


def test_queue_wraps_around_when_size_does_not_divide_the_batch() -> None:
    q = KeyQueue(5, 2)
    batches = [torch.full((3, 2), float(i)) for i in (1, 2, 3)]
    q.push(batches[0])
    assert q.ptr.item() == 3 and q.keys[:3].eq(1).all()
    q.push(batches[1])  # rows 3, 4, then 0
    assert q.ptr.item() == 1 and q.keys[[3, 4, 0]].eq(2).all() and q.keys[[1, 2]].eq(1).all()
    q.push(torch.arange(14.0).view(7, 2))  # more than the queue holds: the newest 5 rows, oldest first
    assert torch.equal(q.keys[[1, 2, 3, 4, 0]], torch.arange(4.0, 14.0).view(5, 2)) and q.ptr.item() == 1


def test_momentum_schedule_and_ema_update() -> None:
    assert cosine_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_momentum(100, 100, 0.996) == pytest.approx(1.0)
    online = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    target = MomentumTarget(online, 0.9, "fixed")
    before = target.net[0].weight.clone()
    with torch.no_grad():
        online[0].weight.add_(1.0)
    online(torch.randn(8, 3))  # changes the BatchNorm running statistics
    target.update(1)
    assert torch.allclose(target.net[0].weight, 0.9 * before + 0.1 * online[0].weight)
    assert torch.equal(target.net[1].running_mean, online[1].running_mean)
    assert not any(p.requires_grad for p in target.parameters())
    assert "_online" not in dict(target.named_modules()) and len(target.state_dict()) == len(online.state_dict())
    cosine = MomentumTarget(online, 0.99, "cosine", total_steps=10)
    cosine.update(5)
    assert cosine.momentum == pytest.approx(0.995)


def test_knn_votes_and_linear_probe_on_hand_checkable_data() -> None:
    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.05]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    test = torch.tensor([[1.0, 0.05], [0.05, 1.0], [-1.0, 0.0]])
    # k=3: the two near neighbours of the same class outvote the far third one
    assert knn_classify(train, labels, test, torch.tensor([0, 1, 2]), k=3, temperature=0.1)["top1"] == 1.0
    swapped = knn_classify(train, labels, test, torch.tensor([1, 0, 2]), k=3, temperature=0.1)
    assert swapped["top1"] == pytest.approx(1 / 3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    res = linear_probe(x[:150], y[:150], x[150:], y[150:])
    assert res["top1"] >= 0.96 and res["l2"] in (1e-5, 1e-4, 1e-3, 1e-2)
