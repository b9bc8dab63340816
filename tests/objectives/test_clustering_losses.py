"""SwAV and DINO: Sinkhorn against a plain NumPy transcription of the paper's algorithm and its
marginals, the swapped-prediction and DINO losses against hand computations, the DINO centre,
temperatures and frozen prototypes; multi-crop batching and ViT position interpolation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmcl.data import make_loader
from mmcl.data.loader import DataConfig, MultiCropConfig
from mmcl.models.encoder import EncoderModel, EncoderModelConfig, encode_grouped
from mmcl.models.encoders import BackboneConfig, OpenClipVision
from mmcl.models.heads import HeadConfig
from mmcl.objectives.dino import DINOConfig, DINOLoss, dino_loss, teacher_temperature
from mmcl.objectives.swav import SwAVConfig, SwAVLoss, sinkhorn

torch.manual_seed(0)


def cosine_scores(b: int, k: int, d: int = 8) -> torch.Tensor:
    return F.normalize(torch.randn(b, d), dim=1) @ F.normalize(torch.randn(k, d), dim=1).T


def numpy_sinkhorn(scores: np.ndarray, eps: float, iters: int) -> np.ndarray:
    """SwAV's Algorithm (Caron et al., 2020, appendix), one process."""
    q = np.exp(scores / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


def test_sinkhorn_matches_the_reference_and_is_doubly_stochastic() -> None:
    s = cosine_scores(12, 5)
    q3 = sinkhorn(s, 0.05, 3)
    assert np.allclose(q3.numpy(), numpy_sinkhorn(s.double().numpy(), 0.05, 3), atol=1e-5)
    assert torch.allclose(q3.sum(dim=1), torch.ones(12), atol=1e-5)  # each sample: one unit of mass
    q = sinkhorn(s, 0.05, 200)
    assert torch.allclose(q.sum(dim=1), torch.ones(12), atol=1e-5)
    assert torch.allclose(q.sum(dim=0), torch.full((5,), 12 / 5), atol=1e-3)  # equal share per prototype


def test_swav_loss_is_the_swapped_prediction_and_prototypes_start_frozen() -> None:
    swav = SwAVLoss(SwAVConfig(prototypes=6, temperature=0.2, freeze_prototypes_steps=1))
    swav.setup(type("M", (), {"embed_dim": 4})(), 10)
    z = [torch.randn(5, 4, requires_grad=True) for _ in range(3)]  # 2 global crops + 1 local
    loss, metrics = swav({"z": z})
    w = swav.prototypes.weight.detach()
    assert torch.allclose(w.norm(dim=1), torch.ones(6), atol=1e-6)  # renormalised before use
    scores = [F.normalize(x.detach(), dim=1) @ w.T for x in z]
    ref = []
    for i in (0, 1):
        q = numpy_sinkhorn(scores[i].double().numpy(), 0.05, 3)
        for v in range(3):
            if v != i:
                logp = torch.log_softmax(scores[v].double() / 0.2, dim=1).numpy()
                ref.append(-(q * logp).sum(axis=1).mean())
    assert loss.item() == pytest.approx(float(np.mean(ref)), rel=1e-4)
    assert 0 < metrics["prototype_usage"] <= 1
    loss.backward()
    assert swav.prototypes.weight.grad.abs().sum() == 0 and z[2].grad.abs().sum() > 0
    swav.after_optimizer_step(1)  # frozen for 1 step only
    swav.prototypes.weight.grad = None
    swav({"z": [x.detach().requires_grad_() for x in z]})[0].backward()
    assert swav.prototypes.weight.grad.abs().sum() > 0


def test_dino_loss_centre_and_temperatures_by_hand() -> None:
    s = [torch.randn(3, 5, dtype=torch.float64) for _ in range(3)]
    t = [torch.randn(3, 5, dtype=torch.float64) for _ in range(2)]
    c = torch.randn(1, 5, dtype=torch.float64)
    ref, n = 0.0, 0
    for i, ti in enumerate(t):
        for v, sv in enumerate(s):
            if v == i:
                continue
            for row in range(3):
                pt = [math.exp((ti[row, k] - c[0, k]).item() / 0.04) for k in range(5)]
                ps = [math.exp(sv[row, k].item() / 0.1) for k in range(5)]
                ref += -sum(a / sum(pt) * math.log(b / sum(ps)) for a, b in zip(pt, ps)) / 3
            n += 1
    assert dino_loss(s, t, c, 0.1, 0.04).item() == pytest.approx(ref / n, rel=1e-6)  # computed in float32
    cfg = DINOConfig(out_dim=5, teacher_temperature=0.07, warmup_teacher_temperature=0.04, warmup_teacher_steps=30)
    assert [teacher_temperature(k, cfg) for k in (0, 15, 30, 99)] == pytest.approx([0.04, 0.055, 0.07, 0.07])
    dino = DINOLoss(cfg)
    dino.center.fill_(1.0)
    teacher = [torch.tensor([[1.0, 2, 3, 4, 5], [3, 3, 3, 3, 3]]), torch.tensor([[0.0, 0, 0, 0, 8], [0, 0, 0, 0, 0]])]
    dino.update_center(teacher)
    mean = torch.tensor([4.0, 5, 6, 7, 16]) / 4
    assert torch.allclose(dino.center[0], 0.9 * 1.0 + 0.1 * mean)


def test_dino_teacher_sees_global_crops_and_is_an_ema_of_model_and_last_layer() -> None:
    model = EncoderModel(EncoderModelConfig(backbone=BackboneConfig(width=8, depth=2, norm="gn"),
                                            projector=HeadConfig(dims=[16, 8], norm="none", activation="gelu"),
                                            group_views=True))
    dino = DINOLoss(DINOConfig(out_dim=32, momentum=0.5))
    dino.setup(model, 10)
    views = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(3)]
    loss, metrics = dino(model({"views": views}), {"views": views})
    assert torch.isfinite(loss) and 0 < metrics["teacher_entropy"] <= 1
    assert len(dino.target({"views": views[:2]})) == 2
    with torch.no_grad():
        dino.last.v.add_(1.0)
    before = dino.target.net.last.v.clone()
    dino.after_optimizer_step(1)
    m = dino.target.momentum
    assert m == pytest.approx(1 - 0.5 * (math.cos(math.pi / 10) + 1) / 2)  # cosine from 0.5 towards 1
    assert torch.allclose(dino.target.net.last.v, m * before + (1 - m) * dino.last.v, atol=1e-6)
    assert int(dino.step) == 1


