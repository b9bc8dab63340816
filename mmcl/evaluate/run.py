"""Run the evaluations a recipe's ``eval`` section asks for, on every process; results on all.

Every evaluation reports ``skipped``: the samples it left out, counted by reason. Besides the
loader's reasons (see :mod:`mmcl.data.samples`), ``missing_label`` (an unlabelled sample in a
labelled evaluation) and ``unknown_class`` (a label with no class name, zero-shot only).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch

from mmcl.data import class_names as manifest_classes
from mmcl.data import describe, expand_shards
from mmcl.errors import MmclError
from mmcl.evaluate.features import extract
from mmcl.evaluate.knn import knn_classify, linear_probe
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


def keep(feats: dict[str, Any], mask: torch.Tensor, reason: str) -> dict[str, Any]:
    """``feats`` (see :func:`extract`) without the samples where ``mask`` is false, counted under ``reason``."""
    dropped = int((~mask).sum())
    if not dropped:
        return feats
    out = {k: (v[mask] if isinstance(v, torch.Tensor) else v) for k, v in feats.items()}
    out["skipped"] = dict(Counter(feats["skipped"]) + Counter({reason: dropped}))
    return out


def labelled_features(model: Any, shards: str, purpose: str, **kwargs: Any) -> dict[str, Any]:
    """Image features of ``shards`` (see :func:`extract`); unlabelled samples are counted skips
    (``missing_label``), shards with no labelled sample an error."""
    feats = extract(model, shards, texts=False, **kwargs)
    labelled = feats["label"] >= 0
    if not labelled.any():
        raise MmclError(f"{shards}: no sample has a label; {purpose} labelled shards"
                        + (f" (skipped: {feats['skipped']})" if feats["skipped"] else ""))
    return keep(feats, labelled, "missing_label")


def zeroshot(model: Any, shards: str, *, preprocess: dict[str, Any], templates: Any = "openai",
             classes: list[str] | None = None, batch_size: int = 256, num_workers: int = 2,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Zero-shot classification result (see :func:`mmcl.evaluate.zeroshot.classify`) plus skip counts.
    The class names come from the shards' manifest (or ``classes``), the prompts from ``templates``
    (a name in :mod:`mmcl.evaluate.templates`, or a list of strings with ``{}``).

    >>> import subprocess, sys, tempfile, mmcl
    >>> data = tempfile.mkdtemp()   # mmcl-prep digits: 32 px image-caption shards of scikit-learn's digits
    >>> _ = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True,
    ...                    capture_output=True)
    >>> model, _, _ = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")   # untrained: near chance
    >>> pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}   # a saved model's mmcl_config["preprocess"]
    >>> result = zeroshot(model, f"{data}/test-{{000000..000001}}.tar", preprocess=pre, templates="digits",
    ...                   num_workers=0)
    >>> result["class_names"][:3], 0 <= result["top1"] <= result["top5"] <= 1, result["skipped"]
    (['zero', 'one', 'two'], True, {})
    """
    names = resolve_classes(shards, classes)
    feats = labelled_features(model, shards, "zero-shot needs", preprocess=preprocess, batch_size=batch_size,
                              num_workers=num_workers, device=device)
    feats = keep(feats, feats["label"] < len(names), "unknown_class")
    if not len(feats["label"]):
        raise MmclError(f"{shards}: no label is below {len(names)}, the number of class names; check --classes")
    classifier = zeroshot_classifier(model, names, template_set(templates), device=device).cpu()
    result = classify(feats["image"], feats["label"], classifier)
    result["skipped"] = feats["skipped"]
    result["class_names"] = names
    return result


