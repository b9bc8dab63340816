"""Zero-shot classification: class names + prompt templates -> text classifier -> accuracy."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mmcl.evaluate.templates import Template, fill
from mmcl.files import png, write_atomic


@torch.no_grad()
def zeroshot_classifier(model: Any, class_names: Sequence[str], templates: Sequence[Template],
                        device: torch.device | str = "cpu") -> torch.Tensor:
    """[D, C] weights: per class, the mean of its normalised prompt embeddings, renormalised."""
    tokenizer = model.tokenizer()
    columns = []
    for name in class_names:
        tokens = tokenizer([fill(t, name) for t in templates])
        tokens = {k: v.to(device) for k, v in tokens.items()} if isinstance(tokens, dict) else tokens.to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(dim=0)
        columns.append(F.normalize(emb, dim=0))
    return torch.stack(columns, dim=1)


def classify(image_features: torch.Tensor, labels: torch.Tensor, classifier: torch.Tensor) -> dict[str, Any]:
    """Top-1, top-5, per-class accuracy and the confusion matrix of ``argmax(features @ classifier)``."""
    logits = image_features.float() @ classifier.float()
    n_classes = classifier.shape[1]
    k = min(5, n_classes)
    topk = logits.topk(k, dim=-1).indices
    pred = topk[:, 0]
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.long)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = (confusion.diag().float() / confusion.sum(1).clamp(min=1).float()).tolist()
    return {"top1": (pred == labels).float().mean().item(),
            "top5": (topk == labels[:, None]).any(dim=-1).float().mean().item(),
            "per_class": per_class, "confusion": confusion.tolist(), "n": int(labels.numel())}


def save_report(result: dict[str, Any], class_names: Sequence[str], out_dir: Path) -> None:
    """Write ``zeroshot.json`` and ``zeroshot_confusion.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**result, "class_names": list(class_names),
              "per_class": dict(zip(class_names, result["per_class"]))}
    write_atomic(out_dir / "zeroshot.json", json.dumps(report, indent=2) + "\n")
    cm = torch.tensor(result["confusion"]).float()
    fig, ax = plt.subplots(figsize=(1 + 0.45 * len(class_names), 1 + 0.4 * len(class_names)))
    ax.imshow(cm / cm.sum(1, keepdim=True).clamp(min=1), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(class_names)), class_names, fontsize=8)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            if cm[i, j] > 0:
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"zero-shot top-1 {result['top1']:.3f} (n={result['n']})")
    fig.tight_layout()
    write_atomic(out_dir / "zeroshot_confusion.png", png(fig, dpi=100))
    plt.close(fig)
