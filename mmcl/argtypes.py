"""argparse types for ranged options: a value out of range is argparse's one-line usage error
(exit 2, no traceback) that names the option and what is allowed. Used by ``mmcl`` and ``mmcl-prep``."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in ``[low, high]``, else argparse's one-line usage error."""
    if high is None:
        what = "a positive integer" if low == 1 else f"an integer >= {low}"
    else:
        what = f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} (got {text!r})") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {what} (got {text})")
        return value

    return parse


positive_int = integer(1)
non_negative_int = integer(0)


def fraction(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be a number between 0 and 1, exclusive (got {text})")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a number above 0 (got {text})")
    return value
