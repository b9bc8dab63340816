"""Build a batch loader from a recipe's ``data`` section: the one entry point to ``mmcl.data``."""

from __future__ import annotations

import functools
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from accelerate.utils import send_to_device
from torch.utils.data import DataLoader

from mmcl.config import spec
from mmcl.data.device_decode import DEVICE_TRANSFORMS, ClipCrop, DeviceDecoder
from mmcl.data.remote import ReadPolicy, check_backends
from mmcl.data.samples import IMAGE_KEYS, MISSING_CAPTION, MISSING_IMAGE, collate, image_text_sample, multi_view_sample
from mmcl.data.shards import count_samples, entries_per_shard, expand_shards
from mmcl.data.stream import ShardStream, WorkerPositions
from mmcl.data.transforms import OPENAI_MEAN, OPENAI_STD, Normalize, build_transform
from mmcl.decode import MAX_PIXELS
from mmcl.dist import world
from mmcl.errors import ConfigError, DataError


def to_device(batch: Any, device: torch.device | str) -> Any:
    """Move tensors to ``device``, without waiting (pinned memory): Accelerate's ``send_to_device``,
    which also reaches into tuples, any mapping, and objects with a ``.to`` (a transformers
    ``BatchEncoding`` from a plugin's tokenizer, which is not a ``dict``)."""
    return send_to_device(batch, device, non_blocking=True)


@dataclass
class MultiCropConfig:
    """``data.multi_crop``: the ``views`` global crops at ``image_size`` plus ``local_crops`` smaller
    crops at ``local_size`` (SwAV, DINO). The scales are the random-resized-crop area ranges."""

    local_crops: int = spec(6, ge=0)
    local_size: int = spec(96, ge=8)
    global_scale: list[float] = field(default_factory=lambda: [0.4, 1.0])
    local_scale: list[float] = field(default_factory=lambda: [0.05, 0.4])
    local_transform: str | None = spec(None, help="default: data.transform")


