"""The model card (``README.md``) of a saved model: Hub metadata, then a readable summary.

Everything comes from ``mmcl_config.json``: architecture, recipe, data, training time and the
latest evaluation results (also as ``model-index`` metadata, which the Hub shows as a table).
"""

from __future__ import annotations

from typing import Any

TASK_TYPES = {"zeroshot": "zero-shot-image-classification", "retrieval": "image-text-retrieval",
              "knn": "image-classification", "linear": "image-classification"}
LABELS = {"wall_s": "training time (s)", "lr": "learning rate", "global_batch": "samples per optimizer step",
          "contrastive_batch": "samples per loss (contrastive batch)",
          "bad_steps": "skipped non-finite steps"}
TASK_NAMES = {"zeroshot": "zero-shot classification", "retrieval": "image-text retrieval",
              "knn": "kNN classification (frozen features)", "linear": "linear probe (frozen features)"}


def is_open_clip(config: dict[str, Any]) -> bool:
    """True when open_clip itself can load the folder (CLIP with open_clip towers)."""
    return config["model_name"] == "clip" and "hf_text" not in config.get("model_cfg", {})


def _results(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in config.get("info", {}).get("eval") or [] if isinstance(r, dict) and "task" in r]


def _metric_type(name: str) -> str:
    """The Hub's metric type of one of mmcl's metrics (top1 and top5 are accuracies, R@k recalls)."""
    return "accuracy" if name.startswith("top") else "recall" if "R@" in name else name


def metadata(config: dict[str, Any]) -> Any:
    """The YAML front matter as huggingface_hub's ``ModelCardData`` (with ``EvalResult``), so the Hub
    reads it and its ``to_yaml()`` writes it as huggingface_hub writes cards (names in any script kept
    as they are, not escaped): library, license (``hub.license``), tags, pipeline tag, ``base_model``
    (towers that started from Hub weights), ``datasets`` (a training set prepared from a Hub dataset)
    and the evaluation results as ``model-index``."""
    from huggingface_hub import EvalResult, ModelCardData

    info = config.get("info", {})
    objective = info.get("objective", config["model_name"])
    tags = {"contrastive-learning", "mmcl", objective, config["model_name"]}
    clip = config["model_name"] == "clip"
    if clip:
        tags.add("zero-shot-image-classification")
    base = sorted({s.removeprefix("hf-hub:") for s in (info.get("starts_from") or {}).values()
                   if s.startswith("hf-hub:")})
    source = (info.get("data") or {}).get("source") or {}
    results = [EvalResult(task_type=TASK_TYPES.get(r["task"], r["task"]),
                          task_name=TASK_NAMES.get(r["task"], r["task"]),
                          dataset_type=r["dataset"]["name"].split("/")[0], dataset_name=r["dataset"]["name"],
                          dataset_split=r["dataset"]["name"].split("/")[-1], metric_type=_metric_type(k),
                          metric_name=f"{r['task']} {k}", metric_value=round(float(v), 4))
               for r in _results(config) for k, v in r["metrics"].items()]
    data = ModelCardData(library_name="open_clip" if is_open_clip(config) else "mmcl",
                         license=info.get("license", "apache-2.0"),
                         pipeline_tag="zero-shot-image-classification" if clip else "image-feature-extraction",
                         tags=sorted(tags), base_model=(base[0] if len(base) == 1 else base) or None,
                         datasets=[source["name"]] if source.get("type") == "hf" else None,
                         model_name=info.get("run_name", "mmcl-model") if results else None,
                         eval_results=results or None)
    return data


def _architecture(config: dict[str, Any]) -> list[str]:
    mc = config.get("model_cfg", {})
    pre = config.get("preprocess", {})
    params = config.get("info", {}).get("parameters")
    lines = [f"- parameters: {params:,}" if isinstance(params, int) else "- parameters: ?"]
    if "vision_cfg" in mc:
        v = mc["vision_cfg"]
        lines.append(f"- image tower: open_clip vision transformer, {v.get('layers')} layers × width "
                     f"{v.get('width')}, patch {v.get('patch_size')}" if "patch_size" in v
                     else f"- image tower: open_clip vision tower {v}")
    if "hf_text" in mc:
        lines.append(f"- text tower: Hugging Face `{mc['hf_text'].get('path', '?')}`, "
                     f"{mc['hf_text'].get('pooling')} pooling, {mc['hf_text'].get('proj')} projection"
                     f"{' (locked)' if mc['hf_text'].get('locked') else ''}")
    elif "text_cfg" in mc:
        t = mc["text_cfg"]
        lines.append(f"- text tower: open_clip transformer, {t.get('layers')} layers × width {t.get('width')}, "
                     f"context {t.get('context_length')}, vocabulary {t.get('vocab_size')}")
    if mc.get("embed_dim"):
        lines.append(f"- embedding size: {mc['embed_dim']}")
    colour = f", {pre['colour']} colour space" if pre.get("colour", "rgb") != "rgb" else ""
    lines.append(f"- preprocessing: {pre.get('image_size')} px{colour}, mean {pre.get('mean')}, std {pre.get('std')}")
    if pre.get("view_fields"):
        lines.append(f"- inputs: one image per field {', '.join(pre['view_fields'])}, each to its own encoder")
    return lines


