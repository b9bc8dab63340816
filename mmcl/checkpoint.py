"""Training checkpoints that cannot run code and are either whole or absent.

A checkpoint is a folder ``RUN/checkpoints/step_XXXXXXXX`` holding only safetensors files and JSON:

- ``model.safetensors``, ``objective.safetensors``: module state (weights, buffers, queues, banks);
- ``optimizer.safetensors``, ``scheduler.safetensors``, ``scaler.safetensors`` (fp16 only): the
  tensors of each state dict, with the rest of its structure as JSON in the file's metadata;
- ``process_<rank>.safetensors``: each process's Python, NumPy, torch and CUDA generator states
  and the buffers that differ between processes by design (an objective's ``per_process_buffers``,
  e.g. SwAV's queue);
- ``state.json``: step, data position of every process, bad steps;
- ``manifest.json``, written last: format, step, process count, batch layout, and the size and
  SHA-256 of every file above.

Nothing here unpickles: tensors come from safetensors and everything else from JSON with a
handful of tagged types (tuple, non-string dict keys, NumPy array), so a crafted file in a
checkpoint folder can at worst fail to load. Files a manifest does not list are never read.

Every checkpoint is written under a temporary name (``.step_XXXXXXXX.partial``) and renamed into
place when complete, so a run killed while saving leaves the previous checkpoints as they were and
``--resume latest`` never sees a half-written folder. Loading checks the manifest (every file
present, of its size and hash): a checkpoint that is incomplete or altered is a clear error, never
a silent inexact resume. The manifest also records the layout (processes, loader workers, batch
size, accumulation) that the trainer compares to decide between an exact and an elastic resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmcl.errors import MmclError
from mmcl.files import share_as_umask

FORMAT = "mmcl-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.json"


class CheckpointError(MmclError):
    """A checkpoint cannot be written or resumed from; the message names the folder and the fix."""


# ------------------------------------------------------------------------------ state <-> tensors + JSON
def _encode(obj: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """JSON-able form of ``obj``; tensors move to ``tensors`` under their path and leave a reference."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[_encode(k, tensors, f"{path}.k{i}"), _encode(v, tensors, f"{path}.{i}")]
                              for i, (k, v) in enumerate(obj.items())]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} at '{path}' in a checkpoint")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`_encode`."""
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.asarray(obj["__ndarray__"], dtype=np.dtype(obj["dtype"]))
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two on one storage (tied weights are stored twice), as safetensors needs."""
    seen: set[int] = set()
    out = {}
    for k, t in tensors.items():
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr() if t.numel() else 0
        if ptr and ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[k] = t
    return out


def write_state(state: Any, file: Path) -> None:
    """Write any state dict (nested dicts, lists, tuples, numbers, tensors) as one safetensors file."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "s")
    save_file(_unshared(tensors), str(file), metadata={"mmcl_state": json.dumps(structure)})


def read_state(file: Path) -> Any:
    """Read what :func:`write_state` wrote, on the CPU."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "mmcl_state" not in meta:
        raise CheckpointError(f"{file} is not an mmcl state file (no 'mmcl_state' metadata)")
    return _decode(json.loads(meta["mmcl_state"]), tensors)


def state_bytes(state: Any) -> int:
    """Bytes the tensors of ``state`` take (to size a checkpoint before writing it), counted where
    they lie: no tensor is copied off the GPU to be counted.

    >>> state_bytes({"w": torch.zeros(2, 3), "step": 4, "m": [torch.zeros(5, dtype=torch.bfloat16)], (1, 2): None})
    34
    """
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(k) + state_bytes(v) for k, v in state.items())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


# ------------------------------------------------------------------------------ random generators
def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's generator states: Python, NumPy, torch CPU and the current CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators (a process that has no saved states)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------ folders and manifest
def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def partial_path(final: Path) -> Path:
    """The temporary name a checkpoint is written under before it is renamed to ``final``."""
    return final.parent / f".{final.name}.partial"


def write_manifest(folder: Path, info: dict[str, Any]) -> None:
    """Hash every file in ``folder`` (already written and flushed) into ``manifest.json``, written last."""
    files = {}
    for f in sorted(folder.iterdir()):
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
        files[f.name] = {"bytes": f.stat().st_size, "sha256": _sha256(f)}
    manifest = {"format": FORMAT, "version": VERSION, **info, "files": files}
    with open(folder / MANIFEST, "w") as fh:
        fh.write(json.dumps(manifest, indent=1) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def publish(partial: Path, final: Path) -> None:
    """Rename a complete checkpoint into place (replacing an older one of the same step), readable
    as the user's umask says (safetensors writes its files 0600)."""
    share_as_umask(partial)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync_dir(final.parent)


def is_complete(folder: Path) -> bool:
    """A checkpoint folder that finished writing (it has its manifest)."""
    return (folder / MANIFEST).is_file()


def find_checkpoint(out_dir: Path, resume: str, warn: Any = print) -> Path | None:
    """``latest`` -> the newest complete ``checkpoints/step_*`` (None if there is none); otherwise the
    given folder. Incomplete folders (no manifest) are passed over with a warning."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"--resume {resume}: no such checkpoint folder")
        return path
    for folder in sorted((out_dir / "checkpoints").glob("step_*"), reverse=True):
        if folder.is_dir() and is_complete(folder):
            return folder
        warn(f"skipping {folder}: incomplete checkpoint (no {MANIFEST}; interrupted while saving, or not "
             "written by this version of mmcl)")
    return None


def verify(folder: Path, expect: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every listed file (size and SHA-256) and, if given,
    that the values in ``expect`` are those it was written with."""
    if not is_complete(folder):
        raise CheckpointError(f"{folder} is not a complete mmcl checkpoint (no {MANIFEST}): it was interrupted "
                              "while saving or written by an older mmcl; resume from another checkpoint")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        ok = manifest["format"] == FORMAT and isinstance(files, dict)
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise CheckpointError(f"{folder / MANIFEST} is not a valid mmcl checkpoint manifest")
    if manifest["version"] > VERSION:
        raise CheckpointError(f"{folder} was written by a newer mmcl (checkpoint format {manifest['version']}); "
                              "upgrade mmcl to resume it")
    for name, meta in files.items():
        f = folder / name
        if Path(name).name != name or not f.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {name} is missing; resume from another "
                                  "checkpoint (an inexact resume is never silent)")
        if f.stat().st_size != meta["bytes"] or _sha256(f) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is damaged or was altered: {name} does not match its "
                                  f"manifest (size or SHA-256); resume from another checkpoint")
    for key, want in (expect or {}).items():
        if manifest.get(key) != want:
            raise CheckpointError(f"checkpoint {folder} was written with {key}={manifest.get(key)} and this run "
                                  f"has {key}={want}")
    return manifest


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the ``keep`` newest complete checkpoints; drop older ones and stale partial folders."""
    complete = [f for f in sorted(ckpt_dir.glob("step_*")) if is_complete(f)]
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in ckpt_dir.glob(".step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)


def free_bytes(folder: Path) -> int:
    """Free space on the file system holding ``folder``."""
    return shutil.disk_usage(folder).free


def gib(n: float) -> str:
    """Bytes as a short human figure."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


__all__ = ["CheckpointError", "find_checkpoint", "verify", "write_state", "read_state", "rng_state", "seed_all",
           "set_rng_state", "write_manifest", "publish", "partial_path", "prune", "state_bytes", "free_bytes"]
