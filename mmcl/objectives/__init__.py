"""Contrastive objectives, one module per method family; importing this registers them.

Each objective is an ``nn.Module`` whose ``forward(model_outputs, batch)`` returns
``(loss, metrics)``. Shared pieces (InfoNCE, the cross-process gather) live in ``infonce`` and
``gather``; a new method is one new file here plus one recipe.
"""

from mmcl.objectives.clip import ClipLoss, ClipLossConfig, clip_loss

__all__ = ["ClipLoss", "ClipLossConfig", "clip_loss"]
