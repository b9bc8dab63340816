"""Towers, heads and model wrappers; importing this registers the built-in models."""

from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.models.encoder import EncoderModel, EncoderModelConfig

__all__ = ["ClipModel", "ClipModelConfig", "EncoderModel", "EncoderModelConfig"]
