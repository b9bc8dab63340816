"""WiSE-FT (Wortsman et al., 2022, "Robust fine-tuning of zero-shot models"): the weights of a
fine-tuned model interpolated with those it started from, ``(1 - alpha) * zero_shot + alpha *
fine_tuned``. A fine-tuned CLIP loses some of its zero-shot robustness; a point between the two
often keeps most of both. ``mmcl merge`` writes the interpolated model as a model folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmcl.errors import MmclError
from mmcl.hub import from_pretrained, save_pretrained


def starting_weights(config: dict[str, Any]) -> nn.Module:
    """The model a run started from, rebuilt from the recipe saved with its final folder: the weights
    its ``model.pretrained``, ``local-dir:`` or ``hf-hub:`` source gives (a run from scratch has no
    zero-shot model to go back to)."""
    from mmcl.config import from_dict
    from mmcl.recipe import Recipe
    from mmcl.registry import build

    info = config.get("info", {})
    starts = info.get("starts_from") or {}
    if not starts or all(source == "scratch" for source in starts.values()):
        raise MmclError("the fine-tuned model started from scratch (random weights): there is no zero-shot model "
                        "to interpolate with; pass --zero-shot MODEL")
    recipe = from_dict(Recipe, info["recipe"])
    return build("model", recipe.model)


def interpolate(zero_shot: nn.Module, fine_tuned: nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * zero_shot + alpha * fine_tuned`` for every floating-point tensor of the state
    (others, such as counters, are the fine-tuned model's); the two must have the same tensors."""
    a, b = zero_shot.state_dict(), fine_tuned.state_dict()
    if a.keys() != b.keys():
        only_a, only_b = sorted(a.keys() - b.keys())[:3], sorted(b.keys() - a.keys())[:3]
        raise MmclError(f"the two models hold different weights (only in the zero-shot model: {only_a}; only in "
                        f"the fine-tuned one: {only_b})")
    shapes = [k for k in a if a[k].shape != b[k].shape]
    if shapes:
        raise MmclError(f"the two models' weights differ in shape: {shapes[0]} is {tuple(a[shapes[0]].shape)} and "
                        f"{tuple(b[shapes[0]].shape)}")
    return {k: torch.lerp(a[k].float(), b[k].float(), alpha).to(b[k].dtype) if b[k].is_floating_point() else b[k]
            for k in b}


def merge(fine_tuned: str | Path, out: str | Path, alpha: float, zero_shot: str | Path | None = None) -> Path:
    """Write to ``out`` the fine-tuned model (an mmcl model folder or Hub repo) interpolated with the
    zero-shot model (another, or by default the weights the fine-tuned run started from) at
    ``alpha`` (0: zero-shot, 1: fine-tuned). Its card records the two and ``alpha``; evaluation
    results are not carried over (evaluate the merged model).

    >>> import tempfile, torch, mmcl
    >>> pre, tmp = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}, tempfile.mkdtemp()
    >>> start, _, _ = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")
    >>> tuned, _, _ = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")   # stands for a fine-tuned one
    >>> a = mmcl.save_pretrained(start, f"{tmp}/zero-shot", name="clip", preprocess=pre)
    >>> b = mmcl.save_pretrained(tuned, f"{tmp}/fine-tuned", name="clip", preprocess=pre)
    >>> merged = mmcl.from_pretrained(merge(b, f"{tmp}/wise-0.5", alpha=0.5, zero_shot=a))
    >>> proj = lambda m: m.state_dict()["clip.visual.proj"]
    >>> torch.allclose(proj(merged), (proj(start) + proj(tuned)) / 2)   # halfway, weight by weight
    True
    """
    if not 0 <= alpha <= 1:
        raise MmclError(f"--alpha must be in [0, 1] (0: the zero-shot model, 1: the fine-tuned one), got {alpha}")
    tuned = from_pretrained(fine_tuned)
    config = tuned.mmcl_config
    start = from_pretrained(zero_shot) if zero_shot is not None else starting_weights(config)
    tuned.load_state_dict(interpolate(start, tuned, alpha))
    info = {k: v for k, v in config.get("info", {}).items() if k not in ("eval", "parameters")}
    source = str(zero_shot) if zero_shot is not None else ", ".join(sorted(set(info.get("starts_from", {}).values())))
    info["merged"] = {"method": "WiSE-FT weight interpolation", "zero_shot": source, "fine_tuned": str(fine_tuned),
                      "alpha": alpha}
    return save_pretrained(tuned, out, name=config["model_name"], preprocess=config["preprocess"], info=info)
