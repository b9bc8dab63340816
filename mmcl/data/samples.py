"""Decode raw WebDataset samples into tensors: image-text pairs or N augmented views."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import get_worker_info

from mmcl.data.stream import SampleFn, Skip

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def decode_image(data: bytes) -> Image.Image:
    """Bytes to an RGB PIL image; a corrupt or truncated image raises :class:`Skip`."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        raise Skip("corrupt or truncated image") from None
    return img.convert("RGB")


def read_meta(sample: dict[str, Any]) -> tuple[int, int]:
    """(label, id) from the sample's ``.json``; -1 where unknown. Unreadable JSON is a skip."""
    key = sample["__key__"]
    default_id = int(key) if str(key).isdigit() else -1
    raw = sample.get("json")
    if raw is None:
        return -1, default_id
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Skip("unreadable .json") from None
    label = meta.get("label")
    return (int(label) if label is not None else -1), int(meta.get("id", default_id))


def first_image(sample: dict[str, Any], keys: Sequence[str]) -> bytes:
    """The first of ``keys`` present in the sample."""
    for k in keys:
        if k in sample:
            return sample[k]
    raise Skip(f"missing field {'/'.join(keys)}")


def seeded(seed: int, fn: Callable[[Any], torch.Tensor], x: Any) -> torch.Tensor:
    """Apply a random transform with torch's RNG seeded for this sample.

    In a DataLoader worker the global RNG belongs to the stream, so it is simply reseeded; in the
    main process its state is saved and restored, so data loading never shifts training RNG.
    """
    if get_worker_info() is not None:
        torch.random.default_generator.manual_seed(seed)
        return fn(x)
    state = torch.random.get_rng_state()
    try:
        torch.random.default_generator.manual_seed(seed)
        return fn(x)
    finally:
        torch.random.set_rng_state(state)


def image_text_sample(transform: Callable[[Any], torch.Tensor], image_keys: Sequence[str] = IMAGE_KEYS,
                      text_key: str = "txt") -> Callable[[dict[str, Any], int], dict[str, Any]]:
    """Sample function for image-text pairs: ``{image, text, label, id, key}``."""

    def fn(sample: dict[str, Any], seed: int) -> dict[str, Any]:
        try:
            text = sample[text_key].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Skip("caption is not UTF-8") from None
        if not text:
            raise Skip("empty caption")
        img = decode_image(first_image(sample, image_keys))
        label, sid = read_meta(sample)
        return {"image": seeded(seed, transform, img), "text": text, "label": label, "id": sid,
                "key": sample["__key__"]}

    return fn


def multi_view_sample(transforms: Sequence[Callable[[Any], torch.Tensor]],
                      fields: Sequence[Sequence[str]] = (IMAGE_KEYS,)) -> SampleFn:
    """Sample function giving one independently augmented view per transform: ``{views, label, id, key}``.

    With one field (alternative keys, e.g. png or jpg) every view is an augmentation of that
    image; with one field per transform (e.g. ``[("png",), ("depth.png",)]``, multi-field
    samples for CMC) view ``v`` is field ``v`` under transform ``v``.
    """

    def fn(sample: dict[str, Any], seed: int) -> dict[str, Any]:
        imgs = [decode_image(first_image(sample, keys)) for keys in fields]
        label, sid = read_meta(sample)
        views = [seeded(seed * 31 + v, t, imgs[v if len(imgs) > 1 else 0]) for v, t in enumerate(transforms)]
        return {"views": views, "label": label, "id": sid, "key": sample["__key__"]}

    return fn


def collate(items: list[dict[str, Any]], tokenizer: Callable[[list[str]], Any] | None = None) -> dict[str, Any]:
    """Stack a list of processed samples into a batch (tokenizing captions if there are any)."""
    out: dict[str, Any] = {
        "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
        "id": torch.tensor([it["id"] for it in items], dtype=torch.long),
        "key": [it["key"] for it in items],
    }
    if "image" in items[0]:
        out["image"] = torch.stack([it["image"] for it in items])
    if "views" in items[0]:
        out["views"] = [torch.stack([it["views"][v] for it in items]) for v in range(len(items[0]["views"]))]
    if "text" in items[0]:
        out["caption"] = [it["text"] for it in items]
        if tokenizer is not None:
            out["text"] = tokenizer(out["caption"])
    return out
