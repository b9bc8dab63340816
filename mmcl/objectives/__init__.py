"""Contrastive objectives, one module per method; importing this registers them.

Each objective subclasses :class:`~mmcl.objectives.base.Objective`, an ``nn.Module`` whose
``forward(model_outputs, batch)`` returns ``(loss, metrics)``, and declares the data kinds and
model outputs it needs, checked against the recipe's data and model when the recipe loads. Hooks,
called by the trainer (no-ops by default): ``setup(model, total_steps)`` once the model exists
(to size heads and copy momentum targets), and ``after_optimizer_step(step)`` (momentum updates).
Parameters an objective owns (predictor heads) are trained with the model.
Shared pieces (InfoNCE, momentum targets, the key queue) live in ``infonce``, ``momentum`` and
``queue``; the cross-process gathers are :mod:`mmcl.dist`, shared with data and evaluation. A new
method is one new file here plus one recipe (modules here are imported, and so registered,
automatically).
"""

import importlib
import pkgutil

from mmcl.objectives.base import Objective
from mmcl.objectives.clip import ClipLoss, ClipLossConfig, clip_loss

for _module in pkgutil.iter_modules(__path__):  # every module registers its objective on import
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ClipLoss", "ClipLossConfig", "Objective", "clip_loss"]
