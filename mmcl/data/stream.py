"""A WebDataset stream of batches: shards split by rank and worker, shuffled, decoded, batched.

Every random choice (shard order, shuffle buffer, augmentations) comes from generators
seeded by ``(seed, epoch, rank, worker)`` or by the sample key, so a run is reproducible,
resumes exactly, and gives the same augmentation to a sample whatever the worker count.

Bad data never stops the stream: an unreadable or truncated shard, a bad sample (see
:mod:`mmcl.data.samples`) or a missing field is skipped and counted by a short stable reason;
each batch carries the counts of what was skipped since the previous batch under
``batch["skipped"]``, so the trainer can report them. Shard-level reasons:

- ``bad_shard``: a shard that cannot be opened or read to its end (truncated, not a tar; a
  remote one after its retries), or that holds fewer samples than ``manifest.json`` lists (a tar
  cut at a member boundary reads as a whole, shorter tar); once per shard. The samples read
  before the fault are kept.
- ``shard_retry:<cause>``: a remote shard asked for again after a fault that may pass, once per
  retry (see :mod:`mmcl.data.remote`): ``dropped`` (connection refused, reset or closed before
  the end), ``stalled`` (no byte for ``data.timeout_s``), ``http_503``, ``http_429``, ... The read
  continues where it stopped, so no sample is read twice; a shard read sample by sample by
  several workers counts each reader's retries.
- ``bad_shard_samples``: the samples such a shard lost: the manifest's count minus those read.
- ``duplicate_file``: a second file with the same name in one sample (the first is kept).
- the ``required`` reasons, e.g. ``missing_image``, ``missing_caption``: a missing field.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from mmcl.data.remote import ReadPolicy, open_shard
from mmcl.data.seek import ShuffleBuffer, final_shuffle, read_members, scan_tar, shuffle_state
from mmcl.data.shards import is_remote
from mmcl.dist import world
from mmcl.errors import DataError

BAD_SHARD, BAD_SHARD_SAMPLES, DUPLICATE_FILE = "bad_shard", "bad_shard_samples", "duplicate_file"

SampleFn = Callable[[dict[str, Any], int], "dict[str, Any] | str"]
CollateFn = Callable[[list[dict[str, Any]]], dict[str, Any]]


@dataclass(frozen=True)
class WorkerPositions:
    """Where each loader worker's stream of one process stood in ``epoch`` after the last batch
    trained: the samples it had given out (``pulled``, skipped ones included) and the batches it
    had made, by worker, and which worker made the last batch (``last``). Saved in checkpoints as
    one list of ints (:meth:`to_list`), after the epoch and the process's batch count."""

    epoch: int
    last: int
    pulled: tuple[int, ...]
    batches: tuple[int, ...]

    def to_list(self) -> list[int]:
        """``[last, pulled by worker 0, 1, ..., batches by worker 0, 1, ...]``."""
        return [self.last, *self.pulled, *self.batches]

    @classmethod
    def from_list(cls, epoch: int, values: list[int], num_workers: int) -> WorkerPositions:
        """Inverse of :meth:`to_list`."""
        if len(values) != 1 + 2 * num_workers:
            raise ValueError(f"a position of {num_workers} workers has {1 + 2 * num_workers} values, not {len(values)}")
        return cls(epoch, values[0], tuple(values[1:1 + num_workers]), tuple(values[1 + num_workers:]))


class Skip(Exception):
    """Raised by a sample function to skip a sample, with the reason as message."""


