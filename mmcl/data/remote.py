"""Open a shard URL for reading, with retries, time-outs and resumed reads for remote ones.

- a local path, ``file://`` or a ``pipe:`` command: opened by webdataset's ``gopen`` (a command
  brings its own retries, e.g. ``curl --retry``);
- ``http://`` and ``https://``: read here with the standard library;
- any other scheme (``s3://``, ``gs://``, ``hf://``, ...): through fsspec and its back-end for
  that scheme (``s3fs``, ``gcsfs``, ...), when installed.

A remote read that fails for a reason that may pass (a dropped or refused connection, a read that
waits ``timeout_s`` for a byte, HTTP 5xx or 429, a body shorter than its ``Content-Length``) is
retried after a wait that doubles each time, and continues where it stopped: an HTTP ``Range``
request, or, from a server that ignores ranges, the whole file again with the bytes already
delivered dropped. The caller sees one whole byte stream, so no sample is read twice. Each retry is
counted as ``shard_retry:<cause>`` (``dropped``, ``stalled``, ``http_503``, ...); when the retries
are spent, when the time spent waiting for one shard passes ``deadline_s``, or on a fault that a
retry cannot mend (HTTP 404, a file that changed between two requests), :class:`ShardReadError`.
"""

from __future__ import annotations

import http.client
import io
import random
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.error import HTTPError, URLError
from urllib.parse import urljoin, urlparse

import webdataset as wds

from mmcl.errors import DataError

RETRY = "shard_retry"  # counted as f"{RETRY}:{cause}", once per retry
DROPPED, STALLED = "dropped", "stalled"
HTTP_SCHEMES = ("http", "https")
LOCAL_SCHEMES = ("", "file")
# packages behind fsspec's best-known schemes, for the message when fsspec itself is missing
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
            "hf": "huggingface_hub"}


@dataclass(frozen=True)
class ReadPolicy:
    """How long to wait for a remote shard and how often to ask again (``data.retries``,
    ``data.timeout_s``, ``data.shard_deadline_s``).

    ``timeout_s`` bounds every connect and read (no byte for that long: ``stalled``);
    ``deadline_s`` bounds the time one shard spends waiting for the network and between retries
    (a read may pass it by up to ``timeout_s``; the time the consumer holds the stream does not
    count); ``None``: no limit. The n-th retry waits ``backoff_s * 2 ** n``, at most
    ``max_backoff_s``, times a jitter in [0.5, 1) drawn from a generator seeded by the URL (or a
    server's ``Retry-After``, if longer).
    """

    retries: int = 3
    timeout_s: float = 60.0
    deadline_s: float | None = 3600.0
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0


class ShardReadError(Exception):
    """A remote shard could not be read to its end: retries spent, deadline passed or a lasting fault."""


class _CutShort(ConnectionError):
    """The body ended before the length the server announced (a dropped connection)."""


class _Changed(Exception):
    """The file behind a URL changed between two requests: the bytes would not join up."""


def scheme(url: str) -> str:
    """The URL's scheme, lower case: ``pipe`` for commands, ``""`` for a local path."""
    if url.startswith("pipe:"):
        return "pipe"
    return urlparse(url).scheme.lower() if "://" in url else ""


def open_shard(url: str, policy: ReadPolicy | None = None, counts: Counter[str] | None = None) -> IO[bytes]:
    """A binary stream of the shard at ``url``; remote reads retry as ``policy`` says and count each
    retry in ``counts`` as ``shard_retry:<cause>``. Close it when done (it is a context manager)."""
    kind = scheme(url)
    if kind in LOCAL_SCHEMES or kind == "pipe":
        return wds.gopen(url)
    opener = _http_opener(url) if kind in HTTP_SCHEMES else _fsspec_opener(url)
    # unbuffered: a buffer would lose the bytes it holds when the read fails for good, and with
    # them whole samples read before the fault
    return _Resumable(url, opener, policy or ReadPolicy(), counts)


