"""Caption templates used to describe a labelled image in words (the digits' live in :mod:`mmcl.prompts`,
shared with zero-shot evaluation)."""

from __future__ import annotations

import random

from mmcl.prompts import DIGIT_NAMES, DIGIT_TEMPLATES

__all__ = ["CLASS_TEMPLATES", "DIGIT_NAMES", "DIGIT_TEMPLATES", "PHOTO_TEMPLATES", "caption_for"]

# Templates for sources that only have a class name (image folders).
CLASS_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
)

# Templates for random crops of a named photo (``mmcl-prep photos``): four of CLIP's own ImageNet
# prompts, worded so that any class name fits ("the cup of coffee", "the galaxies"). The manifest
# records them, so zero-shot evaluation can use the captions' own wording as its prompts.
PHOTO_TEMPLATES = (
    "a photo of the {}.",
    "a cropped photo of the {}.",
    "a close-up photo of the {}.",
    "a good photo of the {}.",
)


def caption_for(class_name: str, templates: tuple[str, ...], rng: random.Random) -> str:
    """Fill a randomly chosen template with the class name."""
    return rng.choice(templates).format(class_name)
