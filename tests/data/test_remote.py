"""Remote shards: read over HTTP from a real server on 127.0.0.1 that drops connections, stalls,
answers 503 and serves shards cut short; every complete sample arrives once, faults are counted.

The server (a ``ThreadingHTTPServer`` in a thread) serves the session's digits shards and their
``manifest.json``, with or without ``Range`` support. Time-outs are 0.5 s and back-off waits a
hundredth of a second, so no test waits long; a hang would show as a test that takes minutes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import socket
import sys
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import cfg_for

from mmcl.data import DataConfig, Loader, make_loader
from mmcl.data.remote import ReadPolicy, ShardReadError, check_backends, open_shard
from mmcl.errors import DataError

SHARDS = [f"train-{i:06d}.tar" for i in range(5)]
SIZES = [256, 256, 256, 256, 233]  # samples per digits train shard
TIMEOUT = 0.5


class Faults:
    """What the server gets wrong, per file: the next requests' faults and permanent cuts."""

    def __init__(self, root: Path, ranges: bool):
        self.root, self.ranges = root, ranges
        self.planned: dict[str, list[str]] = {}  # file -> faults of its next requests: drop, stall, 503
        self.cut: dict[str, int] = {}  # file -> every response ends at this byte (full length announced)
        self.truncated: dict[str, int] = {}  # file -> served as a whole file of this many bytes
        self.requests: list[tuple[str, int]] = []  # (file, first byte asked for)
        self.lock = threading.Lock()
        self.release = threading.Event()  # ends the stalls when the test is over

    def plan(self, name: str, *faults: str) -> None:
        self.planned.setdefault(name, []).extend(faults)

    def next_fault(self, name: str, start: int) -> str | None:
        with self.lock:
            self.requests.append((name, start))
            planned = self.planned.get(name)
            return planned.pop(0) if planned else None


class Handler(BaseHTTPRequestHandler):
    """GET a file under the server's root, with the faults its :class:`Faults` plan."""

    server: Server

    def do_GET(self) -> None:  # noqa: N802 (the http.server name)
        f = self.server.faults
        name = self.path.lstrip("/")
        asked = self.headers.get("Range", "")
        start = int(asked.removeprefix("bytes=").removesuffix("-")) if asked and f.ranges else 0
        fault = f.next_fault(name, start)
        if not (f.root / name).is_file():
            self.send_error(404)
            return
        data = (f.root / name).read_bytes()[:f.truncated.get(name)]
        if fault == "503":
            self.send_error(503)
            return
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        body = data[start:max(start, f.cut[name])] if name in f.cut else data[start:]
        if fault in ("drop", "stall"):
            body = body[:len(body) // 2]
        self.close_connection = True
        try:
            self.wfile.write(body)
            self.wfile.flush()
            if fault == "stall":  # the client gives up waiting; then the connection closes
                f.release.wait(10)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args: object) -> None:
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    faults: Faults

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that went away mid-response is what these tests do on purpose


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[Faults, str]]]:
    """Start servers: ``serve(root, ranges=True)`` -> (its faults, its base URL)."""
    servers: list[Server] = []

    def start(root: Path, ranges: bool = True) -> tuple[Faults, str]:
        httpd = Server(("127.0.0.1", 0), Handler)
        httpd.faults = Faults(root, ranges)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        servers.append(httpd)
        return httpd.faults, f"http://127.0.0.1:{httpd.server_port}"

    yield start
    for httpd in servers:
        httpd.faults.release.set()
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Back-off waits of 0.01 s, 0.02 s, ..., at most 0.05 s, instead of 1 s, 2 s, ..., at most 30 s
    (also in forked workers)."""
    real = DataConfig.read_policy
    monkeypatch.setattr(DataConfig, "read_policy",
                        lambda self: dataclasses.replace(real(self), backoff_s=0.01, max_backoff_s=0.05))


def remote_cfg(base: str, names: list[str] = SHARDS, **kw) -> DataConfig:
    return cfg_for("::".join(f"{base}/{n}" for n in names), timeout_s=TIMEOUT, **kw)


def read(cfg: DataConfig, **kw) -> tuple[list[tuple[str, str]], Counter[str], Loader]:
    """(key, caption) of every sample of one pass of an evaluation loader (in order), and the skips."""
    loader = make_loader(cfg, train=False, **kw)
    samples = [s for b in loader for s in zip(b["key"], b["caption"])]
    return samples, loader.skipped, loader


def written(digits_dir: Path, name: str) -> list[tuple[str, str]]:
    """(key, caption) of every sample of a shard, read with tarfile."""
    with tarfile.open(digits_dir / name) as tar:
        return [(m.name.partition(".")[0], tar.extractfile(m).read().decode()) for m in tar.getmembers()
                if m.name.endswith(".txt")]


def cut_inside_sample(digits_dir: Path, name: str, n: int) -> int:
    """A byte inside the header of sample ``n``'s first file: samples 0 .. n-1 are whole before it."""
    key = written(digits_dir, name)[n][0]
    with tarfile.open(digits_dir / name) as tar:
        return next(m for m in tar.getmembers() if m.name.startswith(key + ".")).offset + 100


