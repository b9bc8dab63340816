"""Run the evaluations a recipe's ``eval`` section asks for, on every process; results on all."""

from __future__ import annotations

from typing import Any

import torch

from mmcl.data import class_names as manifest_classes
from mmcl.data import expand_shards
from mmcl.errors import MmclError
from mmcl.evaluate.features import extract
from mmcl.evaluate.retrieval import retrieval
from mmcl.evaluate.templates import template_set
from mmcl.evaluate.zeroshot import classify, zeroshot_classifier


def resolve_classes(shards: str, given: list[str] | None) -> list[str]:
    """Class names given explicitly, else from the shards' manifest."""
    if given:
        return list(given)
    names = manifest_classes(expand_shards(shards))
    if not names:
        raise MmclError(f"no class names for {shards}: the manifest has none; pass --classes FILE "
                        "(one name per line) or set eval.class_names")
    return names


def zeroshot(model: Any, shards: str, *, templates: Any = "openai", classes: list[str] | None = None,
             batch_size: int = 256, num_workers: int = 2, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Zero-shot classification result (see :func:`mmcl.evaluate.zeroshot.classify`) plus skip counts."""
    names = resolve_classes(shards, classes)
    feats = extract(model, shards, batch_size=batch_size, num_workers=num_workers, texts=False, device=device)
    if (feats["label"] < 0).any():
        raise MmclError(f"{shards}: some samples have no label; zero-shot needs labelled shards")
    classifier = zeroshot_classifier(model, names, template_set(templates), device=device).cpu()
    result = classify(feats["image"], feats["label"], classifier)
    result["skipped"] = feats["skipped"]
    result["class_names"] = names
    return result


def run_evals(model: Any, cfg: Any, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Zero-shot and/or retrieval metrics for an ``EvalConfig``; every process must call this."""
    out: dict[str, dict[str, float]] = {}
    if cfg.zeroshot_shards:
        res = zeroshot(model, cfg.zeroshot_shards, templates=cfg.templates, classes=cfg.class_names,
                       batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
        out["zeroshot"] = {"top1": res["top1"], "top5": res["top5"]}
    if cfg.retrieval_shards:
        feats = extract(model, cfg.retrieval_shards, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                        device=device)
        out["retrieval"] = retrieval(feats["image"], feats["text"])
    return out