def retrieval_eval(model: Any, shards: str, *, preprocess: dict[str, Any], batch_size: int = 256,
                   num_workers: int = 2, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Image-text retrieval recall (see :func:`mmcl.evaluate.retrieval.retrieval`), the number of
    pairs ``n`` and the skip counts, as :func:`zeroshot` reports them.

    >>> import subprocess, sys, tempfile, mmcl
    >>> data = tempfile.mkdtemp()   # mmcl-prep digits: 32 px image-caption shards of scikit-learn's digits
    >>> _ = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True,
    ...                    capture_output=True)
    >>> model, _, _ = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")   # untrained: near chance
    >>> pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}   # a saved model's mmcl_config["preprocess"]
    >>> result = retrieval_eval(model, f"{data}/test-{{000000..000001}}.tar", preprocess=pre, num_workers=0)
    >>> result["n"], sorted(k for k in result if k.startswith("image_to_text"))
    (360, ['image_to_text_R@1', 'image_to_text_R@10', 'image_to_text_R@5'])
    """
    feats = extract(model, shards, preprocess=preprocess, batch_size=batch_size, num_workers=num_workers,
                    device=device)
    if not len(feats["id"]):
        raise MmclError(f"{shards}: no usable image-text pair" +
                        (f" (skipped: {feats['skipped']})" if feats["skipped"] else ""))
    return {**retrieval(feats["image"], feats["text"]), "n": len(feats["id"]), "skipped": feats["skipped"]}


def result(task: str, shards: str, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
    """One evaluation result as recorded in metrics logs, model configs and cards."""
    return {"task": task, "dataset": describe(shards), "metrics": {k: float(v) for k, v in metrics.items()}, **extra}


def result_lines(results: list[dict[str, Any]]) -> list[str]:
    """Results as ``mmcl eval`` prints them: ``zeroshot top1: 0.986 on digits/test (360 samples)``."""
    lines = []
    for r in results:
        d = r["dataset"]
        metrics = ", ".join(f"{k} {v:.3f}" for k, v in r["metrics"].items())
        lines.append(f"{r['task']} {metrics} on {d['name']} ({d.get('samples') or '?'} samples)")
        if r.get("skipped"):
            lines.append(f"  skipped samples: {r['skipped']}")
    return lines


def flat_metrics(results: list[dict[str, Any]]) -> dict[str, float]:
    """``{"zeroshot/top1": ..., "retrieval/image_to_text_R@1": ...}`` for logging; a task run on
    several datasets is keyed by dataset too (``knn/digits/test-shifted/top1``)."""
    tasks = [r["task"] for r in results]
    return {(f"{r['task']}/{r['dataset']['name']}/{k}" if tasks.count(r["task"]) > 1 else f"{r['task']}/{k}"): v
            for r in results for k, v in r["metrics"].items()}


def frozen_feature_evals(model: Any, train_shards: str, test_shards: list[str], *, preprocess: dict[str, Any],
                         knn: bool = True, linear: bool = False, k: int = 20, temperature: float = 0.07,
                         batch_size: int = 256, num_workers: int = 2,
                         device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """kNN and/or linear-probe results on each of ``test_shards``, with ``train_shards`` as the
    labelled reference set (features extracted once, on every process). Each result's ``skipped``
    counts the samples left out of the reference and test sets together.

    >>> import subprocess, sys, tempfile, mmcl
    >>> data = tempfile.mkdtemp()   # mmcl-prep digits: 32 px image-caption shards of scikit-learn's digits
    >>> _ = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True,
    ...                    capture_output=True)
    >>> model, _, _ = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")   # untrained: near chance
    >>> pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}   # a saved model's mmcl_config["preprocess"]
    >>> results = frozen_feature_evals(model, f"{data}/train-{{000000..000004}}.tar", [f"{data}/val-000000.tar"],
    ...                                preprocess=pre, knn=True, linear=True, num_workers=0)
    >>> [(r["task"], r["dataset"]["name"]) for r in results]
    [('knn', 'digits/val'), ('linear', 'digits/val')]
    """
    def labelled(shards: str) -> dict[str, Any]:
        return labelled_features(model, shards, "kNN and linear probes need", preprocess=preprocess,
                                 batch_size=batch_size, num_workers=num_workers, device=device)

    train = labelled(train_shards)
    out: list[dict[str, Any]] = []
    for shards in test_shards:
        test = labelled(shards)
        skipped = dict(Counter(train["skipped"]) + Counter(test["skipped"]))
        if knn:
            res = knn_classify(train["image"], train["label"], test["image"], test["label"], k, temperature)
            out.append(result("knn", shards, res, k=k, temperature=temperature, skipped=skipped))
        if linear:
            res = linear_probe(train["image"], train["label"], test["image"], test["label"])
            out.append(result("linear", shards, {"top1": res["top1"]}, l2=res["l2"], skipped=skipped))
    return out


def run_evals(model: Any, cfg: Any, preprocess: dict[str, Any],
              device: torch.device | str = "cpu") -> list[dict[str, Any]]:
    """The evaluations an ``EvalConfig`` asks for, as :func:`result` records, with images
    preprocessed as ``preprocess`` says (``DataConfig.preprocess()``); every process calls this."""
    out: list[dict[str, Any]] = []
    if cfg.knn_train_shards and cfg.knn_shards:
        out += frozen_feature_evals(model, cfg.knn_train_shards, list(cfg.knn_shards), preprocess=preprocess,
                                    linear=cfg.linear, k=cfg.knn_k, temperature=cfg.knn_temperature,
                                    batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
    if cfg.zeroshot_shards:
        res = zeroshot(model, cfg.zeroshot_shards, preprocess=preprocess, templates=cfg.templates,
                       classes=cfg.class_names, batch_size=cfg.batch_size, num_workers=cfg.num_workers, device=device)
        out.append(result("zeroshot", cfg.zeroshot_shards, {"top1": res["top1"], "top5": res["top5"]},
                          skipped=res["skipped"]))
    if cfg.retrieval_shards:
        res = retrieval_eval(model, cfg.retrieval_shards, preprocess=preprocess, batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers, device=device)
        metrics = {k: v for k, v in res.items() if k not in ("n", "skipped")}
        out.append(result("retrieval", cfg.retrieval_shards, metrics, skipped=res["skipped"]))
    return out
