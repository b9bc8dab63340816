"""Resuming a shard stream mid-epoch without reading again what it had read.

A worker's stream is its shards' samples, in order, through a shuffle buffer whose random choices
depend only on how many samples went in. So where the stream stood after giving out ``n`` samples
can be found without data: :func:`shuffle_state` replays the buffer on sample *numbers*, giving the
numbers still in the buffer and how many samples had been read. The shards wholly read before that
point are then only scanned for their tar headers (:func:`mmcl.tarfiles.scan_tar`, data skipped by seeking) to
number their samples, and the data of the few samples still in the buffer is read where it lies
(:func:`read_members`). A resume thus reads a shard's worth of headers, not an epoch of images.
"""

from __future__ import annotations

import random
from typing import Any

from mmcl.tarfiles import scan_tar

__all__ = ["ShuffleBuffer", "buffer_settings", "final_shuffle", "read_members", "scan_tar", "shuffle_state"]


class ShuffleBuffer:
    """The stream's shuffle buffer: once ``size`` items are in, each new one makes it give out one
    drawn at random; when the stream ends the rest go out in a random order. With ``initial`` (below
    ``size``) it starts giving out once ``initial`` items are in and grows to ``size`` by giving out
    one item for every second it takes in, as webdataset's ``shuffle(bufsize, initial)`` does (open_clip
    trains with 5,000 and 1,000): the first batch waits for ``initial`` items read, not ``size``. The
    one place its draws are made, for the samples (:meth:`ShardStream._shuffled`) and for their numbers
    in a replay, so a replay makes the stream's draws by construction; ``taken`` (items taken in so
    far) restores a replayed buffer's place in its growth."""

    def __init__(self, size: int, rng: random.Random, items: list[Any] | None = None, initial: int | None = None,
                 taken: int = 0):
        self.size, self.rng, self.items, self.taken = size, rng, list(items or []), taken
        self.initial = size if initial is None else min(initial, size)

    def push(self, item: Any) -> list[Any]:
        """Take ``item`` in; what that gives out (one item once the buffer is full, or every second
        one while it grows from ``initial``; else none)."""
        self.items.append(item)
        self.taken += 1
        full = len(self.items) >= self.size
        if not full and (len(self.items) < self.initial or self.taken % 2):
            return []
        i = self.rng.randrange(len(self.items))
        self.items[i], self.items[-1] = self.items[-1], self.items[i]
        return [self.items.pop()]

    def drain(self) -> list[Any]:
        """What is left, in the random order the end of the stream gives it out."""
        self.rng.shuffle(self.items)
        out, self.items = self.items, []
        return out


def buffer_settings(size: int, initial: int | None) -> tuple[int, int | None]:
    """``(size, initial)`` written one way for each order they give: no buffer is size 0 (a stream
    takes 0 and 1 alike), a buffer that fills first has ``initial`` None (:class:`ShuffleBuffer`
    takes ``size`` or more alike).

    >>> buffer_settings(1, 5), buffer_settings(64, 64), buffer_settings(64, 16)
    ((0, None), (64, None), (64, 16))
    """
    if size <= 1:
        return 0, None
    return size, initial if initial is not None and initial < size else None


def shuffle_state(given: int, buffer_size: int, rng: random.Random,
                  initial: int | None = None) -> tuple[list[int], int]:
    """The shuffle buffer (sample numbers, in buffer order) after it has given out ``given``
    samples of an endless stream, and how many samples it had taken in; ``rng`` is left as the
    buffer's generator was."""
    if buffer_size <= 1:  # no buffer: the stream goes out as it comes
        return [], given
    buf = ShuffleBuffer(buffer_size, rng, initial=initial)
    taken = out = 0
    while out < given:
        out += len(buf.push(taken))
        taken += 1
    return buf.items, taken


def final_shuffle(given: int, buffer_size: int, total: int, rng: random.Random,
                  initial: int | None = None) -> list[int]:
    """The sample numbers a shuffle buffer gives out after its first ``given``, when its stream holds
    ``total`` samples and ``given`` reaches into the final shuffle of what is left in the buffer
    once the stream has run out."""
    if buffer_size <= 1:  # no buffer: the stream goes out as it comes
        return list(range(given, total))
    buf = ShuffleBuffer(buffer_size, rng, initial=initial)
    out = [x for n in range(total) for x in buf.push(n)]
    return (out + buf.drain())[given:]


def read_members(path: str, sample: dict[str, Any]) -> dict[str, Any]:
    """``sample`` (from :func:`scan_tar` grouped by key) with each file's data read from ``path``."""
    out = {}
    with open(path, "rb") as f:
        for k, v in sample.items():
            if k.startswith("__"):
                out[k] = v
                continue
            offset, size = v
            f.seek(offset)
            out[k] = f.read(size)
    return out
