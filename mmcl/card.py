"""The model card (``README.md``) written beside every saved model, with Hub metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def _metadata(config: dict[str, Any]) -> dict[str, Any]:
    info = config.get("info", {})
    objective = info.get("objective", config["model_name"])
    meta: dict[str, Any] = {"library_name": "mmcl", "license": info.get("license", "apache-2.0"),
                            "tags": sorted({"contrastive-learning", "mmcl", objective, config["model_name"]})}
    if config["model_name"] == "clip":
        meta["pipeline_tag"] = "zero-shot-image-classification"
        if "hf_text" not in config.get("model_cfg", {}):
            meta["tags"].append("open_clip")
    results = []
    for task, metrics in (info.get("eval") or {}).items():
        results.append({"task": {"type": "zero-shot-image-classification" if task == "zeroshot" else task},
                        "dataset": {"name": info.get("eval_dataset", "held-out shards"), "type": task},
                        "metrics": [{"type": k, "value": round(float(v), 4)} for k, v in metrics.items()
                                    if isinstance(v, (int, float))]})
    if results:
        meta["model-index"] = [{"name": info.get("run_name", "mmcl-model"), "results": results}]
    return meta


def render(config: dict[str, Any]) -> str:
    """Card text: YAML front matter, then what the model is, how it was trained and how it scored."""
    info = config.get("info", {})
    lines = ["---", yaml.safe_dump(_metadata(config), sort_keys=False).strip(), "---", "",
             f"# {info.get('run_name', 'mmcl model')}", "",
             f"A `{config['model_name']}` model trained with [mmcl](https://github.com/) "
             f"objective `{info.get('objective', '?')}`.", ""]
    pre = config.get("preprocess", {})
    lines += ["## Model", "", f"- image size {pre.get('image_size')}, mean {pre.get('mean')}, std {pre.get('std')}"]
    mc = config.get("model_cfg", {})
    if mc:
        lines.append(f"- embedding size {mc.get('embed_dim')}")
        if "hf_text" in mc:
            lines.append("- text tower: a Hugging Face transformer (not expressible in open_clip's format; "
                         "load with `mmcl.hub.from_pretrained`)")
        else:
            lines.append("- open_clip towers: loads with `open_clip.create_model_and_transforms('local-dir:PATH')`")
    if info.get("train"):
        lines += ["", "## Training", ""] + [f"- {k}: {v}" for k, v in info["train"].items()]
    if info.get("data"):
        lines += ["", "## Data", ""] + [f"- {k}: {v}" for k, v in info["data"].items()]
    if info.get("eval"):
        lines += ["", "## Evaluation", "", "| task | metric | value |", "|---|---|---|"]
        for task, metrics in info["eval"].items():
            lines += [f"| {task} | {k} | {v:.4f} |" for k, v in metrics.items() if isinstance(v, (int, float))]
    lines += ["", "## Intended use and limits", "",
              "Research on contrastive representation learning. Accuracy reflects the evaluation data "
              "listed above only; check behaviour on your own data before relying on it.", ""]
    return "\n".join(lines)


def write_card(folder: Path, config: dict[str, Any]) -> None:
    """Write ``README.md`` into a model folder."""
    (folder / "README.md").write_text(render(config))
