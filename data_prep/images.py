"""Read any image a user might have and turn it into clean RGB bytes, or a reason to skip it.

Every problem is a named reason ("corrupt image", "truncated image", ...), never an exception,
so a shard build counts what it skipped and carries on. :func:`decode_image` is the one decoder:
mmcl-prep converts with it and the loader (``mmcl.data``) reads every shard with it, so shards
from other tools (img2dataset, hand-made tars) give the same pixels as mmcl-prep's would.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

# Reasons a sample is skipped, shared by every source so the manifest uses one vocabulary.
MISSING_FILE = "missing file"
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image or corrupt"
TRUNCATED = "truncated image"
TOO_LARGE = "too many pixels (decompression bomb)"
MISSING_CAPTION = "missing or empty caption"

# Why decode_image refuses an image: short stable names, as the loader counts them ...
BAD_IMAGE, TRUNCATED_IMAGE, TOO_MANY_PIXELS = "bad_image", "truncated_image", "too_large"
# ... and as mmcl-prep's manifest words them.
MANIFEST_REASON = {BAD_IMAGE: NOT_AN_IMAGE, TRUNCATED_IMAGE: TRUNCATED, TOO_MANY_PIXELS: TOO_LARGE}

MAX_PIXELS = 89_478_485  # PIL's own default limit; larger images are skipped
FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class ImageOptions:
    """How images are stored in the shards."""

    fmt: str = "png"  # png | jpg | webp
    quality: int = 95  # JPEG / WebP quality
    max_side: int | None = None  # resize (keeping aspect) so the longer side is at most this
    max_pixels: int = MAX_PIXELS  # larger images are skipped

    @property
    def ext(self) -> str:
        """File extension used inside the shard."""
        return self.fmt


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


def _resize(img: Image.Image, max_side: int | None) -> Image.Image:
    if max_side is None or max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BICUBIC)


def encode(img: Image.Image, opts: ImageOptions) -> bytes:
    """Encode an RGB image in the configured format."""
    buf = io.BytesIO()
    kwargs = {"quality": opts.quality} if opts.fmt in ("jpg", "webp") else {}
    img.save(buf, format=FORMATS[opts.fmt], **kwargs)
    return buf.getvalue()


def decode_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Image bytes to 8-bit RGB (:func:`to_rgb`), or :class:`BadImage` saying why not.

    The pixel count is read from the header before any pixel is decoded, so a small file that
    declares a huge image is refused without allocating it (PIL's own decompression-bomb
    error is the second guard). A truncated image is refused, never padded with grey.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: reads the header only
            if img.width * img.height > max_pixels:
                raise BadImage(TOO_MANY_PIXELS)
            img.load()
            return to_rgb(img)
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(TOO_MANY_PIXELS) from None
    except UnidentifiedImageError:
        raise BadImage(BAD_IMAGE) from None
    except Exception as e:  # PIL's decoders raise many types on corrupt data
        raise BadImage(TRUNCATED_IMAGE if "truncated" in str(e).lower() else BAD_IMAGE) from None


def load_image(source: str | Path | bytes, opts: ImageOptions) -> tuple[bytes | None, str | None]:
    """Return ``(encoded RGB bytes, None)`` or ``(None, reason)`` for a path or raw bytes."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            return None, MISSING_FILE
        data = path.read_bytes()
    else:
        data = source
    if len(data) == 0:
        return None, EMPTY_FILE
    try:
        img = decode_image(data, opts.max_pixels)
    except BadImage as e:
        return None, MANIFEST_REASON[e.reason]
    return encode(_resize(img, opts.max_side), opts), None


def image_from_array(arr: np.ndarray, opts: ImageOptions) -> bytes:
    """Encode an in-memory uint8 array (H, W) or (H, W, 3) as RGB."""
    img = Image.fromarray(np.ascontiguousarray(arr))
    return encode(_resize(to_rgb(img), opts.max_side), opts)
