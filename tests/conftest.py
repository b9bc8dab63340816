"""Shared fixtures: real digits shards built once per session with the real ``mmcl-prep``."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits shards (32 px, 256 samples per shard) in a session-wide temporary folder."""
    out = tmp_path_factory.mktemp("digits")
    assert prep_main(["digits", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    return out


@pytest.fixture(scope="session")
def digits_edges_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits shards whose samples also hold an ``edges.png`` field (multi-field, for CMC)."""
    out = tmp_path_factory.mktemp("digits_edges")
    assert prep_main(["digits", "--out", str(out), "--edges", "--workers", "1", "--no-progress"]) == 0
    return out


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    """Encode an array as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def manifest(folder: Path) -> dict:
    """The manifest.json written beside shards."""
    return json.loads((folder / "manifest.json").read_text())


def cfg_for(shards: str, **kw):
    """A loader config for ``shards`` at 32 px, unnormalised, in the main process."""
    from mmcl.data import DataConfig

    base = dict(train_shards=shards, image_size=32, batch_size=16, num_workers=0, shuffle_buffer=50,
                mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return DataConfig(**{**base, **kw})


def collect(loader) -> tuple[list[str], list[dict]]:
    """Every key a loader yields, and its batches as the model takes them (``Loader.prepare`` on the CPU)."""
    keys, batches = [], []
    for b in loader:
        keys += b["key"]
        batches.append(loader.prepare(b, "cpu"))
    return keys, batches
