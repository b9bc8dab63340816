"""mmcl from Python, without YAML files: build a model with its preprocessing and tokenizer, train
from a recipe given as a dict, and the rest of the public API (re-exported as ``mmcl.NAME``; the
list with examples is ``docs/api.md``)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from torch import nn


def create_model(name: str = "clip", *, image_size: int | None = None, mean: Iterable[float] | None = None,
                 std: Iterable[float] | None = None, **config: Any) -> tuple[nn.Module, Callable, Callable | None]:
    """A model by its registry name, configured by the keys of a recipe's ``model`` section, with the
    evaluation preprocessing of its images (PIL image -> normalised tensor, at ``image_size``: the
    model's own for CLIP, else 224) and, for image-text models, its tokenizer (list of str -> token
    ids). The model starts as the config says: from scratch, or ``pretrained`` weights.

    >>> import torch
    >>> from PIL import Image
    >>> model, preprocess, tokenizer = create_model("clip", open_clip_config="mmcl-tiny-vit")
    >>> image = preprocess(Image.new("RGB", (40, 30))).unsqueeze(0)
    >>> image.shape
    torch.Size([1, 3, 32, 32])
    >>> with torch.no_grad():
    ...     model.encode_image(image).shape, model.encode_text(tokenizer(["a handwritten digit"])).shape
    (torch.Size([1, 64]), torch.Size([1, 64]))
    >>> encoder, preprocess, tokenizer = create_model("encoder", backbone={"name": "cnn", "width": 8}, image_size=32)
    >>> tokenizer is None, encoder.encode_image(preprocess(Image.new("RGB", (32, 32))).unsqueeze(0)).shape[0]
    (True, 1)
    """
    import mmcl.models  # noqa: F401  (registers the built-in models)
    from mmcl.config import from_dict
    from mmcl.data.transforms import OPENAI_MEAN, OPENAI_STD, build_transform
    from mmcl.registry import build, registered

    models = registered("model")
    if name not in models:
        from mmcl.errors import ConfigError

        raise ConfigError(f"unknown model {name!r}; registered: {', '.join(sorted(models))}")
    model = build("model", from_dict(models[name][0], config, "model"))
    size = image_size or getattr(model, "image_size", 224)
    preprocess = build_transform("eval", size, tuple(mean or OPENAI_MEAN), tuple(std or OPENAI_STD))
    tokenizer = model.tokenizer() if hasattr(model, "tokenizer") else None
    return model, preprocess, tokenizer


def recipe_from(recipe: str | Path | dict[str, Any], overrides: Iterable[str] = ()) -> Any:
    """A validated :class:`~mmcl.recipe.Recipe` from a YAML file or a dict shaped as one, with
    ``key=value`` overrides as ``--set`` takes them.

    >>> r = recipe_from({"data": {"train_shards": "shards/train-{000000..000009}.tar"},
    ...                  "model": {"name": "clip", "open_clip_config": "mmcl-tiny-vit"},
    ...                  "objective": {"name": "clip"}}, ["data.image_size=32", "train.steps=5"])
    >>> r.train.steps, r.data.batch_size, type(r.objective).__name__
    (5, 256, 'ClipLossConfig')
    """
    from mmcl import config as C
    from mmcl.recipe import Recipe, load_recipe

    if isinstance(recipe, dict):
        return C.from_dict(Recipe, C.apply_overrides(copy.deepcopy(recipe), list(overrides)))
    return load_recipe(recipe, list(overrides))


def fit(recipe: str | Path | dict[str, Any], overrides: Iterable[str] = (), resume: str | None = None) -> Path:
    """Train a recipe (a YAML file or a dict, see :func:`recipe_from`) in this process, or in every
    process of an ``accelerate launch``; returns the final model folder."""
    from mmcl.train import Trainer

    return Trainer(recipe_from(recipe, overrides)).fit(resume)
