"""The tiled InfoNCE (mmcl.objectives.tiled) against the whole-matrix loss and a plain-Python
reference: same value, same gradients for every input, and no [B, N] tensor kept for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmcl.objectives.clip import ClipLoss, ClipLossConfig, clip_loss
from mmcl.objectives.infonce import info_nce
from mmcl.objectives.tiled import tiled_info_nce, tiled_symmetric_info_nce

from .test_clip_loss import reference_clip_loss


def unit(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()


def grads(loss: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, inputs))


@pytest.mark.parametrize("b, n, tile", [(10, 10, 3), (10, 10, 4), (10, 10, 64), (5, 20, 3), (7, 21, 1)])
def test_tiled_info_nce_equals_the_whole_matrix(b: int, n: int, tile: int) -> None:
    """Tiles that do not divide the sizes, one tile for all, tiles of one row; targets spread over
    the columns (as a process's rows against the global batch)."""
    g = torch.Generator().manual_seed(b * 100 + n + tile)
    q, k = unit(b, 6, g), unit(n, 6, g)
    scale = torch.tensor(9.0, dtype=torch.float64, requires_grad=True)
    targets = torch.randperm(n, generator=g)[:b]
    whole = info_nce(scale * q @ k.T, targets)
    tiled, acc = tiled_info_nce(q, k, scale, targets, tile)
    assert tiled.dtype == torch.float32 and abs(tiled.item() - whole.item()) < 1e-6
    assert acc.item() == pytest.approx(((q @ k.T).argmax(dim=1) == targets).double().mean().item())
    q64, k64 = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    s64 = scale.detach().clone().requires_grad_()
    # float32 blocks: compare the gradients with the whole matrix in float32 too
    w32 = info_nce(s64.float() * q64.float() @ k64.float().T, targets)
    for got, want in zip(grads(tiled, [q, k, scale]), grads(w32, [q64, k64, s64])):
        assert got.dtype == want.dtype == torch.float64 and torch.allclose(got, want, atol=1e-6), (got, want)


@pytest.mark.parametrize("local_loss", [False, True])
def test_clip_loss_in_tiles_equals_clip_loss_and_the_reference(local_loss: bool) -> None:
    """Both directions, with rows of one of 3 simulated processes (local_loss) or of all of them."""
    g = torch.Generator().manual_seed(1)
    image_all, text_all = unit(9, 5, g), unit(9, 5, g)
    scale = torch.tensor(11.0, dtype=torch.float64, requires_grad=True)
    rank = 1
    image, text = (image_all[3:6], text_all[3:6]) if local_loss else (image_all, text_all)
    plain, m_plain = clip_loss(image, text, image_all, text_all, scale, rank, local_loss)
    tiled, m_tiled = clip_loss(image, text, image_all, text_all, scale, rank, local_loss, tile=2)
    assert abs(tiled.item() - plain.item()) < 1e-6
    assert {k: v.item() for k, v in m_tiled.items()} == {k: v.item() for k, v in m_plain.items()}
    if not local_loss:
        assert abs(tiled.item() - reference_clip_loss(image_all.tolist(), text_all.tolist(), 11.0)) < 1e-6
    for got, want in zip(grads(tiled, [image_all, text_all, scale]), grads(plain, [image_all, text_all, scale])):
        assert torch.allclose(got, want, atol=1e-6)


def test_the_objective_with_tiles_matches_without_and_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(2)
    img, txt = unit(12, 8, g).detach().float(), unit(12, 8, g).detach().float()
    out = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(20.0)}
    plain, _ = ClipLoss()(out)
    tiled, metrics = ClipLoss(ClipLossConfig(tile=5))(out)
    assert abs(tiled.item() - plain.item()) < 1e-5 and set(metrics) == {"acc_i2t", "acc_t2i", "logit_scale"}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 features, float32 blocks and loss
        low, _ = ClipLoss(ClipLossConfig(tile=5))({**out, "image_features": img.bfloat16(),
                                                   "text_features": txt.bfloat16()})
    assert low.dtype == torch.float32 and abs(low.item() - plain.item()) < 0.05


def test_no_batch_by_batch_tensor_is_kept_for_the_backward() -> None:
    """What autograd saves: the whole loss keeps [B, N] logits; the tiled one only the features
    and one number per row."""
    g = torch.Generator().manual_seed(3)
    b = n = 64
    q, k = unit(b, 4, g), unit(n, 4, g)
    scale, targets = torch.tensor(5.0, dtype=torch.float64, requires_grad=True), torch.arange(b)

    def largest_saved(fn) -> int:  # noqa: ANN001
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            fn()
        return max(sizes)

    assert largest_saved(lambda: info_nce(scale * q @ k.T, targets)) >= b * n
    assert largest_saved(lambda: tiled_info_nce(q, k, scale, targets, 8)) <= max(b, n) * 4
    assert largest_saved(lambda: tiled_symmetric_info_nce(q, k, scale, 8)) <= max(b, n) * 4


@pytest.mark.parametrize("n, tile", [(10, 3), (10, 10), (9, 4), (6, 1)])
def test_tiled_symmetric_loss_equals_the_whole_matrix_in_both_directions(n: int, tile: int) -> None:
    g = torch.Generator().manual_seed(n * 10 + tile)
    a, b = unit(n, 5, g), unit(n, 5, g)
    scale = torch.tensor(13.0, dtype=torch.float64, requires_grad=True)
    a32, b32, s32 = (t.detach().float().requires_grad_() for t in (a, b, scale))
    logits = s32 * a32 @ b32.T
    targets = torch.arange(n)
    whole = 0.5 * (info_nce(logits, targets) + info_nce(logits.T, targets))
    loss, acc_ab, acc_ba = tiled_symmetric_info_nce(a, b, scale, tile)
    assert abs(loss.item() - whole.item()) < 1e-6
    assert abs(loss.item() - reference_clip_loss(a.tolist(), b.tolist(), 13.0)) < 1e-5
    assert acc_ab.item() == pytest.approx((logits.argmax(1) == targets).float().mean().item())
    assert acc_ba.item() == pytest.approx((logits.argmax(0) == targets).float().mean().item())
    for got, want in zip(grads(loss, [a, b, scale]), grads(whole, [a32, b32, s32])):
        assert got.dtype == torch.float64 and torch.allclose(got, want.double(), atol=1e-6), (got, want)