@dataclass
class DataConfig:
    """Where batches come from and how samples become tensors."""

    train_shards: str = spec(help="brace pattern(s) of training shards, '::'-separated")
    kind: Literal["image_text", "multi_view"] = "image_text"
    image_size: int = spec(224, ge=8)
    batch_size: int = spec(256, ge=1, help="per process")
    num_workers: int = spec(2, ge=0)
    shuffle_buffer: int = spec(2000, ge=0)
    shuffle_initial: int | None = spec(None, ge=1, help="samples in each worker's shuffle buffer before it gives out "
                                                        "the first, growing to shuffle_buffer after (webdataset's "
                                                        "initial; open_clip: 1000 of 5000): the first batch waits "
                                                        "for fewer samples read. null, or shuffle_buffer or more: "
                                                        "the buffer fills first")
    resample: bool = False
    epoch_samples: int | None = spec(None, ge=1, help="default: from manifest.json")
    transform: str = "clip"
    transform_args: dict[str, Any] = field(default_factory=dict)
    views: int = spec(2, ge=1, help="multi_view: number of augmented views")
    view_fields: list[str] = spec(default_factory=list,
                                  help="multi_view: one view per image field instead (e.g. [png, depth.png])")
    colour: Literal["rgb", "lab", "ycbcr"] = spec("rgb", help="colour space the model sees (CMC's splits)")
    view_transforms: list[str] = spec(default_factory=list,
                                      help="multi_view: one transform per view (default: transform for each); "
                                           "image_text: extra augmented views of each training image, batch['views'] "
                                           "(SLIP: a self-supervised objective on the image tower beside CLIP's)")
    multi_crop: MultiCropConfig | None = None
    mean: list[float] = field(default_factory=lambda: list(OPENAI_MEAN))
    std: list[float] = field(default_factory=lambda: list(OPENAI_STD))
    image_keys: list[str] = field(default_factory=lambda: list(IMAGE_KEYS))
    text_key: str = "txt"
    max_pixels: int = spec(MAX_PIXELS, ge=1, help="larger images are skipped (too_large), as mmcl-prep --max-pixels")
    decode: Literal["workers", "device"] = spec(
        "workers", help="where training JPEGs are decoded and cropped: in the loader's workers, or together on the "
                        "device (nvJPEG on a GPU) when the workers cannot keep up; image_text with transform clip "
                        "only; other images are decoded in the workers either way (docs/data.md)")
    normalize: Literal["device", "workers"] = spec(
        "device", help="where uint8 images become normalised floats: on the device, batch by batch (a quarter of "
                       "the bytes to pin and copy, and no float work in the workers), or in the loader's workers")
    retries: int = spec(3, ge=0, help="remote shards: times one shard is asked for again after a dropped connection, "
                                      "a stall or HTTP 5xx/429 (counted shard_retry:<cause>) before it is skipped")
    timeout_s: float = spec(60.0, gt=0, help="remote shards: seconds without a byte before a connect or read "
                                             "counts as stalled")
    shard_deadline_s: float | None = spec(3600.0, gt=0, help="remote shards: seconds one shard may spend waiting "
                                                             "for the network, retries included (null: no limit)")

    def validate(self) -> None:
        """Multi-crop views are crops of one image field; the device decodes only what it can also crop."""
        if self.multi_crop and self.view_fields:
            raise ConfigError("data.multi_crop and data.view_fields cannot be combined")
        if self.decode == "device":
            if self.kind != "image_text" or self.view_transforms:
                raise ConfigError("data.decode: device decodes the images of image-text pairs (data.kind image_text "
                                  "without data.view_transforms): augmented views are made from Pillow images in "
                                  "the workers; set data.decode: workers")
            if self.transform not in DEVICE_TRANSFORMS:
                raise ConfigError(f"data.decode: device crops as transform {' or '.join(DEVICE_TRANSFORMS)} does, but "
                                  f"data.transform is {self.transform}, whose augmentations run in the workers; set "
                                  f"data.decode: workers")
            if self.normalize != "device":
                raise ConfigError("data.decode: device makes the images on the device, so they are normalised there: "
                                  "set data.normalize: device")

    def read_policy(self) -> ReadPolicy:
        """The time-outs and retries remote shards are read with."""
        return ReadPolicy(retries=self.retries, timeout_s=self.timeout_s, deadline_s=self.shard_deadline_s)

    def preprocess(self) -> dict[str, Any]:
        """Image size and normalisation as saved with a model (and read back by evaluation)."""
        pre = {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std), "colour": self.colour}
        return {**pre, "view_fields": list(self.view_fields)} if self.view_fields else pre


