"""mmcl: contrastive learning (CLIP, SigLIP, SimCLR, MoCo, BYOL, DINO, ...) from WebDataset shards
through Accelerate.

The public API, importable from ``mmcl`` directly (each loaded on first use, so that ``import mmcl``
stays light); ``docs/api.md`` lists it with examples:

- :func:`mmcl.create_model`, :func:`mmcl.create_objective`, :func:`mmcl.fit`, :func:`mmcl.recipe_from`
  (:mod:`mmcl.api`);
- :func:`mmcl.load_recipe`, :class:`mmcl.Trainer`, :func:`mmcl.make_loader`;
- :func:`mmcl.from_pretrained`, :func:`mmcl.save_pretrained`, :func:`mmcl.merge_models` (WiSE-FT),
  :func:`mmcl.write_report`.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> (module, attribute); a name is never a submodule's (``mmcl.train`` is the trainer's module)
_API = {"create_model": ("mmcl.api", "create_model"), "create_objective": ("mmcl.api", "create_objective"),
        "fit": ("mmcl.api", "fit"),
        "recipe_from": ("mmcl.api", "recipe_from"), "load_recipe": ("mmcl.recipe", "load_recipe"),
        "Trainer": ("mmcl.train", "Trainer"), "make_loader": ("mmcl.data", "make_loader"),
        "from_pretrained": ("mmcl.hub", "from_pretrained"), "save_pretrained": ("mmcl.hub", "save_pretrained"),
        "merge_models": ("mmcl.merge", "merge"), "write_report": ("mmcl.report", "write_report")}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """``mmcl.NAME`` for the names of the public API, imported when first used."""
    if name in _API:
        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'mmcl' has no attribute {name!r}")