def read_small(url: str, policy: ReadPolicy | None = None) -> bytes | None:
    """The whole file at ``url`` (a manifest), or None when it cannot be read: best effort."""
    try:
        with open_shard(url, policy) as f:
            return f.read()
    except Exception:  # missing (404), unreachable, no back-end: the caller goes without
        return None


def beside(url: str, name: str) -> str:
    """The URL of the file ``name`` in the same folder as the shard at ``url``."""
    return urljoin(url, name)


def check_backends(urls: list[str]) -> None:
    """Fail now, with the package to install, when a shard's scheme needs an fsspec back-end that is
    missing; each shard would otherwise be skipped as unreadable."""
    kinds = {scheme(u) for u in urls} - {*LOCAL_SCHEMES, "pipe", *HTTP_SCHEMES}
    for kind in sorted(kinds):
        try:
            import fsspec
        except ImportError:
            install = f"pip install fsspec {BACKENDS[kind]}" if kind in BACKENDS else \
                f"pip install fsspec, and a back-end for {kind}://"
            raise DataError(f"{kind}:// shards are read through fsspec, which is not installed: {install}") from None
        try:
            fsspec.get_filesystem_class(kind)
        except (ImportError, ValueError) as e:
            fix = f"pip install {BACKENDS[kind]}" if kind in BACKENDS else f"install an fsspec back-end for {kind}://"
            raise DataError(f"{kind}:// shards: fsspec cannot read them ({e}); {fix}, or give the shards as "
                            "http(s):// URLs or a pipe: command") from None


# --------------------------------------------------------------------------------------- openers
# An opener starts a read at byte ``pos``: (stream, first byte it delivers, size or None, version).
Opened = tuple[Any, int, int | None, str | None]


def _http_opener(url: str) -> Callable[[int, float], Opened]:
    def open_at(pos: int, timeout: float) -> Opened:
        headers = {"User-Agent": "mmcl", "Accept-Encoding": "identity"}
        if pos:
            headers["Range"] = f"bytes={pos}-"
        try:
            resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
        except HTTPError as e:
            e.close()
            if e.code == 416 and pos:  # nothing left after pos: the size is checked by the caller
                return io.BytesIO(), pos, _range_total(e.headers.get("Content-Range")), None
            raise
        version = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if resp.status == 206:
            start, total = _content_range(resp.headers.get("Content-Range"))
            return resp, start, total, version
        length = resp.headers.get("Content-Length")
        return resp, 0, int(length) if length and length.isdigit() else None, version

    return open_at


def _content_range(value: str | None) -> tuple[int, int | None]:
    """``bytes 100-199/1000`` -> (100, 1000); the total may be ``*`` (unknown)."""
    try:
        unit, _, rest = (value or "").partition(" ")
        span, _, total = rest.partition("/")
        if unit != "bytes":
            raise ValueError
        return int(span.partition("-")[0]), None if total == "*" else int(total)
    except ValueError:
        raise _Changed(f"a partial response with Content-Range {value!r}") from None


