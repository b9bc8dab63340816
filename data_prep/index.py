"""``mmcl-prep index DIR``: mmcl's ``manifest.json`` for WebDataset shards that mmcl-prep did not write.

img2dataset's output (``00000.tar``, ... holding ``{key}.jpg``, ``.txt``, ``.json``), or any folder
of WebDataset tar shards, trains as it is; what it lacks is the manifest that gives mmcl its sample
counts: the epoch length (``data.resample`` needs it), the detection of a shard that lost samples,
the ``N samples`` of a model card. Every ``*.tar`` in the folder is read header by header (member
data is skipped, not read, so large shards index at the speed of seeks) and its samples are
counted as the loader groups them: consecutive members sharing a key (the name up to the first dot
of its base name), with webdataset's ``__meta__`` names and names without an extension left out.

A shard cut short (a member whose data runs past the end of the file, a header cut in two or
corrupt, no end-of-archive blocks because its writer stopped) counts its samples as far as they can
be read, as the loader reads them; the fault is printed and recorded under the split's ``faults``.

img2dataset writes a ``{shard}_stats.json`` beside each shard it finished; when there are any, their
totals are summed into the split's ``img2dataset`` entry: URLs tried (``count``), ``successes``,
``failed_to_download``, ``failed_to_resize`` and the failures by reason (its ``status_dict``, e.g.
``HTTP Error 404: Not Found``), and a shard without stats (img2dataset had not finished it) or whose
sample count differs from its stats' successes is a fault too.
"""

from __future__ import annotations

import json
import re
import sys
import tarfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.writer import MANIFEST, write_json
from mmcl.errors import DataError
from mmcl.tarfiles import IMAGE_KEYS, sample_key

MADE_BY = "mmcl-prep index"  # source.made_by: a manifest this command may replace without --force
STATS_SUFFIX = "_stats.json"
STATS_TOTALS = ("count", "successes", "failed_to_download", "failed_to_resize")
SUCCESS = "success"  # img2dataset's status_dict counts its successes under this reason too
BLOCK = 512  # tar block size; an archive ends with two zero blocks


@dataclass
class ShardIndex:
    """What one tar shard holds: samples, the samples holding each extension, and a fault if any."""

    name: str
    samples: int = 0
    formats: Counter[str] = field(default_factory=Counter)
    fault: str | None = None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _tail_fault(path: Path, offset: int, size: int, last: str | None) -> str | None:
    """A fault in the bytes after the last member read: anything but zeros means a header the tar
    reader stopped at (cut in two or corrupt); fewer than two zero blocks means no end of archive."""
    after = f"after {last}" if last else "before the first member"
    with path.open("rb") as f:
        f.seek(offset)
        while chunk := f.read(1 << 20):
            if chunk.count(0) != len(chunk):
                return (f"unreadable data {after} (byte {offset} of {size}): a header cut short or corrupt; "
                        "counted up to there, as the loader reads it")
    if size - offset < 2 * BLOCK:
        return f"no end-of-archive blocks {after}: its writer stopped before closing it"
    return None


def read_gzip_shard(path: Path) -> ShardIndex:
    """Count the samples of a gzip-compressed tar shard (which the loader reads whatever its name),
    reading every member through: a stream cut short or corrupt is found only by decompressing it.
    A sample counts once the data of its first member is read, as the loader then has it."""
    out = ShardIndex(path.name)
    key, extensions, last = None, set(), None
    try:
        with tarfile.open(path, "r|gz") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                tar.extractfile(member).read()  # decompressed: a cut or corrupt stream raises here
                last = member.name
                found = sample_key(member.name)
                if found is None:
                    continue
                if found[0] != key:
                    out.formats.update(extensions)
                    key, extensions = found[0], set()
                    out.samples += 1
                extensions.add(found[1])
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        out.fault = f"not readable as a gzipped tar file: {_first_line(e)}" if last is None else \
            f"read error after {last}: {_first_line(e)}; counted up to there, as the loader reads it"
    out.formats.update(extensions)
    return out