def _usage(config: dict[str, Any], repo_id: str | None) -> list[str]:
    where = repo_id or "PATH/TO/FOLDER"
    lines = ["```python", "from mmcl.hub import from_pretrained", "",
             f'model = from_pretrained("{where}")  # a local folder or a Hub repo id']
    if config["model_name"] == "clip":
        lines += ['tokens = model.tokenizer()(["a photo of a cat"])',
                  "text = model.encode_text(tokens)       # L2-normalised", "```"]
    elif config.get("preprocess", {}).get("view_fields"):
        lines += ["# one batch per image field, in the order of the card's inputs",
                  "features = model.encode_image([images, other_field_images])  # for kNN / linear probes", "```"]
    else:
        lines += ["features = model.encode_image(images)  # frozen features for kNN / linear probes", "```"]
    if is_open_clip(config):
        spec = f"hf-hub:{repo_id}" if repo_id else "local-dir:PATH/TO/FOLDER"
        lines += ["", "The same weights load in open_clip itself:", "", "```python", "import open_clip", "",
                  f'model, _, preprocess = open_clip.create_model_and_transforms("{spec}")',
                  f'tokenizer = open_clip.get_tokenizer("{spec}")', "```"]
    elif config["model_name"] == "clip":
        lines += ["", "The text tower is a Hugging Face transformer, which open_clip's folder format cannot "
                  "express: load this model with mmcl."]
    info = config.get("info", {})
    sub = info.get("transformers")
    if sub:
        where = repo_id or "PATH/TO/FOLDER"
        model = info.get("transformers_class", "CLIPModel")
        processor = "CLIPProcessor" if model == "CLIPModel" else "VisionTextDualEncoderProcessor"
        lines += ["", f"And in transformers (the folder's `{sub}/`):", "", "```python",
                  f"from transformers import {model}, {processor}", "",
                  f'model = {model}.from_pretrained("{where}", subfolder="{sub}")',
                  f'processor = {processor}.from_pretrained("{where}", subfolder="{sub}")', "```"]
        if "init_logit_bias" in config.get("model_cfg", {}):  # a SigLIP model: its bias is in the config
            lines += ["", "SigLIP's pair probabilities: `torch.sigmoid(model.logit_scale.exp() * cosine + "
                      "model.config.logit_bias)`."]
    return lines


def render(config: dict[str, Any], repo_id: str | None = None) -> str:
    """Card text; ``repo_id`` (when pushing) fills in the usage snippets."""
    info = config.get("info", {})
    objective = info.get("objective", "?")
    lines = ["---", metadata(config).to_yaml(), "---", "",
             f"# {info.get('run_name', 'mmcl model')}", "",
             f"A `{config['model_name']}` model trained with the `{objective}` contrastive objective "
             "using mmcl.", "", "## Usage", "", *_usage(config, repo_id), "", "## Model", "", *_architecture(config)]
    train = info.get("train") or {}
    if train:
        lines += ["", "## Training", "", f"- objective: `{objective}`"]
        starts = info.get("starts_from") or {}
        lines += [f"- {tower} tower started from: {source}" for tower, source in starts.items()]
        lines += [f"- {LABELS.get(k, k.replace('_', ' '))}: {v}" for k, v in train.items()]
        if info.get("curves"):
            lines += ["", f"![training curves]({info['curves']})"]
    merged = info.get("merged")
    if merged:
        lines += ["", "## Merged", "", f"{merged['method']}: (1 - alpha) x zero-shot + alpha x fine-tuned weights, "
                  f"alpha {merged['alpha']}.", "", f"- zero-shot: {merged['zero_shot']}",
                  f"- fine-tuned: {merged['fine_tuned']}"]
    data = info.get("data") or {}
    if data:
        lines += ["", "## Data", ""]
        lines += [f"- {k.replace('_', ' ')}: {', '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in data.items() if v not in (None, {}, [])]
    results = _results(config)
    if results:
        lines += ["", "## Evaluation", "", "| task | dataset | samples | metric | value |", "|---|---|---|---|---|"]
        for r in results:
            lines += [f"| {TASK_NAMES.get(r['task'], r['task'])} | {r['dataset']['name']} | "
                      f"{r['dataset'].get('samples') or '?'} | {k} | {float(v):.4f} |" for k, v in r["metrics"].items()]
    lines += ["", "## Intended use and limits", "",
              "For research on contrastive representation learning and as a starting point for fine-tuning. "
              "The figures above hold for the evaluation data named there only; the training data "
              f"({data.get('train_samples', '?')} samples) bounds what the model knows. Check accuracy and "
              "failure modes on your own data before relying on it.", ""]
    return "\n".join(lines)
