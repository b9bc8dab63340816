"""Read any image a user might have and turn it into clean RGB bytes, or a reason to skip it.

Every problem is a named reason ("corrupt image", "truncated image", ...), never an exception,
so a shard build counts what it skipped and carries on. The decoder itself, :func:`decode_image`
(with :func:`to_rgb`, :class:`BadImage` and ``MAX_PIXELS``), lives in :mod:`mmcl.decode`, since the
loader reads every shard with it too; it is imported here so these names stay where they were.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmcl.decode import BAD_IMAGE, MAX_PIXELS, TOO_MANY_PIXELS, TRUNCATED_IMAGE, BadImage, decode_image, to_rgb

__all__ = ["BAD_IMAGE", "EMPTY_FILE", "FORMATS", "MANIFEST_REASON", "MAX_PIXELS", "MISSING_CAPTION", "MISSING_FILE",
           "NOT_AN_IMAGE", "TOO_LARGE", "TOO_MANY_PIXELS", "TRUNCATED", "TRUNCATED_IMAGE", "BadImage", "ImageOptions",
           "decode_image", "encode", "image_from_array", "load_image", "to_rgb"]

# Reasons a sample is skipped, shared by every source so the manifest uses one vocabulary.
MISSING_FILE = "missing file"
EMPTY_FILE = "empty file"
NOT_AN_IMAGE = "not an image or corrupt"
TRUNCATED = "truncated image"
TOO_LARGE = "too many pixels (decompression bomb)"
MISSING_CAPTION = "missing or empty caption"

# decode_image's reasons (mmcl.decode) as mmcl-prep's manifest words them.
MANIFEST_REASON = {BAD_IMAGE: NOT_AN_IMAGE, TRUNCATED_IMAGE: TRUNCATED, TOO_MANY_PIXELS: TOO_LARGE}

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
