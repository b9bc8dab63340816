"""Model folders: ``save_pretrained`` / ``from_pretrained`` (local path or Hub repo id).

A folder holds ``mmcl_config.json`` (architecture, preprocessing, training summary),
safetensors weights (never pickle) and, for CLIP models with open_clip towers,
``open_clip_config.json`` + ``open_clip_model.safetensors`` so open_clip loads it with
``local-dir:``. Loading never executes code from the folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from mmcl.errors import MmclError

CONFIG = "mmcl_config.json"
FORMAT = "mmcl-model/1"


def _loaders() -> dict[str, Any]:
    from mmcl.models.clip import ClipModel

    return {"clip": ClipModel}


def save_pretrained(model: nn.Module, path: str | Path, *, name: str, preprocess: dict[str, Any],
                    info: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary folder renamed when complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        config = {"format": FORMAT, "model_name": name, **model.save_files(tmp), "preprocess": preprocess,
                  "info": info or {}}
        if name == "clip" and "hf_text" not in config["model_cfg"]:
            oc = {"model_cfg": {**config["model_cfg"], "custom_text": True},
                  "preprocess_cfg": {"size": preprocess["image_size"], "mean": preprocess["mean"],
                                     "std": preprocess["std"], "interpolation": "bicubic", "resize_mode": "shortest"}}
            (tmp / "open_clip_config.json").write_text(json.dumps(oc, indent=2) + "\n")
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        from mmcl.card import write_card

        write_card(tmp, config)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def resolve(path_or_repo: str | Path, revision: str | None = None) -> Path:
    """A local folder as is; anything else is a Hub repo id, downloaded through the HF cache."""
    local = Path(path_or_repo)
    if local.is_dir():
        return local
    if local.exists() or str(path_or_repo).startswith((".", "/")) or str(path_or_repo).count("/") != 1:
        raise MmclError(f"model {str(path_or_repo)!r}: no such folder (and not a Hub repo id like org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(str(path_or_repo), revision=revision))
    except RepositoryNotFoundError:
        raise MmclError(f"Hub repo {path_or_repo!r} not found (or private: log in or set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise MmclError(f"Hub repo {path_or_repo!r} is not in the local cache and the Hub cannot be reached "
                        "(HF_HUB_OFFLINE is set or there is no network)") from None
    except HfHubHTTPError as e:
        raise MmclError(f"Hub download of {path_or_repo!r} failed: {e}") from None


def read_config(folder: Path) -> dict[str, Any]:
    """``mmcl_config.json`` of a model folder, with clear errors for missing or foreign folders."""
    path = folder / CONFIG
    if not path.is_file():
        raise MmclError(f"{folder} is not an mmcl model folder (no {CONFIG}); pass RUN/final")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise MmclError(f"{path}: not valid JSON ({e})") from None
    if config.get("format") != FORMAT:
        raise MmclError(f"{path}: unknown format {config.get('format')!r} (expected {FORMAT})")
    return config


def from_pretrained(path_or_repo: str | Path, revision: str | None = None) -> nn.Module:
    """Rebuild a model saved with :func:`save_pretrained` (identical outputs)."""
    from safetensors import SafetensorError

    folder = resolve(path_or_repo, revision)
    config = read_config(folder)
    loaders = _loaders()
    if config["model_name"] not in loaders:
        raise MmclError(f"{folder}: unknown model type {config['model_name']!r}")
    try:
        model = loaders[config["model_name"]].load_files(folder, config)
    except FileNotFoundError as e:
        raise MmclError(f"{folder}: missing weights file ({e.filename or e})") from None
    except (SafetensorError, OSError) as e:
        raise MmclError(f"{folder}: weights cannot be read, the file is corrupt or truncated ({e})") from None
    except RuntimeError as e:
        raise MmclError(f"{folder}: weights do not match the saved architecture ({str(e)[:300]})") from None
    model.mmcl_config = config
    return model.eval()
