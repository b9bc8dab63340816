"""Loss tests; the plain-Python helpers their reference computations share."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unit(*shape: int) -> torch.Tensor:
    """Random float64 unit vectors along the last dimension."""
    return F.normalize(torch.randn(*shape, dtype=torch.float64), dim=-1)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dot product computed element by element in Python floats (independent of torch's kernels)."""
    return sum(float(x) * float(y) for x, y in zip(a.detach(), b.detach()))
