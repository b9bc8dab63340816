"""File-system details every writer of run outputs and shards shares (torch-free: mmcl-prep uses it)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` under a temporary name, then rename it into place: a reader sees
    the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def umask() -> int:
    """The process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_as_umask(folder: Path) -> None:
    """Give ``folder`` and the files in it the permissions the user's umask gives any new file.

    ``tempfile.mkdtemp`` makes folders private (0700) and safetensors writes its files 0600: left so,
    a model or checkpoint written under a temporary name and renamed into place could not be read by
    the rest of a group sharing a cluster."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.rglob("*"):
        os.chmod(f, (0o666 if f.is_file() else 0o777) & ~mask)
