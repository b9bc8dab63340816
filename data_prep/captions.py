"""Caption templates used to describe a labelled image in words."""

from __future__ import annotations

import random

# Templates for sources that only have a class name (image folders, digits).
CLASS_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
    "a close-up photo of the {}.",
)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DIGIT_TEMPLATES = (
    "a handwritten digit {}",
    "the number {}, written by hand",
    "a scanned image of a handwritten {}",
    "a blurry low-resolution {}",
    "handwriting of the digit {}",
    "a pixelated handwritten number {}",
)


def caption_for(class_name: str, templates: tuple[str, ...], rng: random.Random) -> str:
    """Fill a randomly chosen template with the class name."""
    return rng.choice(templates).format(class_name)
