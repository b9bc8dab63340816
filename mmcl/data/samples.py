"""Decode raw WebDataset samples into tensors: image-text pairs or N augmented views.

A sample that cannot be used raises :class:`~mmcl.data.stream.Skip` with a short stable reason,
which the stream counts; nothing a single sample holds can stop a run. The reasons:
``bad_image``, ``truncated_image``, ``too_large`` (see :func:`mmcl.decode.decode_image`),
``bad_json`` (a ``.json`` that does not parse to an object), ``bad_label``, ``bad_id``,
``bad_caption`` (not UTF-8) and ``missing_caption`` (empty).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import get_worker_info

from mmcl.data.device_decode import jpeg_size
from mmcl.data.stream import SampleFn, Skip
from mmcl.decode import MAX_PIXELS, BadImage
from mmcl.decode import decode_image as _decode
from mmcl.tarfiles import IMAGE_KEYS

BAD_JSON, BAD_LABEL, BAD_ID = "bad_json", "bad_label", "bad_id"
BAD_CAPTION, MISSING_CAPTION, MISSING_IMAGE = "bad_caption", "missing_caption", "missing_image"
INT64_MAX = 2**63 - 1  # labels and ids become int64 tensors


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Bytes to an RGB PIL image exactly as mmcl-prep converts them; a bad image raises :class:`Skip`."""
    try:
        return _decode(data, max_pixels)
    except BadImage as e:
        raise Skip(e.reason) from None


def _is_index(x: Any) -> bool:
    """A non-negative integer that fits int64 (JSON ``true`` and ``3.0`` are not)."""
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= INT64_MAX


def read_meta(sample: dict[str, Any]) -> tuple[int, int]:
    """(label, id) from the sample's ``.json``; -1 where unknown.

    The ``.json`` must be an object; ``label`` a non-negative integer or null (unlabelled);
    ``id`` a non-negative integer, by default the key when it is a number. Anything else
    (``[1, 2, 3]``, ``{"label": "cat"}``, ``{"id": null}``) is a counted skip, never an error.
    """
    key = str(sample["__key__"])
    default_id = int(key) if key.isascii() and key.isdigit() and int(key) <= INT64_MAX else -1
    raw = sample.get("json")
    if raw is None:
        return -1, default_id
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # includes JSONDecodeError and UnicodeDecodeError
        raise Skip(BAD_JSON) from None
    if not isinstance(meta, dict):
        raise Skip(BAD_JSON)
    label = meta.get("label")
    if label is not None and not _is_index(label):
        raise Skip(BAD_LABEL)
    if "id" in meta and not _is_index(meta["id"]):
        raise Skip(BAD_ID)
    return (-1 if label is None else label), meta.get("id", default_id)


def first_image(sample: dict[str, Any], keys: Sequence[str]) -> bytes:
    """The first of ``keys`` present in the sample."""
    for k in keys:
        if k in sample:
            return sample[k]
    raise Skip(MISSING_IMAGE)


def seeded(seed: int, fn: Callable[[Any], torch.Tensor], x: Any) -> torch.Tensor:
    """Apply a random transform with torch's RNG seeded for this sample.

    In a DataLoader worker the global RNG belongs to the stream, so it is simply reseeded; in the
    main process torch's ``fork_rng`` saves and restores the CPU generator around it, so data
    loading never shifts training RNG.
    """
    if get_worker_info() is not None:
        torch.random.default_generator.manual_seed(seed)
        return fn(x)
    with torch.random.fork_rng(devices=[]):  # the CPU generator only: augmentations draw from nothing else
        torch.random.default_generator.manual_seed(seed)
        return fn(x)


def image_text_sample(transform: Callable[[Any], torch.Tensor], image_keys: Sequence[str] = IMAGE_KEYS,
                      text_key: str = "txt", max_pixels: int = MAX_PIXELS,
                      view_transforms: Sequence[Callable[[Any], torch.Tensor]] = (),
                      device_crop: Callable[[tuple[int, int]], torch.Tensor] | None = None) -> SampleFn:
    """Sample function for image-text pairs: ``{image, text, label, id, key}``, plus ``views``, one
    augmented view of the image per ``view_transforms`` (SLIP: a self-supervised loss beside CLIP's).

    With ``device_crop`` (``data.decode: device``), a plain JPEG is left undecoded: ``{jpeg, crop}``
    (its bytes, and the box ``device_crop`` draws for its size) instead of ``image``, for
    :class:`~mmcl.data.device_decode.DeviceDecoder`; other images are decoded here as without it.
    :func:`collate` joins a batch's JPEGs into one byte tensor with their ``ends``."""

    def fn(sample: dict[str, Any], seed: int) -> dict[str, Any]:
        try:
            text = sample.get(text_key, b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise Skip(BAD_CAPTION) from None
        if not text:
            raise Skip(MISSING_CAPTION)
        label, sid = read_meta(sample)  # cheap checks before decoding
        data = first_image(sample, image_keys)
        out = {"text": text, "label": label, "id": sid, "key": sample["__key__"]}
        size = jpeg_size(data, max_pixels) if device_crop is not None else None
        if size is not None:  # decoded on the device; the crop drawn as the transform would draw it
            return {**out, "jpeg": data, "crop": seeded(seed, device_crop, size)}
        img = decode_image(data, max_pixels)
        out["image"] = seeded(seed, transform, img)
        if view_transforms:  # seeds of their own, apart from the image's
            out["views"] = [seeded(seed * 31 + 1 + v, t, img) for v, t in enumerate(view_transforms)]
        return out

    return fn


def multi_view_sample(transforms: Sequence[Callable[[Any], torch.Tensor]],
                      fields: Sequence[Sequence[str]] = (IMAGE_KEYS,), max_pixels: int = MAX_PIXELS) -> SampleFn:
    """Sample function giving one independently augmented view per transform: ``{views, label, id, key}``.

    With one field (alternative keys, e.g. png or jpg) every view is an augmentation of that
    image; with one field per transform (e.g. ``[("png",), ("depth.png",)]``, multi-field
    samples for CMC) view ``v`` is field ``v`` under transform ``v``.
    """

    def fn(sample: dict[str, Any], seed: int) -> dict[str, Any]:
        label, sid = read_meta(sample)
        imgs = [decode_image(first_image(sample, keys), max_pixels) for keys in fields]
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
    jpegs = [i for i, it in enumerate(items) if "jpeg" in it]
    if jpegs:  # data.decode: device; the images decoded here are the others, in order
        # one tensor of all their bytes: a tensor sent from a worker holds a file descriptor until it is read,
        # and a few prefetched batches of one tensor per image would exhaust a 1024-descriptor limit
        blob = bytearray(b"".join(items[i]["jpeg"] for i in jpegs))
        out["jpeg"] = {"bytes": torch.frombuffer(blob, dtype=torch.uint8),
                       "ends": torch.tensor([len(items[i]["jpeg"]) for i in jpegs]).cumsum(0),
                       "crop": torch.stack([items[i]["crop"] for i in jpegs]), "at": jpegs}
    if any("image" in it for it in items):
        out["image"] = torch.stack([it["image"] for it in items if "image" in it])
    if "views" in items[0]:
        out["views"] = [torch.stack([it["views"][v] for it in items]) for v in range(len(items[0]["views"]))]
    if "text" in items[0]:
        out["caption"] = [it["text"] for it in items]
        if tokenizer is not None:
            out["text"] = tokenizer(out["caption"])
    return out
