"""Model folders and the Hugging Face Hub: ``save_pretrained``, ``from_pretrained``, ``push``.

A folder holds ``mmcl_config.json`` (architecture, preprocessing, training summary, evaluation
results), safetensors weights (never pickle), whatever the model itself needs (for CLIP with
open_clip towers: ``open_clip_config.json`` + ``open_clip_model.safetensors``, which open_clip
loads with ``local-dir:`` and ``hf-hub:``) and a ``README.md`` model card. Loading never
executes code from the folder. Hub access goes through ``huggingface_hub`` (its cache,
``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` / login cache); tokens are never printed or
written anywhere.
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
from mmcl.files import share_as_umask, write_atomic  # write_atomic: also mmcl.hub's, as before

CONFIG = "mmcl_config.json"
FORMAT = "mmcl-model/1"


def _loaders() -> dict[str, Any]:
    """Model classes by saved ``model_name``: every registered model class that can rebuild itself
    from a folder (``load_files``, the counterpart of the ``save_files`` that wrote it)."""
    import mmcl.models  # noqa: F401 (the built-in models register themselves)
    from mmcl.registry import registered

    return {name: builder for name, (_, builder) in registered("model").items() if hasattr(builder, "load_files")}


def write_card(folder: Path, config: dict[str, Any]) -> None:
    """(Re)write the model card ``README.md`` of a folder from its config."""
    from mmcl.card import render

    write_atomic(folder / "README.md", render(config))


def save_pretrained(model: nn.Module, path: str | Path, *, name: str, preprocess: dict[str, Any],
                    info: dict[str, Any] | None = None, files: dict[str, bytes] | None = None) -> Path:
    """Write ``model`` to ``path`` atomically (a temporary folder renamed when complete), with
    ``files`` (name -> bytes, such as the training curves the card shows) beside it.

    >>> import tempfile, torch, mmcl
    >>> model, _, tokenizer = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")
    >>> folder = save_pretrained(model, f"{tempfile.mkdtemp()}/tiny-clip", name="clip",
    ...                          preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    >>> sorted(p.name for p in folder.iterdir())   # mmcl's config, and the model as open_clip saves one
    ['README.md', 'mmcl_config.json', 'open_clip_config.json', 'open_clip_model.safetensors']
    >>> again = from_pretrained(folder)
    >>> text = tokenizer(["a handwritten four"])
    >>> torch.equal(again.encode_text(text), model.encode_text(text))
    True
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        info = {"parameters": sum(p.numel() for p in model.parameters()), **(info or {})}
        config = {"format": FORMAT, "model_name": name, **model.save_files(tmp, preprocess),
                  "preprocess": preprocess, "info": info}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        for file_name, data in (files or {}).items():
            (tmp / file_name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / file_name).write_bytes(data)
        write_card(tmp, config)
        share_as_umask(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def record_eval(folder: str | Path, results: list[dict[str, Any]]) -> None:
    """Add evaluation results to a local model folder's config and card.

    A result replaces an earlier one of the same task on the same dataset, so the card always
    shows the latest figures.
    """
    folder = Path(folder)
    config = read_config(folder)
    key = lambda r: (r["task"], r["dataset"]["name"])  # noqa: E731
    new = {key(r) for r in results}
    kept = [r for r in config["info"].get("eval") or [] if isinstance(r, dict) and "task" in r and key(r) not in new]
    config["info"]["eval"] = kept + list(results)
    write_atomic(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    write_card(folder, config)


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
    """Rebuild a model saved with :func:`save_pretrained` (identical outputs). The folder's saved
    config is kept as ``model.mmcl_config`` (its ``preprocess`` is what evaluations take).
    ``path_or_repo``: a folder, or a Hub repo id (downloaded, or read from the cache offline).

    >>> import tempfile, mmcl
    >>> model, _, _ = mmcl.create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2})
    >>> folder = save_pretrained(model, f"{tempfile.mkdtemp()}/encoder", name="encoder",
    ...                          preprocess={"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3})
    >>> loaded = from_pretrained(folder)
    >>> type(loaded).__name__, loaded.mmcl_config["preprocess"]["image_size"]
    ('EncoderModel', 32)
    """
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


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exception types meaning "the Hub could not be reached" for the installed HTTP client."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def push(folder: str | Path, repo_id: str, *, private: bool = True, revision: str | None = None,
         commit_message: str | None = None, token: str | None = None, endpoint: str | None = None) -> str:
    """Upload a model folder to ``repo_id`` (created if missing) in one commit; returns the commit URL.

    The card uploaded is rendered with the repo id so its usage snippets can be copied as is;
    the local folder is only read. ``token`` defaults to ``HF_TOKEN`` or the login cache.
    (Not run in the tests' examples, which have no network: ``tests/hub`` pushes to a local stand-in.)

    >>> push("runs/clip_digits/final", "YOU/clip-digits", private=True)  # doctest: +SKIP
    'https://huggingface.co/YOU/clip-digits/commit/...'
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    from mmcl.card import render

    folder = Path(folder)
    config = read_config(folder)
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MmclError(f"--repo-id {repo_id!r}: expected ORG/NAME")
    token = token or get_token()
    if not token:
        raise MmclError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    api = HfApi(endpoint=endpoint, token=token)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                   if p.is_file() and not p.name.startswith("."))
    ops = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files if f != "README.md"]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=render(config, repo_id).encode()))
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(repo_id, operations=ops, revision=revision,
                                 commit_message=commit_message or f"Upload {config['model_name']} model with mmcl")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            raise MmclError("the Hub rejected the token (401): check HF_TOKEN or log in again") from None
        if status == 403:
            raise MmclError(f"no write access to {repo_id!r} (403): the namespace belongs to someone else "
                            "or the token is read-only") from None
        raise MmclError(f"Hub upload to {repo_id!r} failed ({status}): {str(e).splitlines()[0]}") from None
    except _network_errors() as e:
        raise MmclError(f"cannot reach the Hub at {api.endpoint} ({type(e).__name__}); check the network "
                        "or HF_ENDPOINT, then push again") from None
    return info.commit_url