def _range_total(value: str | None) -> int | None:
    """The size in a 416 response's ``bytes */1000``, if any."""
    total = (value or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def _fsspec_opener(url: str) -> Callable[[int, float], Opened]:
    def open_at(pos: int, timeout: float) -> Opened:  # the back-end keeps its own time-outs
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
        f = fs.open(path, "rb")
        if pos:
            f.seek(pos)
        size = getattr(f, "size", None)
        return f, pos, size if isinstance(size, int) else None, None

    return open_at


# ---------------------------------------------------------------------------------------- reader
def _cause(e: BaseException) -> str | None:
    """The retry cause of a fault that may pass, or None for one a retry cannot mend."""
    if isinstance(e, HTTPError):
        return f"http_{e.code}" if e.code >= 500 or e.code == 429 else None
    if isinstance(e, URLError):  # a failed connect comes wrapped; a str reason is a bad URL
        if not isinstance(e.reason, BaseException):
            return None
        e = e.reason
    if isinstance(e, TimeoutError):
        return STALLED
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return None
    if isinstance(e, (OSError, http.client.HTTPException)):  # reset, refused, cut short, bad response
        return DROPPED
    return None


class _Resumable(io.RawIOBase):
    """The bytes of one remote file, read again from where they stopped after a fault."""

    def __init__(self, url: str, open_at: Callable[[int, float], Opened], policy: ReadPolicy,
                 counts: Counter[str] | None):
        super().__init__()
        self.url, self.open_at, self.policy, self.counts = url, open_at, policy, counts
        self.rng = random.Random(zlib.crc32(url.encode()))
        self.pos = 0  # bytes delivered
        self.size: int | None = None
        self.version: str | None = None
        self.retries = 0
        self.waited = 0.0  # seconds spent waiting for this file: connects, reads, backoff
        self.stream: Any = None

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while True:
            t = time.monotonic()
            try:
                if self.stream is None:
                    self._start()
                data = (getattr(self.stream, "read1", None) or self.stream.read)(len(buf))
                if not data and self.size is not None and self.pos < self.size:
                    raise _CutShort(f"the body ended at byte {self.pos} of {self.size}")
            except Exception as e:
                self.waited += time.monotonic() - t
                self._retry_or_raise(e)
                continue
            self.waited += time.monotonic() - t
            self._check_deadline()
            n = len(data)
            buf[:n] = data
            self.pos += n
            return n

    def _start(self) -> None:
        """Open a read at ``pos``: drop what a server that ignores ranges sends again."""
        stream, start, size, version = self.open_at(self.pos, self.policy.timeout_s)
        self.stream = stream
        if self.version and version and version != self.version:
            raise _Changed(f"the file changed between two requests ({self.version} -> {version})")
        if self.size is not None and size is not None and size != self.size:
            raise _Changed(f"the file changed between two requests ({self.size} -> {size} bytes)")
        self.version, self.size = version or self.version, size if size is not None else self.size
        skip = self.pos - start
        if skip < 0:
            raise _Changed(f"asked for bytes from {self.pos}, the server sent them from {start}")
        while skip:
            dropped = stream.read(min(skip, 1 << 20))
            if not dropped:
                raise _CutShort(f"the body ended at byte {start} while skipping to {self.pos}")
            skip -= len(dropped)
            start += len(dropped)

    def _retry_or_raise(self, e: Exception) -> None:
        """Count a retry and wait before it, or raise :class:`ShardReadError` when none is left."""
        self._drop_stream()
        cause = _cause(e)
        if cause is None:
            raise ShardReadError(f"{self.url}: {e}") from e
        if self.retries >= self.policy.retries:
            raise ShardReadError(f"{self.url}: {cause} after {self.retries} retries ({e})") from e
        wait = min(self.policy.max_backoff_s, self.policy.backoff_s * 2 ** self.retries) * (0.5 + self.rng.random() / 2)
        after = getattr(e, "headers", None) and e.headers.get("Retry-After")
        if after and after.strip().isdigit():
            wait = max(wait, min(float(after), self.policy.max_backoff_s))
        self._check_deadline(wait, cause)
        self.retries += 1
        if self.counts is not None:
            self.counts[f"{RETRY}:{cause}"] += 1
        time.sleep(wait)
        self.waited += wait

    def _check_deadline(self, more: float = 0.0, cause: str = "slow") -> None:
        limit = self.policy.deadline_s
        if limit is not None and self.waited + more > limit:
            raise ShardReadError(f"{self.url}: {cause}, and {self.waited:.0f} s of the shard's {limit:g} s "
                                 "deadline are spent")

    def _drop_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.close()
            except Exception:  # a broken connection may fail to close; it is dropped either way
                pass
            self.stream = None

    def close(self) -> None:
        self._drop_stream()
        super().close()