def read_shard(path: Path) -> ShardIndex:
    """Count the samples of one tar shard, tolerating a cut or corrupt end; a gzipped one (found by its
    first bytes, as the loader finds it) by :func:`read_gzip_shard`."""
    with path.open("rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return read_gzip_shard(path)
    out = ShardIndex(path.name)
    size = path.stat().st_size
    key, extensions, last = None, set(), None

    def close_sample() -> None:
        out.formats.update(extensions)

    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                if member.offset_data + member.size > size:
                    past = member.offset_data + member.size - size
                    out.fault = (f"cut short: {member.name} ends {past} bytes past the end of the file ({size} bytes); "
                                 "counted up to there, as the loader reads it")
                    break
                last = member.name
                found = sample_key(member.name) if member.isreg() else None
                if found is None:
                    continue
                if found[0] != key:
                    close_sample()
                    key, extensions = found[0], set()
                    out.samples += 1
                extensions.add(found[1])
            else:
                out.fault = _tail_fault(path, tar.offset, size, last)
    except (tarfile.TarError, OSError, EOFError) as e:
        out.fault = f"not readable as a tar file: {_first_line(e)}" if last is None and not out.samples else \
            f"read error after {last}: {_first_line(e)}; counted up to there"
    close_sample()
    return out


def brace_pattern(names: list[str]) -> str | None:
    """``prefix{00000..00041}.tar`` when the names are one run of equal-width numbers, else None."""
    found = [re.fullmatch(r"(.*?)(\d+)\.tar", n) for n in names]
    if not found or not all(found):
        return None
    prefix, first = found[0].group(1), found[0].group(2)
    numbers = [int(m.group(2)) for m in found]
    if any(m.group(1) != prefix or len(m.group(2)) != len(first) for m in found) or \
            numbers != list(range(numbers[0], numbers[0] + len(numbers))):
        return None
    return f"{prefix}{{{first}..{found[-1].group(2)}}}.tar"


def _as_count(x: Any) -> int:
    return x if isinstance(x, int) and not isinstance(x, bool) and x >= 0 else 0


def read_stats(folder: Path, faults: dict[str, str]) -> dict[str, dict[str, Any]]:
    """img2dataset's ``{shard}_stats.json`` files: shard name (``00000.tar``) -> its stats."""
    stats = {}
    for path in sorted(folder.glob(f"*{STATS_SUFFIX}")):
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            faults[path.name] = f"img2dataset stats not readable: {_first_line(e)}"
            continue
        if not isinstance(data, dict):
            faults[path.name] = "img2dataset stats not readable: not a JSON object"
            continue
        stats[path.name[: -len(STATS_SUFFIX)] + ".tar"] = data
    return stats


def sum_stats(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The totals of img2dataset's stats over shards, and its failures by reason, most frequent first."""
    totals: dict[str, Any] = {"shards": len(stats), **{k: sum(_as_count(s.get(k)) for s in stats.values())
                                                        for k in STATS_TOTALS}}
    reasons: Counter[str] = Counter()
    for s in stats.values():
        status = s.get("status_dict")
        if isinstance(status, dict):
            reasons.update({str(k): _as_count(v) for k, v in status.items() if k != SUCCESS})
    totals["failed_by_reason"] = dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])))
    return totals


