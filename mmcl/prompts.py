"""Words for the built-in digits: the captions ``mmcl-prep`` writes for them and the ``digits``
prompt set zero-shot evaluation reads, kept in one place so the two always match."""

from __future__ import annotations

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

DIGIT_TEMPLATES = (
    "a handwritten digit {}",
    "the number {}, written by hand",
    "a scanned image of a handwritten {}",
    "a blurry low-resolution {}",
    "handwriting of the digit {}",
    "a pixelated handwritten number {}",
)
