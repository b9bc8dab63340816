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


@pytest.mark.parametrize("at", [0.3, 0.7])
def test_a_resumed_stream_goes_on_exactly_reading_only_the_shards_left(digits_dir: Path, at: float,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cfg_for(f"{digits_dir}/train-{{000000..000004}}.tar", shuffle_buffer=64)
    position, rest = batches_after(cfg, at)
    again, read = resumed(cfg, position, monkeypatch)
    assert again == rest
    order = [u.rsplit("/", 1)[-1] for u, _, _ in make_loader(cfg, seed=3).stream._my_shards(0, 1, 0)]
    first = order.index(read[0])
    assert first > 0 and read == order[first:]  # the finished shards were not read again,
    assert set(SCANNED) <= set(order[:first + 1])  # only those holding samples still in the buffer scanned:
    if at > 0.5:  # the others, of the size their manifest entry records, were passed over unopened
        assert len(set(SCANNED) - {read[0]}) < first, (SCANNED, first)


def test_a_position_in_the_final_shuffle_reads_only_what_was_left(digits_dir: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The last batches of an epoch come from the buffer's final shuffle, after the shards ran out:
    the resume gives out what was left in the buffer, found by scanning, no shard read in full."""
    cfg = cfg_for(f"{digits_dir}/train-{{000000..000004}}.tar", shuffle_buffer=64)
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
