"""The InfoNCE core shared by every contrastive objective, and the collapse monitor: pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each row of ``logits`` (already scaled by 1/τ) against its positive column.

    >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    >>> manual = -(torch.log_softmax(logits, -1)[[0, 1], [0, 1]]).mean()
    >>> torch.allclose(info_nce(logits, torch.tensor([0, 1])), manual)
    True
    """
    return F.cross_entropy(logits.float(), targets)


def symmetric_info_nce(logits_a: torch.Tensor, logits_b: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Average of InfoNCE in both directions (a→b rows, b→a rows), as in CLIP.

    >>> sims = torch.tensor([[3.0, 1.0], [0.5, 2.0]])  # image i against text j, scaled
    >>> loss = symmetric_info_nce(sims, sims.T, torch.arange(2))
    >>> torch.allclose(loss, (info_nce(sims, torch.arange(2)) + info_nce(sims.T, torch.arange(2))) / 2)
    True
    """
    return 0.5 * (info_nce(logits_a, targets) + info_nce(logits_b, targets))


def top1(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Fraction of rows whose highest logit is the positive."""
    return (logits.argmax(dim=-1) == targets).float().mean()


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: per-dimension std of the L2-normalised embeddings, averaged over dimensions.

    About ``1/sqrt(D)`` when embeddings spread over the sphere; near 0 when they collapse to a point.
    """
    return F.normalize(z.float(), dim=-1).std(dim=0).mean()
