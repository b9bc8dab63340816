"""A FIFO queue of keys (MoCo's dictionary), kept identical on every process."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KeyQueue(nn.Module):
    """``size`` rows of ``dim``-d keys, initialised to random unit vectors; the oldest rows are
    overwritten first. The size need not be a multiple of the batch: writes wrap around."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        """Enqueue ``keys`` [n, dim] (from all processes, in the same order everywhere)."""
        size = self.keys.shape[0]
        keys = keys.detach().to(self.keys.dtype)[-size:]
        idx = (self.ptr + torch.arange(keys.shape[0], device=self.keys.device)) % size
        self.keys[idx] = keys
        self.ptr.copy_((self.ptr + keys.shape[0]) % size)
