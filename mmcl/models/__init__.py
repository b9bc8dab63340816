"""Towers, heads and model wrappers; importing this registers the built-in models."""

from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.models.cpc import CPCModel, CPCModelConfig
from mmcl.models.encoder import EncoderModel, EncoderModelConfig
from mmcl.models.multiview import MultiViewModel, MultiViewModelConfig

__all__ = ["CPCModel", "CPCModelConfig", "ClipModel", "ClipModelConfig", "EncoderModel", "EncoderModelConfig",
           "MultiViewModel", "MultiViewModelConfig"]
