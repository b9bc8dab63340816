"""What a trainer trains on, sample by sample (test support: resumed and elastic runs are checked
by the keys they trained on against an uninterrupted run's)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any


def record_trained(trainer: Any) -> list[tuple[int, str]]:
    """A list that receives ``(epoch, key)`` of every sample ``trainer`` (a :class:`mmcl.train.Trainer`)
    takes from its loader from now on, fast-forwarded batches of an exact resume included."""
    log: list[tuple[int, str]] = []
    inner = trainer.loader.forever

    def forever(start_epoch: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        for epoch, batch in inner(start_epoch):
            log.extend((epoch, key) for key in batch["key"])
            yield epoch, batch

    trainer.loader.forever = forever
    return log
