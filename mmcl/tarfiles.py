"""Tar shards' members as webdataset reads them, without webdataset or torch.

The loader (``mmcl.data``) streams shards through webdataset; ``mmcl-prep index`` and
``mmcl-prep clip-benchmark`` count and read the same shards without importing torch (which
webdataset imports). Both take here the two rules that decide what a sample is, so their counts
are the loader's by construction:

- which members webdataset leaves out (its ``tar_file_iterator``'s ``__*__`` names and
  ``skip_meta`` pattern): :func:`is_meta`;
- how it names a member's sample and field (``base_plus_ext``: the name up to the first dot of
  its base name, and the rest): :func:`sample_key`;

and the fields an image is looked for in by default (:data:`IMAGE_KEYS`).

:func:`scan_tar` lists a local tar's members with the offset and size of their data instead of the
data (a resume numbers the samples of finished shards this way, :mod:`mmcl.data.seek`).
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # the fields a sample's image is looked for in, by default
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext


def is_meta(name: str) -> bool:
    """Whether webdataset leaves the member ``name`` out: a top-level ``__*__`` file or a name its
    ``skip_meta`` pattern matches.

    >>> is_meta("__index__"), is_meta("__meta__/x.json"), is_meta("a/__key__.txt"), is_meta("000.jpg")
    (True, True, False, False)
    """
    return ("/" not in name and name.startswith("__") and name.endswith("__")) or bool(_SKIP_META.match(name))


def sample_key(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a tar member as webdataset groups it (the field lower-cased), or None for
    one it leaves out (:func:`is_meta`, or no extension).

    >>> sample_key("shard0/000123.seg.PNG"), sample_key("README"), sample_key("__index__")
    (('shard0/000123', 'seg.png'), None, None)
    """
    if is_meta(name):
        return None
    m = _KEY_EXT.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def scan_tar(path: str) -> Iterator[dict[str, Any]] | None:
    """The files of a local, uncompressed tar as ``webdataset.tariterators.tar_file_iterator`` gives
    them, but with ``(offset, size)`` of the data instead of the data, which is skipped by seeking.
    None if the file cannot be scanned so (compressed, not a tar): read it instead. Like the
    streaming reader, the files stop before a header that cannot be read or data cut short."""
    try:
        tar = tarfile.open(path, "r:")
    except (tarfile.TarError, OSError):
        return None
    size = os.path.getsize(path)

    def files() -> Iterator[dict[str, Any]]:
        with tar:
            try:
                for info in tar:
                    if not info.isreg() or is_meta(info.name):
                        continue
                    if info.offset_data + info.size > size:
                        return  # the streaming reader fails reading this file's data
                    yield {"fname": info.name, "data": (info.offset_data, info.size), "__url__": path}
            except (tarfile.TarError, OSError):
                return

    return files()
