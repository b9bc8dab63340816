"""Models loaded by open_clip itself, behind the interface mmcl's evaluations use.

``mmcl eval zeroshot --model hf-hub:org/name`` (or ``local-dir:PATH``) evaluates with open_clip's
own loader, weights and preprocessing values; comparing it with the mmcl-loaded folder checks an
export end to end. (In Python, ``OpenClipModel(name, pretrained=TAG)`` also takes built-in names.)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mmcl.errors import MmclError

PREFIXES = ("hf-hub:", "local-dir:")


def is_open_clip_spec(model: str) -> bool:
    """True for model strings that name an open_clip load (``hf-hub:...``, ``local-dir:...``)."""
    return model.startswith(PREFIXES)


class OpenClipModel(nn.Module):
    """An open_clip model with ``encode_image``/``encode_text`` (normalised), ``tokenizer()`` and
    ``preprocess``: open_clip's preprocessing values in the form evaluations take."""

    def __init__(self, spec: str, pretrained: str | None = None):
        super().__init__()
        import open_clip

        try:
            self.model = open_clip.create_model(spec, pretrained=pretrained)
            self._tokenizer = open_clip.get_tokenizer(spec)
        except (FileNotFoundError, ValueError, RuntimeError, OSError) as e:
            raise MmclError(f"open_clip cannot load {spec!r}: {str(e).splitlines()[0]}") from None
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        self.image_size = size
        self.preprocess: dict[str, Any] = {"image_size": size, "mean": list(cfg["mean"]), "std": list(cfg["std"])}
        self.eval()

    def tokenizer(self) -> Any:
        return self._tokenizer

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image, normalize=True)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens, normalize=True)
