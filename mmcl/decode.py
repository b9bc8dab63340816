"""The one image decoder: bytes to 8-bit RGB, or a short stable reason to skip the image.

``mmcl-prep`` converts every source image with :func:`decode_image` and the loader
(``mmcl.data``) reads every shard with it, so shards from other tools (img2dataset, hand-made
tars) give the same pixels as mmcl-prep's would. Needs only numpy and Pillow, so ``mmcl-prep``
imports it without torch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Why decode_image refuses an image: short stable names, as the loader counts them.
BAD_IMAGE, TRUNCATED_IMAGE, TOO_MANY_PIXELS = "bad_image", "truncated_image", "too_large"

MAX_PIXELS = 89_478_485  # PIL's own default limit; larger images are skipped


class BadImage(ValueError):
    """An image :func:`decode_image` refuses; ``reason`` is ``bad_image``, ``truncated_image`` or ``too_large``."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert palette, alpha, 16/32-bit, CMYK and grayscale images to 8-bit RGB.

    Transparent pixels (an alpha band, or a palette, grey or RGB image with a transparent
    colour) are composited on white (what a viewer shows); high bit-depth integer images are
    rescaled by their actual range rather than clipped.
    """
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16") and hi <= 255:
            lo, hi = 0.0, 255.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        img = Image.fromarray(np.round(scaled).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


def _reason(e: Exception) -> str:
    """Why Pillow could not open or decode an image, as a skip reason."""
    if isinstance(e, BadImage):
        return e.reason
    if isinstance(e, Image.DecompressionBombError):
        return TOO_MANY_PIXELS
    if isinstance(e, UnidentifiedImageError):
        return BAD_IMAGE
    return TRUNCATED_IMAGE if "truncated" in str(e).lower() else BAD_IMAGE  # PIL's decoders raise many types


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """The image with its header read and no pixel decoded (Pillow opens lazily), or :class:`BadImage`:
    a file that declares more than ``max_pixels`` pixels is refused before anything is allocated
    (PIL's own decompression-bomb error is the second guard)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Exception as e:  # noqa: BLE001 (mapped to a reason)
        raise BadImage(_reason(e)) from None
    if img.width * img.height > max_pixels:
        raise BadImage(TOO_MANY_PIXELS)
    return img


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image bytes to 8-bit RGB (:func:`to_rgb`), or :class:`BadImage` saying why not.

    The pixel count is read from the header first (:func:`open_image`). A truncated image is
    refused, never padded with grey.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    img = open_image(data, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
            return to_rgb(img)
    except Exception as e:  # noqa: BLE001 (mapped to a reason)
        raise BadImage(_reason(e)) from None
