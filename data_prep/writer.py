"""Turn records into WebDataset tar shards plus a ``manifest.json`` that says what is in them.

Shards are written under a temporary name and renamed only when complete, so an interrupted
build never leaves a truncated shard that looks whole. Bad samples are skipped and counted by
reason; the manifest keeps the counts and the first few keys of each reason.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.images import MISSING_CAPTION, ImageOptions, image_from_array, load_image
from mmcl.files import write_atomic

MANIFEST = "manifest.json"
FIRST_KEYS = 5


@dataclass
class Record:
    """One sample before conversion: where its image(s) come from and its annotations.

    ``images`` maps a field name to a path, raw bytes, a uint8 array, or a picklable callable that
    returns one of those: it runs where the sample is converted (a worker process when
    ``workers`` > 1), so the pixels of a generated sample (``mmcl-prep photos``' crops) are made in
    parallel and never pickled. The field ``"image"`` is stored as ``{key}.png``; any other field
    ``f`` as ``{key}.f.png`` (multi-field samples, e.g. ``rgb`` and ``depth`` for multi-view methods).
    """

    sample_id: int
    images: dict[str, Any]
    caption: str | None = None
    label: int | None = None
    class_name: str | None = None
    source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The WebDataset key: the zero-padded stable sample id."""
        return f"{self.sample_id:09d}"


def convert(record: Record, opts: ImageOptions, require_caption: bool) -> tuple[str, dict[str, bytes] | str]:
    """Convert one record into tar members ``{extension: bytes}``, or return a skip reason."""
    caption = (record.caption or "").strip()
    if require_caption and not caption:
        return record.key, MISSING_CAPTION
    members: dict[str, bytes] = {}
    for name, src in record.images.items():
        if callable(src):
            src = src()
        if hasattr(src, "shape"):
            data, reason = image_from_array(src, opts), None
        else:
            data, reason = load_image(src, opts)
        if data is None:
            return record.key, reason or "unknown"
        members[opts.ext if name == "image" else f"{name}.{opts.ext}"] = data
    if caption:
        members["txt"] = caption.encode("utf-8")
    meta = {"id": record.sample_id, "label": record.label, "class_name": record.class_name,
            "source": record.source, **record.extra}
    members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return record.key, members


def _convert_star(args: tuple[Record, ImageOptions, bool]) -> tuple[str, dict[str, bytes] | str]:
    return convert(*args)


class ShardWriter:
    """Write samples into ``{prefix}-000000.tar``, ... with at most ``shard_size`` samples each
    (``name`` formats another naming from ``prefix`` and the shard's number ``n``: CLIP_benchmark's
    ``{n}.tar``)."""

    def __init__(self, out_dir: Path, prefix: str, shard_size: int, name: str = "{prefix}-{n:06d}.tar"):
        if shard_size < 1:
            raise ValueError(f"shard_size must be a positive integer, got {shard_size}")
        self.out_dir, self.prefix, self.shard_size, self.name = Path(out_dir), prefix, shard_size, name
        self.shards: list[dict[str, Any]] = []
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample, starting a new shard when the current one is full."""
        if self._tar is None or self._count >= self.shard_size:
            self._close_shard()
            self._open_shard()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1

    def _open_shard(self) -> None:
        name = self.name.format(prefix=self.prefix, n=len(self.shards))
        self._tmp = self.out_dir / f".{name}.tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"name": name, "samples": 0})
        self._count = 0

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._tmp is not None
        final = self.out_dir / self.shards[-1]["name"]
        os.replace(self._tmp, final)  # atomic: a shard either exists whole or not at all
        self.shards[-1]["samples"] = self._count
        self.shards[-1]["bytes"] = final.stat().st_size  # a resume skips a shard of this size unread
        self._tar = None

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard and return ``[{name, samples, bytes}, ...]``."""
        self._close_shard()
        return self.shards

    def abort(self) -> None:
        """Drop the shard being written (used on interruption)."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
            if self._tmp is not None and self._tmp.exists():
                self._tmp.unlink()


def _results(records: Iterable[Record], opts: ImageOptions, require_caption: bool,
             workers: int) -> Iterator[tuple[str, dict[str, bytes] | str]]:
    jobs = ((r, opts, require_caption) for r in records)
    if workers <= 1:
        yield from map(_convert_star, jobs)
        return
    with get_context("spawn" if os.name == "nt" else "fork").Pool(workers) as pool:
        yield from pool.imap(_convert_star, jobs, chunksize=32)


def build_split(out_dir: Path, split: str, records: Iterable[Record], *, opts: ImageOptions,
                shard_size: int, workers: int = 1, require_caption: bool = True,
                class_names: list[str] | None = None, total: int | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Write one split's shards and return its manifest entry."""
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out_dir, split, shard_size)
    skipped: dict[str, dict[str, Any]] = {}
    written = 0
    bar = tqdm(total=total, desc=f"{split}", unit="img", disable=not progress, leave=False)
    try:
        for key, result in _results(records, opts, require_caption, workers):
            bar.update(1)
            if isinstance(result, str):
                entry = skipped.setdefault(result, {"count": 0, "first_keys": []})
                entry["count"] += 1
                if len(entry["first_keys"]) < FIRST_KEYS:
                    entry["first_keys"].append(key)
                continue
            writer.write(key, result)
            written += 1
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    shards = writer.close()
    _remove_stale(out_dir, split, {s["name"] for s in shards})
    entry: dict[str, Any] = {
        "shards": shards,
        "pattern": _pattern(split, len(shards)),
        "total": written,
        "skipped": dict(sorted(skipped.items())),
    }
    if class_names is not None:
        entry["class_names"] = class_names
    return entry