class Loader:
    """Iterate batches epoch after epoch; keeps the counts of skipped samples by reason, and where
    each worker's stream stands in the epoch (:meth:`position`)."""

    def __init__(self, stream: ShardStream, num_workers: int, pin_memory: bool = False,
                 normalize: Normalize | None = None, decoder: DeviceDecoder | None = None):
        self.stream, self.num_workers, self.pin_memory = stream, num_workers, pin_memory
        self.normalize = normalize  # None: the workers normalise
        self.decoder = decoder  # data.decode: device
        self.skipped: Counter[str] = Counter()
        self._at: dict[int, tuple[int, int]] = {}  # worker -> (samples given out, batches) at the last batch yielded
        self._last = -1  # the worker of the last batch yielded
        self._loader: DataLoader | None = None

    @property
    def epoch(self) -> int:
        """The current epoch (set with :meth:`set_epoch`)."""
        return self.stream.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: reshuffles shards, the buffer and augmentations."""
        self.stream.set_epoch(epoch)
        at = self.stream.resume_from
        if at is not None and at.epoch == epoch:
            self._at, self._last = {w: (p, b) for w, (p, b) in enumerate(zip(at.pulled, at.batches))}, at.last
        else:
            self._at, self._last = {}, -1

    def position(self) -> WorkerPositions:
        """Where each worker's stream stands in the current epoch after the last batch this loader
        yielded: what a checkpoint keeps, for an exact resume (:meth:`resume_at`) or an elastic one
        (:meth:`ShardStream.trained_samples`)."""
        k = range(self.stream.num_workers)
        return WorkerPositions(self.stream.epoch, self._last, tuple(self._at.get(w, (0, 0))[0] for w in k),
                               tuple(self._at.get(w, (0, 0))[1] for w in k))

    def resume_at(self, position: WorkerPositions) -> None:
        """Continue exactly from ``position`` (saved by this layout), reading past what was trained
        without decoding it (:meth:`ShardStream.resume_at`). Call before iterating."""
        self.stream.resume_at(position)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._loader is None:  # workers persist across epochs; the epoch reaches them through shared memory
            # The DataLoader draws its workers' base seed from this generator, not from the global torch
            # RNG: otherwise starting the loader at a resume point would shift every later random draw of
            # training (shuffle-BN permutations, dropout) and the resumed run would no longer be exact.
            self._loader = DataLoader(self.stream, batch_size=None, num_workers=self.num_workers,
                                      pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
                                      prefetch_factor=4 if self.num_workers else None,
                                      generator=torch.Generator().manual_seed(self.stream.seed),
                                      worker_init_fn=_ignore_sigterm)
        batches = iter(self._loader)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except (EOFError, ConnectionError) as e:
                # a worker killed while it sent a batch breaks the pipe before torch sees it dead: reported
                # as torch reports a worker's death, so the trainer says what happened
                raise RuntimeError(f"DataLoader worker exited unexpectedly while sending a batch "
                                   f"({type(e).__name__})") from e
            self.skipped.update(batch.pop("skipped", {}))
            if "cursor" in batch:
                worker, pulled, made = batch.pop("cursor")
                self._at[worker], self._last = (pulled, made), worker
            if not batch.pop("empty", False):
                yield batch

    def prepare(self, batch: dict[str, Any], device: torch.device | str,
                memory_format: torch.memory_format = torch.contiguous_format) -> dict[str, Any] | None:
        """A batch as the model takes it: tensors moved to ``device`` (asynchronously from pinned
        memory), then, with ``data.normalize: device``, the ``uint8`` images (``image``, each of
        ``views``) normalised there, in ``memory_format`` (``torch.channels_last`` for a model
        converted to it). Every consumer of the loader's batches calls this. With ``data.decode:
        device``, the batch's JPEGs are decoded and cropped there first (:class:`DeviceDecoder`); None
        when one of them cannot be decoded at all (the batch is skipped, counted in :attr:`skipped`)."""
        jpegs = batch.pop("jpeg", None)  # decode_jpeg reads the bytes from host memory, on any device
        batch = to_device(batch, device)
        if jpegs is not None:
            batch["image"], skipped = self.decoder(jpegs, batch.get("image"), device)
            if skipped:  # a JPEG nothing can decode: the batch is dropped, counted
                self.skipped.update(skipped)
                return None
        finish = self.normalize or (lambda x: x)
        if "image" in batch:
            batch["image"] = finish(batch["image"]).contiguous(memory_format=memory_format)
        if "views" in batch:
            batch["views"] = [finish(v).contiguous(memory_format=memory_format) for v in batch["views"]]
        return batch

    def close(self) -> None:
        """Stop the worker processes (they persist across epochs). After a worker died, this also
        unregisters it from torch's SIGCHLD check, which would otherwise raise again later."""
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)  # torch has no public way to stop workers
            if iterator is not None:
                if getattr(iterator, "_worker_pids_set", False):  # first out of the SIGCHLD check: a worker
                    from torch.utils.data._utils.signal_handling import _remove_worker_pids  # exiting now

                    _remove_worker_pids(id(iterator))  # must not raise while the others are stopped
                    iterator._worker_pids_set = False
                iterator._shutdown_workers()
                for worker in getattr(iterator, "_workers", []):  # one stuck in a read outlived torch's SIGTERM,
                    if worker.is_alive():  # which workers let pass (_ignore_sigterm)
                        worker.kill()
                        worker.join(timeout=10)
            self._loader = None

    def forever(self, start_epoch: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
        """Yield ``(epoch, batch)`` over successive epochs; an epoch with no batch is an error."""
        epoch = start_epoch
        while True:
            self.set_epoch(epoch)
            n = 0
            for batch in self:
                n += 1
                yield epoch, batch
            if n == 0:
                raise DataError(f"epoch {epoch} produced no batch on rank {self.stream.rank}: too few valid "
                                f"samples for batch size {self.stream.batch_size}"
                                + (f" (skipped: {dict(self.skipped)})" if self.skipped else ""))
            epoch += 1


def _ignore_sigterm(worker_id: int) -> None:  # noqa: ARG001
    """Loader workers outlive a SIGTERM: a scheduler (Slurm, torchrun's agent) sends it to every process
    of a job, and the main process, which stops at the next step and writes a checkpoint, needs its
    workers until then; it stops them itself (:meth:`Loader.close`), and they exit when it dies. A
    handler that does nothing rather than ``SIG_IGN``, which programs a worker starts (``pipe:``
    shard commands) would inherit."""
    signal.signal(signal.SIGTERM, _do_nothing)


def _do_nothing(signum: int, frame: Any) -> None:  # noqa: ARG001
    """A signal handler that ignores the signal in this process only (not across exec)."""


def view_transforms(cfg: DataConfig, train: bool) -> list[Callable[[Any], torch.Tensor]]:
    """One transform per view: the augmentations (global then local crops with ``multi_crop``) for
    training; for evaluation the eval transform once per image field."""
    size, mean, std, norm = cfg.image_size, tuple(cfg.mean), tuple(cfg.std), cfg.normalize == "workers"
    n_views = len(cfg.view_fields) or (cfg.views if train else 1)
    names = (cfg.view_transforms or [cfg.transform] * n_views) if train else ["eval"] * n_views
    if len(names) != n_views:
        raise ConfigError(f"data.view_transforms names {len(names)} transforms for {n_views} views")
    if not train:
        return [build_transform(n, size, mean, std, cfg.colour, normalize=norm) for n in names]
    mc = cfg.multi_crop
    glob = {**cfg.transform_args, **({"crop_scale": tuple(mc.global_scale)} if mc else {})}
    tfs = [build_transform(n, size, mean, std, cfg.colour, normalize=norm, **glob) for n in names]
    if mc:
        local = build_transform(mc.local_transform or cfg.transform, mc.local_size, mean, std, cfg.colour,
                                normalize=norm, **{**cfg.transform_args, "crop_scale": tuple(mc.local_scale)})
        tfs += [local] * mc.local_crops
    return tfs


def _workers_for(n_shards: int, world_size: int, wanted: int, resample: bool) -> int:
    """Fewer workers than shards per rank leaves workers idle: use at most that many."""
    if resample:
        return wanted
    return max(0, min(wanted, n_shards // max(1, world_size)))


def make_loader(cfg: DataConfig, shards: str | None = None, *, train: bool = True,
                tokenizer: Callable[[list[str]], Any] | None = None, batch_size: int | None = None,
                seed: int = 0, rank: int | None = None, world_size: int | None = None,
                num_workers: int | None = None) -> Loader:
    """A :class:`Loader` for ``cfg`` (``shards`` overrides ``cfg.train_shards``).

    ``train=True`` shuffles, augments, drops partial batches and needs at least one shard
    per process; ``train=False`` reads every sample exactly once, in order, without augmentation.

    >>> import subprocess, sys, tempfile
    >>> data = tempfile.mkdtemp()   # mmcl-prep digits: 32 px image-caption shards of scikit-learn's digits
    >>> _ = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True,
    ...                    capture_output=True)
    >>> cfg = DataConfig(train_shards=f"{data}/train-{{000000..000004}}.tar", image_size=32, batch_size=16,
    ...                  num_workers=0)
    >>> loader = make_loader(cfg, tokenizer=lambda captions: captions)   # a model's tokenizer in practice
    >>> loader.set_epoch(0)                                              # the epoch seeds the shuffle
    >>> batch = next(iter(loader))
    >>> batch["image"].dtype, len(batch["text"]), batch["label"].shape   # uint8 images, normalised on the device:
    (torch.uint8, 16, torch.Size([16]))
    >>> loader.prepare(batch, "cpu")["image"].dtype
    torch.float32
    """
    urls = expand_shards(shards or cfg.train_shards)
    check_backends(urls)
    r, w = world(launcher=True)
    rank, world_size = (r if rank is None else rank), (w if world_size is None else world_size)
    if train and not cfg.resample and len(urls) < world_size:
        raise DataError(f"{len(urls)} shard(s) cannot feed {world_size} processes: write more, smaller shards "
                        "(mmcl-prep --shard-size) or set data.resample: true")
    wanted = cfg.num_workers if num_workers is None else num_workers
    workers = _workers_for(len(urls), world_size, wanted, cfg.resample and train)
    size, mean, std = cfg.image_size, tuple(cfg.mean), tuple(cfg.std)
    on_device_decode = train and cfg.decode == "device"  # evaluation loaders decode in their workers
    if cfg.kind == "image_text":
        name = cfg.transform if train else "eval"
        tf = build_transform(name, size, mean, std, cfg.colour, normalize=cfg.normalize == "workers",
                             **(cfg.transform_args if train else {}))
        views = [build_transform(n, size, mean, std, cfg.colour, normalize=cfg.normalize == "workers",
                                 **cfg.transform_args) for n in cfg.view_transforms] if train else []
        crop = ClipCrop(**cfg.transform_args) if on_device_decode else None
        sample_fn = image_text_sample(tf, cfg.image_keys, cfg.text_key, cfg.max_pixels, views, crop)
        required = {MISSING_IMAGE: tuple(cfg.image_keys), MISSING_CAPTION: (cfg.text_key,)}
    else:
        tfs = view_transforms(cfg, train)
        fields = [(f,) for f in cfg.view_fields] or [tuple(cfg.image_keys)]
        sample_fn = multi_view_sample(tfs, fields, cfg.max_pixels)
        required = ({f"{MISSING_IMAGE}:{f}": (f,) for f in cfg.view_fields} if cfg.view_fields
                    else {MISSING_IMAGE: tuple(cfg.image_keys)})
    policy = cfg.read_policy()
    epoch_samples = cfg.epoch_samples or count_samples(urls, policy=policy)
    entries = entries_per_shard(urls, policy)  # the manifests read (or fetched) once for both
    stream = ShardStream(
        urls, sample_fn, functools.partial(collate, tokenizer=tokenizer),
        batch_size=batch_size or cfg.batch_size, shuffle_buffer=cfg.shuffle_buffer if train else 0,
        shuffle_initial=cfg.shuffle_initial,
        shuffle_shards=train, resample=cfg.resample and train, epoch_samples=epoch_samples,
        drop_last=train, seed=seed, required=required, shard_samples={u: e["samples"] for u, e in entries.items()},
        rank=rank, world_size=world_size, num_workers=workers, remote=policy,
        shard_bytes={u: e["bytes"] for u, e in entries.items() if "bytes" in e} if train else None)
    on_device = Normalize(mean, std, cfg.colour) if cfg.normalize == "device" else None
    decoder = DeviceDecoder(size, cfg.max_pixels) if on_device_decode else None
    return Loader(stream, workers, pin_memory=torch.cuda.is_available(), normalize=on_device, decoder=decoder)
