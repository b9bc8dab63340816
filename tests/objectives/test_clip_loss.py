"""CLIP loss against an independent, loop-by-loop reference computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.objectives.clip import ClipLoss, clip_loss


def reference_clip_loss(image: list[list[float]], text: list[list[float]], scale: float) -> float:
    """Plain-Python symmetric InfoNCE: mean over rows of -log softmax(positive), both directions."""
    n = len(image)
    dot = [[scale * sum(a * b for a, b in zip(image[i], text[j])) for j in range(n)] for i in range(n)]

    def ce(rows: list[list[float]]) -> float:
        total = 0.0
        for i, row in enumerate(rows):
            m = max(row)
            total += -(row[i] - m - math.log(sum(math.exp(v - m) for v in row)))
        return total / len(rows)

    transposed = [[dot[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (ce(dot) + ce(transposed))


def features(n: int = 6, d: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1))


def test_matches_reference() -> None:
    img, txt = features()
    loss, metrics = ClipLoss()({"image_features": img, "text_features": txt, "logit_scale": torch.tensor(7.5)})
    assert abs(loss.item() - reference_clip_loss(img.tolist(), txt.tolist(), 7.5)) < 1e-6
    hits = sum(max(range(6), key=lambda j, i=i: float(img[i] @ txt[j])) == i for i in range(6))
    assert metrics["acc_i2t"].item() == pytest.approx(hits / 6)  # image i's best text is text i


def test_local_loss_over_simulated_ranks_averages_to_the_global_loss() -> None:
    img, txt = features(n=8)
    scale = torch.tensor(12.0, dtype=torch.float64)
    world = 4
    global_loss, _ = clip_loss(img, txt, img, txt, scale, rank=0, local_loss=False)
    local = [clip_loss(img[r * 2:(r + 1) * 2], txt[r * 2:(r + 1) * 2], img, txt, scale, rank=r, local_loss=True)[0]
             for r in range(world)]
    assert abs(sum(local).item() / world - global_loss.item()) < 1e-6
    assert abs(global_loss.item() - reference_clip_loss(img.tolist(), txt.tolist(), 12.0)) < 1e-6


def test_perfect_alignment_gives_low_loss_and_full_accuracy() -> None:
    img, _ = features()
    loss, m = ClipLoss()({"image_features": img, "text_features": img, "logit_scale": torch.tensor(100.0)})
    wrong, _ = ClipLoss()({"image_features": img, "text_features": img.roll(1, 0), "logit_scale": torch.tensor(100.0)})
    assert loss < 0.05 < wrong and m["acc_i2t"] == m["acc_t2i"] == 1.0