def sample_seed(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (same on every machine and Python)."""
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF


def sample_id(sample: dict[str, Any]) -> str:
    """A raw sample's name across runs: its shard's file name and its key (keys alone may repeat
    between shards)."""
    return f"{sample['__url__'].rsplit('/', 1)[-1]}/{sample['__key__']}"


class ShardStream(IterableDataset):
    """Iterable of batches (dicts) from WebDataset shards.

    Args:
        urls: expanded shard URLs (see :func:`mmcl.data.shards.expand_shards`).
        sample_fn: turns a raw sample ``{"__key__", "png", "txt", ...}`` into a processed dict,
            or raises :class:`Skip`; called with a per-sample seed for its augmentations.
        collate_fn: turns a list of processed samples into a batch dict.
        batch_size: samples per batch (per process).
        shuffle_buffer: size of the sample shuffle buffer (0: keep shard order).
        shuffle_initial: samples in the buffer before it gives out the first (None: ``shuffle_buffer``);
            it then grows to ``shuffle_buffer`` (:class:`mmcl.data.seek.ShuffleBuffer`).
        shuffle_shards: shuffle the shard order each epoch.
        resample: draw shards with replacement forever (epoch ends after ``epoch_samples``).
        epoch_samples: samples per epoch over all processes (needed with ``resample``).
        drop_last: drop a final partial batch (training: every rank gets equal batches).
        required: skip reason -> alternative raw fields every sample must have one of, e.g.
            ``{"missing_image": ("png", "jpg"), "missing_caption": ("txt",)}``; a missing one is a
            counted skip, but a stream whose first samples all lack it is a user error.
        shard_samples: URL -> samples in that shard (from ``manifest.json``), to count the
            samples a truncated shard lost.
        shard_bytes: URL -> the shard's size in bytes when its manifest entry was written: a local
            shard of that size is taken to hold ``shard_samples`` samples, so a resume can pass over
            it unread (see :meth:`_slot_samples_after`).
        remote: time-outs and retries for remote shards (default :class:`ReadPolicy`'s).
        rank, world_size: this process's place; default from :func:`mmcl.dist.world` (``launcher=True``).
    """

    def __init__(self, urls: list[str], sample_fn: SampleFn, collate_fn: CollateFn, *, batch_size: int,
                 shuffle_buffer: int = 0, shuffle_shards: bool = False, resample: bool = False,
                 epoch_samples: int | None = None, drop_last: bool = False, seed: int = 0,
                 required: dict[str, tuple[str, ...]] | None = None, shard_samples: dict[str, int] | None = None,
                 rank: int | None = None, world_size: int | None = None, num_workers: int = 0,
                 remote: ReadPolicy | None = None, shard_bytes: dict[str, int] | None = None,
                 shuffle_initial: int | None = None):
        super().__init__()
        if resample and not epoch_samples:
            raise DataError("resampling needs the epoch length: set data.epoch_samples or add a manifest.json")
        r, w = world(launcher=True)
        self.urls, self.sample_fn, self.collate_fn = list(urls), sample_fn, collate_fn
        self.batch_size, self.shuffle_buffer, self.shuffle_shards = batch_size, shuffle_buffer, shuffle_shards
        self.shuffle_initial = shuffle_initial
        self.resample, self.epoch_samples, self.drop_last, self.seed = resample, epoch_samples, drop_last, seed
        self.required = dict(required or {})
        self.shard_samples = dict(shard_samples or {})
        self.shard_bytes = dict(shard_bytes or {})
        self.remote = remote or ReadPolicy()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        self.num_workers = max(1, num_workers)
        # Shared with (persistent, forked) DataLoader workers, so set_epoch reaches them.
        self._epoch = multiprocessing.Value("i", 0)
        # epoch -> ids of samples trained before an elastic resume (see :meth:`exclude_trained`), and
        # where an exact resume starts (see :meth:`resume_at`); set before the workers start, which copy them
        self.exclude: dict[int, set[str]] = {}
        self.resume_from: WorkerPositions | None = None

    @property
    def epoch(self) -> int:
        """The current epoch."""
        return int(self._epoch.value)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch (reshuffles shards, buffer and augmentations), also in running workers."""
        self._epoch.value = epoch

    # ----------------------------------------------------------------------------- stages
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info else (0, 1)

    def _my_shards(self, slot: int, slots: int, epoch: int) -> Iterator[tuple[str, int, int]]:
        """``(url, every, offset)``: the shards that ``slot`` of ``slots`` (process x worker) reads in
        ``epoch``, keeping the samples whose index in the shard is ``offset`` modulo ``every``.

        Shards are dealt whole, one per slot (process x worker) in turn, as far as they go round;
        the remainder, fewer shards than slots, is shared sample by sample: every slot reads those
        and keeps every ``slots``-th sample. So each sample is read once per epoch and every process
        gets the same number of samples to within one per shared shard, whatever the shard count
        (dealing the remainder whole would give some processes a shard more per epoch, and their
        samples would be seen more often over a run)."""
        if self.resample:
            rng = random.Random(sample_seed(self.seed, epoch, "resample", slot))
            while True:
                yield rng.choice(self.urls), 1, 0
        urls = list(self.urls)
        if self.shuffle_shards:
            random.Random(sample_seed(self.seed, epoch, "shards")).shuffle(urls)
        whole = len(urls) // slots * slots
        for url in self._dealt(urls[:whole], slots)[slot]:
            yield url, 1, 0
        for url in urls[whole:]:
            yield url, slots, slot

    def _dealt(self, urls: list[str], slots: int) -> list[list[str]]:
        """``urls`` dealt whole to ``slots``: each shard, largest first (in the given order among equal
        sizes), to the slot with the fewest samples so far, when ``manifest.json`` gives every size;
        so shards of unequal sizes give shares within one shard of each other. Shards of one size (or
        of unknown sizes) go round in the given order."""
        sizes = self.shard_samples
        known = all(u in sizes for u in urls)
        load, out = [0] * slots, [[] for _ in range(slots)]
        for i, url in enumerate(sorted(urls, key=lambda u: -sizes[u]) if known else urls):
            s = min(range(slots), key=load.__getitem__) if known else i % slots
            load[s] += sizes[url] if known else 0
            out[s].append(url)
        return out

    def epoch_shares(self, num_workers: int) -> list[int] | None:
        """Samples each process reads in an epoch (from the manifest's sizes; None if unknown or
        resampled): what the run says when shards of unequal sizes leave the shares unequal."""
        if self.resample or not all(u in self.shard_samples for u in self.urls):
            return None
        slots = self.world_size * num_workers
        whole = len(self.urls) // slots * slots
        urls = sorted(self.urls)  # the shares do not depend on the epoch's order but for ties
        per_slot = [sum(self.shard_samples[u] for u in dealt) for dealt in self._dealt(urls[:whole], slots)]
        shared = sum(self.shard_samples[u] for u in urls[whole:]) / slots
        return [round(sum(per_slot[r * num_workers:(r + 1) * num_workers]) + shared * num_workers)
                for r in range(self.world_size)]

    def _read_shard(self, url: str, skipped: Counter[str], every: int = 1,
                    offset: int = 0) -> Iterator[dict[str, Any]]:
        """The raw samples of one shard, ``{"__key__", "__url__", ext: bytes, ...}``: those whose
        index is ``offset`` modulo ``every`` (a shard shared sample by sample, see :meth:`_my_shards`).

        A shard that cannot be opened or read to its end, or that has fewer samples than the
        manifest lists, counts one ``bad_shard`` plus the samples it lost (``bad_shard_samples``:
        the manifest's count minus those read); the samples read before the fault are kept. A
        shared shard's faults are counted by the slot with offset 0 only, so once.
        """
        failed = False

        def files() -> Iterator[dict[str, Any]]:
            nonlocal failed
            try:
                with open_shard(url, self.remote, skipped) as stream:
                    for f in wds.tariterators.tar_file_iterator(stream):
                        yield {**f, "__url__": url}
            except Exception:  # a truncated tar, not a tar, an unreachable URL, a failed pipe: all one fault
                failed = True

        def duplicate(exn: Exception) -> bool:
            if not offset:  # a shared shard: counted once, by the slot with offset 0
                skipped[DUPLICATE_FILE] += 1
            return True

        read = 0
        for sample in wds.tariterators.group_by_keys(files(), handler=duplicate):
            read += 1
            if (read - 1) % every == offset:
                yield sample
        if offset:
            return
        lost = self.shard_samples.get(url, read) - read
        if failed or lost > 0:
            skipped[BAD_SHARD] += 1
        if lost > 0:
            skipped[BAD_SHARD_SAMPLES] += lost

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random,
                  buf: list[dict[str, Any]] | None = None, taken: int = 0) -> Iterator[dict[str, Any]]:
        """``samples`` through the shuffle buffer (which may start filled, having taken in ``taken``
        samples: see :mod:`mmcl.data.seek`)."""
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        shuffler = ShuffleBuffer(self.shuffle_buffer, rng, buf, self.shuffle_initial, taken)
        for s in samples:
            yield from shuffler.push(s)
        yield from shuffler.drain()

    def _slot_samples(self, rank: int, worker: int, world_size: int, num_workers: int, epoch: int,
                      skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        """The raw samples one process's worker reads in ``epoch``, in the order its shuffle buffer
        gives them out, less those :attr:`exclude` lists for the epoch. A function of its arguments
        and the stream's seed only, so a checkpoint can replay another layout's order."""
        shards, rng = self._slot(rank, worker, world_size, num_workers, epoch)
        return self._shuffled(self._raw(shards, epoch, skipped), rng)

    def _slot(self, rank: int, worker: int, world_size: int, num_workers: int,
              epoch: int) -> tuple[Iterator[tuple[str, int, int]], random.Random]:
        """One process's worker's shards in ``epoch`` (:meth:`_my_shards`) and its shuffle buffer's
        generator, as it starts the epoch."""
        shards = self._my_shards(rank * num_workers + worker, world_size * num_workers, epoch)
        return shards, random.Random(sample_seed(self.seed, epoch, "buffer", rank, worker))

    def _raw(self, shards: Iterator[tuple[str, int, int]], epoch: int,
             skipped: Counter[str]) -> Iterator[dict[str, Any]]:
        """The samples of ``shards`` (from :meth:`_my_shards`) less those :attr:`exclude` lists for ``epoch``."""
        done = self.exclude.get(epoch)
        return (s for url, every, offset in shards for s in self._read_shard(url, skipped, every, offset)
                if not done or sample_id(s) not in done)

    def _slot_samples_after(self, rank: int, worker: int, world_size: int, num_workers: int, epoch: int,
                            skipped: Counter[str], given: int) -> Iterator[dict[str, Any]]:
        """What :meth:`_slot_samples` gives after its first ``given`` samples, without reading the
        shards those came from (see :mod:`mmcl.data.seek`): the shuffle buffer is rebuilt from the
        data of the samples still in it, read where they lie, and its generator set where it was.
        Local uncompressed shards are scanned for headers; from the first that is not, the stream is
        read on (not decoded). A position within the stream's final shuffle (the shards had run out)
        gives out what was left of the buffer, found the same way; with shards that cannot be
        scanned it is reached by replaying the whole stream."""
        shards, rng = self._slot(rank, worker, world_size, num_workers, epoch)
        buffered, taken = shuffle_state(given, self.shuffle_buffer, rng, self.shuffle_initial)
        wanted, found = set(buffered), {}
        done = self.exclude.get(epoch)
        number = 0  # samples of the stream before the current shard
        passed: list[tuple[str, int, int, range, list[dict[str, Any]] | None]] = []  # shards wholly before
        for url, every, offset in shards:
            count = self._listed_count(url, every, offset) if not done else None
            if count is not None and number + count <= taken and not any(number <= i < number + count
                                                                         for i in wanted):
                passed.append((url, every, offset, range(number, number + count), None))
                number += count  # read before the position, none of it in the buffer: passed over unread
                continue
            samples = self._scanned(url, every, offset, done)
            if samples is not None and number + len(samples) <= taken:  # wholly read before the position
                for i, s in enumerate(samples, number):
                    if i in wanted:
                        found[i] = read_members(url, s)
                passed.append((url, every, offset, range(number, number + len(samples)), samples))
                number += len(samples)
                continue
            # the position is in this shard, or it cannot be scanned: read on from its start
            raw = self._raw(itertools.chain([(url, every, offset)], shards), epoch, skipped)
            for i in range(number, taken):
                s = next(raw, None)
                if s is None:
                    break
                if i in wanted:
                    found[i] = s
            else:
                return self._shuffled(raw, rng, [found[i] for i in buffered], taken)
            break
        else:  # the shards ran out before the position: what is left is the buffer's final shuffle
            rest = final_shuffle(given, self.shuffle_buffer, number,
                                 self._slot(rank, worker, world_size, num_workers, epoch)[1], self.shuffle_initial)
            out = {}
            for url, every, offset, numbers, samples in passed:
                mine = [i for i in rest if i in numbers]
                if mine and samples is None:
                    samples = self._scanned(url, every, offset, done)
                if mine and (samples is None or len(samples) != len(numbers)):
                    break  # cannot be scanned, or not as its manifest entry says: replay
                out.update({i: read_members(url, samples[i - numbers.start]) for i in mine})
            if len(out) == len(rest):
                return iter([out[i] for i in rest])
        # shards that cannot be scanned, and the position in the final shuffle: replay the whole stream
        return itertools.islice(self._slot_samples(rank, worker, world_size, num_workers, epoch, skipped),
                                given, None)

    def _scanned(self, url: str, every: int, offset: int, done: set[str] | None) -> list[dict[str, Any]] | None:
        """The samples this slot reads from a local shard, as :func:`mmcl.data.seek.scan_tar` finds
        them (data left where it lies), less the excluded ones; None if it cannot be scanned."""
        files = None if is_remote(url) else scan_tar(url)
        if files is None:
            return None
        grouped = wds.tariterators.group_by_keys(files, handler=lambda exn: True)
        return [s for i, s in enumerate(grouped) if i % every == offset and (not done or sample_id(s) not in done)]

    def _listed_count(self, url: str, every: int, offset: int) -> int | None:
        """The samples of a local shard this slot reads (``offset`` modulo ``every``), as its manifest
        entry says, when the file is still the size the entry records; else None (scan or read it)."""
        n, size = self.shard_samples.get(url), self.shard_bytes.get(url)
        if n is None or size is None or is_remote(url):
            return None
        try:
            if os.path.getsize(url) != size:
                return None
        except OSError:
            return None
        return len(range(offset, n, every))

    def trained_samples(self, segment: dict[str, Any], from_epoch: int) -> dict[int, set[str]]:
        """Epoch -> ids of the samples a run laid out as ``segment`` took from its streams in the
        epochs from ``from_epoch`` on: ``segment`` has that run's ``processes`` and ``workers``, the
        ``start_epoch`` it began reading at, and each process's ``positions`` as checkpoints store
        them (``[epoch, batches, *WorkerPositions.to_list()]``: the samples each worker had given out
        up to its last batch trained). Earlier epochs of a process were read whole.

        Replays those streams (reading the shards' bytes, decoding nothing) under the current
        :attr:`exclude`, which must be what it was for that run, and in the order that run read them:
        ``segment["order"]`` (``run.seed``, ``data.shuffle_buffer``, ``data.shuffle_initial``) when
        it differs from this stream's."""
        out: dict[int, set[str]] = defaultdict(set)
        world_size, num_workers = segment["processes"], segment["workers"]
        now = (self.seed, self.shuffle_buffer, self.shuffle_initial)
        order = segment.get("order") or {}
        self.seed, self.shuffle_buffer, self.shuffle_initial = (
            order.get("run.seed", now[0]), order.get("data.shuffle_buffer", now[1]),
            order.get("data.shuffle_initial", now[2]))
        try:
            for rank, (epoch, _, *rest) in enumerate(segment["positions"]):
                pulled = WorkerPositions.from_list(epoch, rest, num_workers).pulled
                for e in range(max(from_epoch, segment["start_epoch"]), epoch + 1):
                    for worker in range(num_workers):
                        samples = self._slot_samples(rank, worker, world_size, num_workers, e, Counter())
                        taken = itertools.islice(samples, pulled[worker]) if e == epoch else samples
                        out[e].update(sample_id(s) for s in taken)
        finally:
            self.seed, self.shuffle_buffer, self.shuffle_initial = now
        return dict(out)

    def exclude_trained(self, segments: list[dict[str, Any]], from_epoch: int) -> int:
        """Leave out of the epochs from ``from_epoch`` on the samples that the runs ``segments``
        (oldest first, see :meth:`trained_samples`) trained on, each replayed under what its
        predecessors excluded; returns how many samples are left out. An elastic resume: the rest
        of an epoch interrupted on one layout is read on another without seeing a sample twice."""
        self.exclude = {}
        for segment in segments:
            for epoch, ids in self.trained_samples(segment, from_epoch).items():
                self.exclude.setdefault(epoch, set()).update(ids)
        return sum(len(ids) for ids in self.exclude.values())

    def resume_at(self, position: WorkerPositions) -> None:
        """Start ``position.epoch`` where a checkpoint of the same layout left it, exactly: each worker
        reads past the samples its stream had given out without decoding them (so the shuffle buffer
        and its generator are where they were), and the workers take turns from the one after the
        last to make a batch, as they would have. Call before the loader's workers start."""
        self.resume_from = position

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker, num_workers = self._worker()
        epoch = self.epoch
        skipped: Counter[str] = Counter()
        first_missing = 0  # samples lacking a required field before any sample had it
        limit = None
        if self.resample:
            slots = self.world_size * num_workers
            limit = -(-self.epoch_samples // (slots * self.batch_size))  # batches per worker
        batch: list[dict[str, Any]] = []
        produced = pulled = 0
        at = self.resume_from if self.resume_from is not None and self.resume_from.epoch == epoch else None
        if at is not None:  # the DataLoader starts its turns at worker 0: it serves the stream after the last
            worker = (worker + at.last + 1) % num_workers
            pulled, produced = at.pulled[worker], at.batches[worker]
        if pulled:  # where the checkpoint left it, the samples before neither read again nor decoded
            samples = self._slot_samples_after(self.rank, worker, self.world_size, num_workers, epoch, skipped,
                                               pulled)
        else:
            samples = self._slot_samples(self.rank, worker, self.world_size, num_workers, epoch, skipped)
        seen_required = pulled > 0
        if limit is not None and produced >= limit:
            return
        for sample in samples:
            pulled += 1  # the position a checkpoint keeps (a batch's "cursor"): samples given out so far
            missing = {reason: "/".join(g) for reason, g in self.required.items() if not any(f in sample for f in g)}
            if missing:
                skipped[next(iter(missing))] += 1
                if not seen_required:
                    first_missing += 1
                    if first_missing >= 16:
                        have = sorted(k for k in sample if not k.startswith("__"))
                        raise DataError(f"samples in {sample.get('__url__')} have fields {have} but the "
                                        f"recipe needs {list(missing.values())}; check the shards or the "
                                        "recipe's data keys")
                continue
            seen_required = True
            try:
                item = self.sample_fn(sample, sample_seed(self.seed, epoch, sample["__key__"]))
            except Skip as e:
                skipped[str(e)] += 1
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._collate(batch, skipped, (worker, pulled, produced + 1))
                batch, produced = [], produced + 1
                if limit is not None and produced >= limit:
                    return
        if batch and not self.drop_last:
            yield self._collate(batch, skipped, (worker, pulled, produced + 1))
        elif skipped:
            yield {"skipped": dict(skipped), "empty": True}

    def _collate(self, items: list[dict[str, Any]], skipped: Counter[str],
                 cursor: tuple[int, int, int]) -> dict[str, Any]:
        out = self.collate_fn(items)
        out["skipped"] = dict(skipped)
        out["cursor"] = cursor  # (worker, samples it has given out this epoch, batches it has made)
        skipped.clear()
        return out
