"""A training stream resumed at a saved position (``Loader.resume_at``) goes on exactly as the
uninterrupted stream, without reading again the shards it had finished: those are scanned for tar
headers, and the data of the samples still in the shuffle buffer read where it lies. Shards that
cannot be scanned (over HTTP) are read on from the first one; a position inside the stream's final
shuffle gives out what was left in the buffer."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import cfg_for

from mmcl.data import make_loader, seek
from mmcl.data import stream as stream_module
from mmcl.data.stream import ShardStream

from .test_remote import serve  # noqa: F401  (the HTTP server fixture)

SHARDS = [f"train-{i:06d}.tar" for i in range(5)]
SCANNED: list[str] = []  # the shards a resume scanned for their tar headers


def batches_after(cfg, at: float) -> tuple[object, list[list[str]]]:  # noqa: ANN001
    """The position after ``at`` of epoch 0's batches, and the keys of every batch after it."""
    loader = make_loader(cfg, seed=3)
    loader.set_epoch(0)
    keys = [b["key"] for b in loader]
    loader = make_loader(cfg, seed=3)
    loader.set_epoch(0)
    it = iter(loader)
    for _ in range(int(at * len(keys))):
        next(it)
    return loader.position(), keys[int(at * len(keys)):]


def resumed(cfg, position, monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[str]], list[str]]:  # noqa: ANN001
    """The keys of every batch of a loader resumed at ``position``, and the shards it read in full."""
    read: list[str] = []
    real = ShardStream._read_shard

    def recording(self, url, *args, **kwargs):  # noqa: ANN001, ANN202
        read.append(url.rsplit("/", 1)[-1])
        return real(self, url, *args, **kwargs)

    def scanning(url):  # noqa: ANN001, ANN202
        SCANNED.append(url.rsplit("/", 1)[-1])
        return seek.scan_tar(url)

    SCANNED.clear()
    monkeypatch.setattr(ShardStream, "_read_shard", recording)
    monkeypatch.setattr(stream_module, "scan_tar", scanning)
    loader = make_loader(cfg, seed=3)
    loader.resume_at(position)
    loader.set_epoch(0)
    return [b["key"] for b in loader], read


@pytest.mark.parametrize(("at", "initial"), [(0.3, None), (0.7, None), (0.03, 16), (0.3, 16)])
def test_a_resumed_stream_goes_on_exactly_reading_only_the_shards_left(digits_dir: Path, at: float,
                                                                       initial: int | None,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Also with a buffer that starts giving out at 16 samples and grows to 64 (``data.shuffle_initial``):
    at 0.03 of the epoch (2 batches of 16, in the first shard) it is still growing."""
    cfg = cfg_for(f"{digits_dir}/train-{{000000..000004}}.tar", shuffle_buffer=64, shuffle_initial=initial)
    position, rest = batches_after(cfg, at)
    again, read = resumed(cfg, position, monkeypatch)
    assert again == rest
    order = [u.rsplit("/", 1)[-1] for u, _, _ in make_loader(cfg, seed=3).stream._my_shards(0, 1, 0)]
    first = order.index(read[0])
    assert (first > 0) == (at > 0.1) and read == order[first:]  # the finished shards were not read again
    assert set(SCANNED) <= set(order[:first + 1])  # only those holding samples still in the buffer scanned:
    if at > 0.5:  # the others, of the size their manifest entry records, were passed over unopened
        assert len(set(SCANNED) - {read[0]}) < first, (SCANNED, first)


def test_a_position_in_the_final_shuffle_reads_only_what_was_left(digits_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The last batches of an epoch come from the buffer's final shuffle, after the shards ran out:
    the resume gives out what was left in the buffer, found by scanning, no shard read in full (a
    buffer that started giving out at 16 samples, grown to 64)."""
    cfg = cfg_for(f"{digits_dir}/train-{{000000..000004}}.tar", shuffle_buffer=64, shuffle_initial=16)
    position, rest = batches_after(cfg, 0.99)
    assert len(rest) * cfg.batch_size < cfg.shuffle_buffer
    again, read = resumed(cfg, position, monkeypatch)
    assert again == rest and read == []


def test_http_shards_resume_exactly_reading_on(digits_dir: Path, serve, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    _, base = serve(digits_dir)
    cfg = cfg_for("::".join(f"{base}/{n}" for n in SHARDS), shuffle_buffer=64)
    position, rest = batches_after(cfg, 0.5)
    again, _ = resumed(cfg, position, monkeypatch)
    assert again == rest


def test_a_growing_shuffle_buffer_starts_early_and_gives_out_every_sample_once() -> None:
    """``data.shuffle_initial``: the first sample goes out once ``initial`` are in, one for every
    second taken in while the buffer grows to its size, then one for each; every sample exactly once.
    Without it, or at the buffer's size or above (webdataset clamps it too), the buffer fills first."""
    import random

    def run(initial: int | None) -> tuple[list[int], list[int]]:
        buf = seek.ShuffleBuffer(64, random.Random(0), initial=initial)
        out, sizes = [], []
        for n in range(500):
            out += buf.push(n)
            sizes.append(len(buf.items))
        return out + buf.drain(), sizes

    grown, sizes = run(16)  # items held after each push: the 16th gives out the first sample
    assert sorted(grown) == list(range(500)) and grown != list(range(500))
    assert sizes[13:20] == [14, 15, 15, 16, 16, 17, 17]
    assert sizes.index(63) == 16 + 2 * 47 and set(sizes[110:]) == {63}  # full, one out for each in
    filled, sizes = run(None)  # as before: nothing out until 64 are in
    assert sizes.index(63) == 62 and set(sizes[62:]) == {63} and sorted(filled) == list(range(500))
    assert filled == run(64)[0] == run(1000)[0] != grown

