"""Saving and loading for models described entirely by one config dataclass.

Such a model registers its class as the builder (``@register("model", name, Config)`` on the
class), so the Hub loader finds it by the saved ``model_name`` with no list to extend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from mmcl.config import from_dict, to_dict


class SavedModel(nn.Module):
    """``model.safetensors`` plus the config that rebuilds the architecture; subclasses set
    ``config_cls`` and keep their config in ``self.cfg``."""

    config_cls: type
    cfg: Any
    feature_dim: int

    def save_files(self, folder: Path, preprocess: dict[str, Any]) -> dict[str, Any]:
        """Write ``model.safetensors``; return the config that rebuilds the architecture."""
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  str(folder / "model.safetensors"))
        return {"mmcl_model": to_dict(self.cfg), "feature_dim": self.feature_dim}

    @classmethod
    def load_files(cls, folder: Path, config: dict[str, Any]) -> SavedModel:
        """Rebuild a model written by :meth:`save_files`."""
        from safetensors.torch import load_file

        model = cls(from_dict(cls.config_cls, config["mmcl_model"]))
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
        return model