def test_dino_last_layer_frozen_for_the_first_steps() -> None:
    model = EncoderModel(EncoderModelConfig(backbone=BackboneConfig(width=8, depth=2, norm="gn"),
                                            projector=HeadConfig(dims=[16, 8], norm="none")))
    dino = DINOLoss(DINOConfig(out_dim=6, freeze_last_layer_steps=1, norm_last_layer=False))
    dino.setup(model, 10)
    views = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    dino(model({"views": views}), {"views": views})[0].backward()
    assert dino.last.v.grad.abs().sum() == 0 and dino.last.g.grad.abs().sum() == 0
    assert all(p.grad.abs().sum() > 0 for p in model.projector.parameters())
    dino.after_optimizer_step(1)
    dino.last.v.grad = None
    dino(model({"views": views}), {"views": views})[0].backward()
    assert dino.last.v.grad.abs().sum() > 0
    # a checkpoint's step (a buffer) reaches the host copy forward reads, and a fresh one starts at 0
    resumed = DINOLoss(DINOConfig(out_dim=6, freeze_last_layer_steps=1, norm_last_layer=False))
    resumed.setup(model, 10)
    assert resumed.current_step() == 0
    resumed.load_state_dict(dino.state_dict())
    assert resumed.current_step() == 1


def test_multi_crop_views_and_grouped_encoding(digits_dir: Path) -> None:
    cfg = DataConfig(train_shards=str(digits_dir / "val-000000.tar"), kind="multi_view", image_size=32, batch_size=8,
                     num_workers=0, transform="digits_ssl", views=2,
                     multi_crop=MultiCropConfig(local_crops=3, local_size=16))
    loader = make_loader(cfg, train=True)
    batch = loader.prepare(next(iter(loader)), "cpu")
    assert [tuple(v.shape) for v in batch["views"]] == [(8, 3, 32, 32)] * 2 + [(8, 3, 16, 16)] * 3
    calls = []
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    grouped = encode_grouped(net, batch["views"])
    assert calls == [16, 24]  # once per resolution
    for g, v in zip(grouped, batch["views"]):
        assert torch.allclose(g, net(v), atol=1e-6)


def test_open_clip_vit_takes_local_crops_with_interpolated_positions() -> None:
    vit = OpenClipVision(None, "mmcl-tiny-vit").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(vit._resized_forward(x), vit.tower(x), atol=1e-6)  # same grid: open_clip's forward
        local = vit(torch.randn(2, 3, 16, 16))
    assert local.shape == (2, 64) and torch.isfinite(local).all()