def index_folder(folder: Path, split: str = "train") -> dict[str, Any]:
    """The manifest for every ``*.tar`` in ``folder`` as one split (nothing is written)."""
    if not folder.is_dir():
        raise DataError(f"{str(folder)!r} is not a folder; give the folder that holds the .tar shards")
    paths = sorted(p for p in folder.glob("*.tar") if p.is_file())  # the loader's folder glob
    if not paths:
        raise DataError(f"no .tar shard in {folder}; give the folder that holds them (img2dataset's "
                        "--output_folder with --output_format webdataset)")
    shards = [read_shard(p) for p in paths]
    faults = {s.name: s.fault for s in shards if s.fault}
    stats = read_stats(folder, faults)
    entry: dict[str, Any] = {
        "shards": [{"name": s.name, "samples": s.samples, "bytes": (folder / s.name).stat().st_size}
                   for s in shards],
        "pattern": brace_pattern([s.name for s in shards]),
        "total": sum(s.samples for s in shards),
        "skipped": {},
        "formats": dict(sorted(sum((s.formats for s in shards), Counter()).items())),
    }
    if stats:
        for s in shards:
            if s.name not in stats:
                faults.setdefault(s.name, f"no {s.name[:-4]}{STATS_SUFFIX}: img2dataset had not finished this "
                                          "shard (run it again: it resumes unfinished shards)")
            elif not s.fault and s.samples != _as_count(stats[s.name].get("successes")):
                faults[s.name] = (f"img2dataset counted {_as_count(stats[s.name].get('successes'))} successes; "
                                  f"the tar holds {s.samples} samples")
        for name in sorted(set(stats) - {s.name for s in shards}):
            faults[name] = (f"img2dataset's stats list {_as_count(stats[name].get('successes'))} successes "
                            "but the shard is missing")
        entry["img2dataset"] = sum_stats(stats)
    entry["faults"] = dict(sorted(faults.items()))
    images = [e for e in entry["formats"] if e in IMAGE_KEYS]
    return {
        "format": "mmcl-shards/1",
        "splits": {split: entry},
        "source": {"type": "img2dataset" if stats else "webdataset", "made_by": MADE_BY},
        "image_format": images[0] if len(images) == 1 else None,
        "max_side": None,
        "class_names": None,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def check_replaceable(folder: Path, force: bool = False) -> None:
    """Refuse to replace a ``manifest.json`` this command did not write (another mmcl-prep command's
    holds class names and skip counts that indexing cannot recover), unless ``force``."""
    path = folder / MANIFEST
    if force or not path.exists():
        return
    try:
        old = json.loads(path.read_text())
        made_by = (old.get("source") or {}).get("made_by") if isinstance(old, dict) else None
        writer = f"mmcl-prep {(old.get('source') or {}).get('type') or '?'}" if isinstance(old, dict) else "?"
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        made_by, writer = None, "something else (it is not readable JSON)"
    if made_by != MADE_BY:
        raise DataError(f"{path} was written by {writer}, not by mmcl-prep index; indexing would replace its "
                        "class names and skip counts. Pass --force to replace it")


def write_index(folder: Path, split: str = "train", force: bool = False) -> dict[str, Any]:
    """Index ``folder`` and write its ``manifest.json`` atomically; returns the manifest."""
    check_replaceable(folder, force)
    manifest = index_folder(folder, split)
    write_json(folder / MANIFEST, manifest)
    return manifest


def summary(manifest: dict[str, Any]) -> list[str]:
    """Human-readable lines: samples, shards and formats per split, and img2dataset's totals."""
    lines = []
    for name, s in manifest["splits"].items():
        formats = ", ".join(f"{ext} {n}" for ext, n in s["formats"].items())
        lines.append(f"{name}: {s['total']} samples in {len(s['shards'])} shard(s)"
                     + (f" ({formats})" if formats else ""))
        i2d = s.get("img2dataset")
        if i2d:
            lines.append(f"img2dataset: {i2d['count']} URLs, {i2d['successes']} downloaded, "
                         f"{i2d['failed_to_download']} failed to download, {i2d['failed_to_resize']} failed to resize")
            lines += [f"  failed {n}: {reason}" for reason, n in i2d["failed_by_reason"].items()]
    return lines


def warnings(manifest: dict[str, Any]) -> list[str]:
    """One line per fault: a shard cut short or unreadable, img2dataset's stats and a tar that disagree."""
    return [f"warning: {shard}: {fault}" for s in manifest["splits"].values() for shard, fault in s["faults"].items()]


def report(manifest: dict[str, Any], path: Path) -> int:
    """Print what the manifest says (faults on stderr); the exit status: 1 when no sample was found."""
    print("\n".join(summary(manifest)))
    for line in warnings(manifest):
        print(line, file=sys.stderr)
    print(f"wrote {path}")
    if not sum(s["total"] for s in manifest["splits"].values()):
        print("error: the shards hold no sample", file=sys.stderr)
        return 1
    return 0


def run(args: Any) -> int:
    """``mmcl-prep index``: index ``args.dir`` as split ``args.split``; return the exit status."""
    return report(write_index(args.dir, args.split, args.force), args.dir / MANIFEST)