def _pattern(split: str, n: int) -> str | None:
    return f"{split}-{{000000..{n - 1:06d}}}.tar" if n else None


def _remove_stale(out_dir: Path, split: str, keep: set[str]) -> None:
    """Remove shards of this split left by an earlier, larger build into the same folder."""
    for path in out_dir.glob(f"{glob.escape(split)}-[0-9][0-9][0-9][0-9][0-9][0-9].tar"):
        if path.name not in keep:
            path.unlink()


def write_manifest(out_dir: Path, splits: dict[str, dict[str, Any]], *, source: dict[str, Any],
                   opts: ImageOptions, class_names: list[str] | None) -> dict[str, Any]:
    """Write ``manifest.json`` (merged with splits already described there) atomically."""
    path = out_dir / MANIFEST
    manifest: dict[str, Any] = {"format": "mmcl-shards/1", "splits": {}}
    if path.exists():
        try:
            old = json.loads(path.read_text())
            manifest["splits"].update(old.get("splits", {}))
        except (OSError, json.JSONDecodeError):
            pass
    manifest["splits"].update(splits)
    manifest.update({
        "source": source,
        "image_format": opts.fmt,
        "max_side": opts.max_side,
        "class_names": class_names,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    write_json(path, manifest)
    return manifest


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON under a temporary name, then rename it into place (atomic:
    a reader sees the old file or the new one, never half of one)."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


def summary(manifest: dict[str, Any], splits: Iterable[str]) -> str:
    """A few human-readable lines: samples and shards per split, and what was skipped."""
    lines = []
    for name in splits:
        s = manifest["splits"][name]
        lines.append(f"{name}: {s['total']} samples in {len(s['shards'])} shard(s)")
        for reason, info in s["skipped"].items():
            lines.append(f"  skipped {info['count']}: {reason} (e.g. {', '.join(info['first_keys'])})")
    classes = manifest.get("class_names")
    if classes:
        lines.append(f"classes ({len(classes)}): {', '.join(classes[:12])}{' ...' if len(classes) > 12 else ''}")
    return "\n".join(lines)
