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


def create_objective(name: str, *, model: nn.Module | None = None, total_steps: int = 1, **config: Any) -> nn.Module:
    """An objective by its registry name, configured by the keys of a recipe's ``objective`` section:
    an ``nn.Module`` called as ``objective(outputs, batch) -> (loss, metrics)``, where ``outputs`` is
    what the model returned for ``batch``. Objectives that hold copies of the model or heads sized to
    it (MoCo, BYOL, SimSiam, SwAV, DINO, ...) are set up for ``model`` as the trainer sets them up
    (``total_steps`` sets their momentum schedules); call ``objective.after_optimizer_step(step)``
    after each optimizer step for their momentum updates and queues.

    >>> import math, torch
    >>> loss_fn = create_objective("clip")
    >>> image = text = torch.eye(4)   # four matching pairs, orthogonal to each other
    >>> loss, metrics = loss_fn({"image_features": image, "text_features": text, "logit_scale": torch.tensor(2.0)})
    >>> round(loss.item(), 4), round(math.log(1 + 3 * math.exp(-2)), 4)   # pairs score 2, the 3 others 0
    (0.3408, 0.3408)
    >>> model, _, _ = create_model("encoder", backbone={"name": "cnn", "width": 8, "depth": 2},
    ...                             projector={"dims": [32, 16]})
    >>> byol = create_objective("byol", model=model, total_steps=100, predictor={"dims": [32, 16]})
    >>> views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    >>> loss, metrics = byol(model({"views": views}), {"views": views})
    >>> loss.backward(); byol.after_optimizer_step(1)   # after the optimizer: the target follows the model
    """
    import mmcl.objectives  # noqa: F401  (registers the built-in objectives)
    from mmcl.config import from_dict
    from mmcl.registry import build, registered

    objectives = registered("objective")
    if name not in objectives:
        from mmcl.errors import ConfigError

        raise ConfigError(f"unknown objective {name!r}; registered: {', '.join(sorted(objectives))}")
    objective = build("objective", from_dict(objectives[name][0], config, "objective"))
    if model is not None:
        objective.check_model(model)
        objective.setup(model, total_steps)
    return objective


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
    process of an ``accelerate launch``; returns the final model folder. A SIGTERM (preemption, a
    time limit) writes a checkpoint and raises :class:`mmcl.errors.Stopped`; ``resume="latest"``
    goes on from it. Under a launch of several processes the process group stays for what the script
    does next (evaluation, another run); ``torch.distributed.destroy_process_group()`` ends it
    (``mmcl train`` does so when it exits).

    >>> import subprocess, sys, tempfile
    >>> data = tempfile.mkdtemp()   # mmcl-prep digits: 32 px image-caption shards of scikit-learn's digits
    >>> _ = subprocess.run([sys.executable, "-m", "data_prep", "digits", "--out", data], check=True,
    ...                    capture_output=True)
    >>> final = fit({"data": {"train_shards": f"{data}/train-{{000000..000004}}.tar", "image_size": 32,
    ...                       "transform": "digits", "mean": [0.5] * 3, "std": [0.5] * 3, "num_workers": 0},
    ...              "model": {"name": "clip", "open_clip_config": "mmcl-tiny-vit"},
    ...              "objective": {"name": "clip"},
    ...              "run": {"output_dir": f"{data}/run"}},
    ...             ["train.steps=3", "data.batch_size=32", "train.progress=false"])
    mmcl: 1 process on cpu, precision no
    ...
    >>> final.name, sorted(p.name for p in final.glob("*.safetensors"))
    ('final', ['open_clip_model.safetensors'])
    """
    from mmcl.train import Trainer

    return Trainer(recipe_from(recipe, overrides)).fit(resume)
