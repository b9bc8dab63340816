"""File-system details every writer of run outputs and shards shares (torch-free: mmcl-prep uses it)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` under a temporary name of its own, then
    rename it into place: a reader sees the old file or the new one, never half of one, and two
    writers of one file do not write into each other's temporary file. The file gets the
    permissions the umask gives any new file (``mkstemp`` alone would leave it 0600).

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "results.json"
    >>> write_atomic(path, '{"top1": 0.97}')
    >>> path.read_text(), sorted(p.name for p in path.parent.iterdir())
    ('{"top1": 0.97}', ['results.json'])
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png(figure: object, dpi: int) -> bytes:
    """A matplotlib figure as PNG bytes (for :func:`write_atomic`)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


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