POLICY = ReadPolicy(retries=4, timeout_s=TIMEOUT, backoff_s=0.01, max_backoff_s=0.05)


@pytest.mark.parametrize("ranges", [True, False], ids=["range_requests", "no_ranges"])
def test_reads_resume_after_drops_stalls_and_503_to_exactly_the_file(digits_dir: Path, serve, ranges: bool) -> None:
    faults, base = serve(digits_dir, ranges)
    name, data = SHARDS[0], (digits_dir / SHARDS[0]).read_bytes()
    faults.plan(name, "drop", "stall", "503", "drop")
    counts: Counter[str] = Counter()
    with open_shard(f"{base}/{name}", POLICY, counts) as f:
        assert f.read() == data  # whole, nothing twice, nothing lost
    assert counts == Counter({"shard_retry:dropped": 2, "shard_retry:stalled": 1, "shard_retry:http_503": 1})
    starts = [s for _, s in faults.requests]
    if ranges:  # each drop or stall delivered half of what was asked; the next request went on from there
        n = len(data)
        second = n // 2
        third = second + (n - second) // 2
        assert starts == [0, second, third, third, third + (n - third) // 2]
    else:  # read again from the start, the bytes already delivered dropped
        assert starts == [0] * 5


@pytest.mark.parametrize("ranges", [True, False], ids=["range_requests", "no_ranges"])
def test_a_read_cut_short_for_good_delivers_every_byte_before_the_cut_then_fails(digits_dir: Path, serve,
                                                                               ranges: bool) -> None:
    faults, base = serve(digits_dir, ranges)
    faults.cut[SHARDS[0]] = 300_000
    counts: Counter[str] = Counter()
    got = bytearray()
    with pytest.raises(ShardReadError, match="dropped after 4 retries"), open_shard(f"{base}/{SHARDS[0]}", POLICY,
                                                                                     counts) as f:
        while chunk := f.read(10240):
            got += chunk
    assert got == (digits_dir / SHARDS[0]).read_bytes()[:300_000]
    assert counts == Counter({"shard_retry:dropped": 4}) and len(faults.requests) == 5


def test_dropped_stalled_and_503_shards_give_every_sample_once(digits_dir: Path, serve, quick) -> None:
    faults, base = serve(digits_dir)
    faults.plan(SHARDS[0], "drop", "drop")
    faults.plan(SHARDS[1], "stall")
    faults.plan(SHARDS[2], "503")
    faults.plan(SHARDS[3], "drop", "stall", "503")
    samples, skipped, _ = read(remote_cfg(base))
    assert samples == [s for n in SHARDS for s in written(digits_dir, n)]  # none lost, none twice, in order
    assert skipped == Counter({"shard_retry:dropped": 3, "shard_retry:stalled": 2, "shard_retry:http_503": 2})


def test_shards_cut_short_for_good_keep_their_earlier_samples(digits_dir: Path, serve, quick) -> None:
    faults, base = serve(digits_dir)
    faults.cut[SHARDS[1]] = cut_inside_sample(digits_dir, SHARDS[1], 40)  # announced whole, always ends here
    faults.truncated[SHARDS[3]] = cut_inside_sample(digits_dir, SHARDS[3], 70)  # the file itself is short
    samples, skipped, loader = read(remote_cfg(base, retries=2))
    assert loader.stream.shard_samples == {f"{base}/{n}": s for n, s in zip(SHARDS, SIZES)}  # remote manifest
    cut = {1: 40, 3: 70}
    assert samples == [s for i, n in enumerate(SHARDS) for s in written(digits_dir, n)[:cut.get(i)]]
    assert skipped == Counter({"shard_retry:dropped": 2, "bad_shard": 2, "bad_shard_samples": 256 - 40 + 256 - 70})
    assert [s for n, s in faults.requests if n == SHARDS[3]] == [0]  # a whole (short) file: no retry


def test_missing_shards_refused_connections_and_the_deadline_end_a_shard(digits_dir: Path, tmp_path: Path,
                                                                          serve, quick) -> None:
    for name in SHARDS[:2]:  # a folder without manifest.json: the loader does without
        (tmp_path / name).write_bytes((digits_dir / name).read_bytes())
    faults, base = serve(tmp_path)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    faults.plan(SHARDS[1], *["stall"] * 20)
    cfg = cfg_for(f"{base}/{SHARDS[0]}::{base}/gone.tar::{closed}/{SHARDS[0]}::{base}/{SHARDS[1]}",
                  timeout_s=0.3, retries=10, shard_deadline_s=1.5)
    t = time.monotonic()
    samples, skipped, loader = read(cfg)
    took = time.monotonic() - t
    assert samples[:256] == written(digits_dir, SHARDS[0]) and not loader.stream.shard_samples
    late = samples[256:]  # the stalled shard's samples read before its deadline are kept
    assert len(late) < 256 and late == written(digits_dir, SHARDS[1])[:len(late)]
    stalls = skipped.pop("shard_retry:stalled")  # 0.3 s each until the 1.5 s deadline: 4 retries
    assert 2 <= stalls <= 5 and took < 10  # far fewer than the 10 retries allowed
    # the 404 is not retried; the refused connection is, as often as data.retries says
    assert skipped == Counter({"shard_retry:dropped": 10, "bad_shard": 3})
    assert [n for n, _ in faults.requests].count("gone.tar") == 1


def test_http_shards_in_training_with_two_workers_every_sample_once_per_epoch(digits_dir: Path, serve,
                                                                             quick) -> None:
    faults, base = serve(digits_dir)
    faults.plan(SHARDS[1], "drop")
    faults.plan(SHARDS[4], "503")  # read sample by sample by both workers: the first request fails
    loader = make_loader(cfg_for(f"{base}/train-{{000000..000004}}.tar", batch_size=1, num_workers=2,
                                 timeout_s=TIMEOUT))
    assert loader.num_workers == 2 and loader.stream.epoch_samples == sum(SIZES)  # from the remote manifest
    all_keys = sorted(k for n in SHARDS for k, _ in written(digits_dir, n))
    orders = []
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            keys = [k for b in loader for k in b["key"]]
            assert sorted(keys) == all_keys
            orders.append(keys)
    finally:
        loader.close()
    assert orders[0] != orders[1]  # shuffled anew each epoch
    assert loader.skipped == Counter({"shard_retry:dropped": 1, "shard_retry:http_503": 1})


def test_object_store_urls_go_through_fsspec(digits_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    fs.pipe("/mmcl-test/val-000000.tar", (digits_dir / "val-000000.tar").read_bytes())
    try:
        samples, skipped, _ = read(cfg_for("memory://mmcl-test/val-000000.tar"))
        assert samples == written(digits_dir, "val-000000.tar") and not skipped
    finally:
        fs.rm("/mmcl-test", recursive=True)
    if importlib.util.find_spec("s3fs") is None:
        with pytest.raises(DataError, match=r"s3:// shards: fsspec cannot read them .*pip install s3fs"):
            check_backends(["s3://bucket/train-000000.tar"])
    monkeypatch.setitem(sys.modules, "fsspec", None)  # as if it were not installed
    with pytest.raises(DataError, match=r"gs:// shards are read through fsspec, which is not installed: "
                                        r"pip install fsspec gcsfs"):
        make_loader(cfg_for("gs://bucket/train-{000000..000004}.tar"))


def test_the_read_policy_follows_the_data_config() -> None:
    cfg = cfg_for("x.tar", retries=5, timeout_s=2.5, shard_deadline_s=None)
    assert cfg.read_policy() == ReadPolicy(retries=5, timeout_s=2.5, deadline_s=None)
    assert DataConfig(train_shards="x").read_policy() == ReadPolicy()
