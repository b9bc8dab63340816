"""Towers, heads and model wrappers; importing this registers the built-in models."""

from mmcl.models.clip import ClipModel, ClipModelConfig

__all__ = ["ClipModel", "ClipModelConfig"]
