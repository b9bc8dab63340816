"""Embed every sample of a shard set once, on every process, and gather the results."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.distributed as dist

from mmcl.data import DataConfig, make_loader
from mmcl.data.transforms import OPENAI_MEAN, OPENAI_STD
from mmcl.dist import gather_variable, world
from mmcl.errors import MmclError


def data_config_for(preprocess: dict[str, Any], shards: str, batch_size: int, num_workers: int,
                    kind: str = "image_text") -> DataConfig:
    """An evaluation ``DataConfig`` preprocessing images as the model was trained to see them.

    ``preprocess`` is what a model folder saves (``DataConfig.preprocess()`` of its recipe):
    ``image_size``, and optionally ``mean``/``std`` (OpenAI CLIP's by default), ``colour`` and the
    image fields of multi-field models (``view_fields``).
    """
    pre = preprocess
    if "image_size" not in pre:
        raise MmclError(f"evaluation preprocessing {pre!r} has no image_size")
    return DataConfig(train_shards=shards, kind=kind, image_size=pre["image_size"],
                      batch_size=batch_size, num_workers=num_workers,
                      mean=list(pre.get("mean", OPENAI_MEAN)), std=list(pre.get("std", OPENAI_STD)),
                      colour=pre.get("colour", "rgb"), view_fields=list(pre.get("view_fields", [])))


def image_input(views: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    """What ``encode_image`` takes: the one view's tensor, or (multi-field models) one per field."""
    return views[0] if len(views) == 1 else views


def sum_over_processes(counts: dict[str, int]) -> dict[str, int]:
    """Skip counts added up over all processes (each reads its own shards); a collective."""
    if world()[1] == 1:
        return dict(counts)
    parts: list[Any] = [None] * world()[1]
    dist.all_gather_object(parts, dict(counts))
    total: Counter[str] = Counter()
    for part in parts:
        total.update(part)
    return dict(sorted(total.items()))


@torch.no_grad()
def extract(model: Any, shards: str, *, preprocess: dict[str, Any], batch_size: int = 256, num_workers: int = 2,
            texts: bool = True, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Image (and text) features, labels and ids of all samples, gathered over processes in id order,
    and ``skipped``: the samples the loader could not use, counted by reason over all processes.
    ``preprocess`` is the model's image preprocessing (see :func:`data_config_for`)."""
    # image-only reads need no caption field: the one-view (eval transform) multi-view sample
    cfg = data_config_for(preprocess, shards, batch_size, num_workers, "image_text" if texts else "multi_view")
    loader = make_loader(cfg, train=False, tokenizer=model.tokenizer() if texts else None)
    feats: dict[str, list[torch.Tensor]] = {"image": [], "text": [], "label": [], "id": []}
    was_training = model.training
    model.eval()
    for batch in loader:
        batch = loader.prepare(batch, device)
        images = batch["image"] if texts else image_input(batch["views"])  # image-only: one view per field
        feats["image"].append(model.encode_image(images).float())
        if texts:
            feats["text"].append(model.encode_text(batch["text"]).float())
        feats["label"].append(batch["label"])
        feats["id"].append(batch["id"])
    model.train(was_training)
    if not feats["image"]:  # this process read no sample: empty tensors of the right shape for the gather
        blank = [torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)] * max(1, len(cfg.view_fields))
        dim = model.encode_image(image_input(blank)).shape[-1]
        feats = {k: [torch.zeros((0, dim) if k in ("image", "text") else (0,), device=device,
                                 dtype=torch.float32 if k in ("image", "text") else torch.long)]
                 for k in feats}
    out: dict[str, Any] = {k: gather_variable(torch.cat(parts)) for k, parts in feats.items()
                           if k != "text" or texts}
    order = torch.argsort(out["id"])  # deterministic order whatever the process count
    out = {k: v[order].cpu() for k, v in out.items()}
    out["skipped"] = sum_over_processes(loader.skipped)
    return out
