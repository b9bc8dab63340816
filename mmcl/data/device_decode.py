"""JPEG decoding and CLIP's crop on the training device (``data.decode: device``).

When the loader's CPUs cannot decode and resize JPEGs as fast as a GPU trains on them, the workers
read only each JPEG's header and draw its crop box; the batch's JPEGs are then decoded together on
the device (nvJPEG through ``torchvision.io.decode_jpeg`` on a GPU), cropped and resized there.

What stays the same as ``data.decode: workers``:

- the crop: drawn in the worker from the sample's seed exactly as ``transform: clip`` draws it
  (``RandomResizedCrop``), so a resumed run is exact and both ways crop the same box; the pixels
  differ only by decoder and resampling round-off (libjpeg-turbo or nvJPEG against Pillow, tensor
  against Pillow antialiasing: ``tests/data/test_device_decode.py`` bounds the difference);
- which samples are skipped, and why: anything other than a plain JPEG (PNG, WebP, a CMYK JPEG, a
  file that does not end with its end-of-image marker, which Pillow may call truncated) is decoded
  in the worker by the recipe's transform, as it would be without this setting; a JPEG whose
  header declares too many pixels is skipped (``too_large``) from the header alone.

A JPEG the device refuses (nvJPEG does not take every file libjpeg does) is decoded on the CPU in
the main process with mmcl's decoder and counted (:attr:`DeviceDecoder.fallbacks`). One whose
header is sound but whose data nothing can decode costs its whole batch, counted (a batch cannot
shrink on one process alone: cross-process gathers need equal sizes).
Evaluation loaders decode in their workers: their speed does not hold up training.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from mmcl.data.stream import Skip
from mmcl.decode import MAX_PIXELS, TOO_MANY_PIXELS, BadImage, decode_image, open_image

log = logging.getLogger(__name__)

# the training transforms whose work the device can do: a random resized crop and nothing else
DEVICE_TRANSFORMS = ("clip",)
_TRAILING = b"\x00\r\n\t "  # padding some writers leave after the end-of-image marker
IN_BATCH_OF_A_BAD_JPEG = "in_batch_of_a_bad_jpeg"  # skipped with a batch a corrupt JPEG spoilt


def jpeg_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """``(height, width)`` of a JPEG the device can decode, from its header; ``None`` for any other
    image (the worker decodes it); :class:`Skip` ``too_large`` when the header declares more than
    ``max_pixels`` pixels.

    >>> import io; from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (40, 30)).save(buf, "JPEG")
    >>> jpeg_size(buf.getvalue(), max_pixels=10_000), jpeg_size(buf.getvalue()[:-100], max_pixels=10_000)
    ((30, 40), None)
    """
    if not data.startswith(b"\xff\xd8") or not data.rstrip(_TRAILING).endswith(b"\xff\xd9"):
        return None
    try:
        img = open_image(data, max_pixels)  # the header only
    except BadImage as e:  # too large: skipped here; anything else the worker's decoder reports
        if e.reason == TOO_MANY_PIXELS:
            raise Skip(TOO_MANY_PIXELS) from None
        return None
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    return img.height, img.width


class ClipCrop:
    """The box ``transform: clip`` crops from an image of a given size, ``[top, left, height,
    width]``: torchvision's ``RandomResizedCrop`` draw, from torch's generator (the sample's seed)."""

    def __init__(self, scale: Sequence[float] = (0.9, 1.0), ratio: Sequence[float] = (3 / 4, 4 / 3)):
        self.scale, self.ratio = [float(s) for s in scale], [float(r) for r in ratio]

    def __call__(self, size: tuple[int, int]) -> torch.Tensor:
        shape_only = torch.empty((), dtype=torch.uint8).expand(1, *size)  # no pixels allocated
        return torch.tensor(RandomResizedCrop.get_params(shape_only, self.scale, self.ratio))


def host_index(values: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """``values`` as a ``long`` tensor on ``device``, made in host memory and, for a GPU, pinned and copied
    without waiting: ``torch.tensor(values, device=cuda)`` copies from pageable memory, which waits."""
    index = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type == "cuda":
        return index.pin_memory().to(device, non_blocking=True)
    return index.to(device)


def drain(device: torch.device | str) -> None:
    """Wait for the work queued on the device's current CUDA stream (nothing elsewhere).

    ``decode_jpeg`` on CUDA writes its outputs from a stream of its own that does not wait for the
    caller's, into memory the caching allocator may just have taken back from tensors that queued
    kernels still read; on H100s nvJPEG's hardware path does the same even on the caller's stream
    (pytorch/vision#9606, meta-pytorch/torchcodec#1634: reductions corrupted in 134 of 200 tries).
    Draining the caller's stream first is the fix those reports measured clean. The decode itself
    already waits for its own stream, so what this costs is the host running ahead of the GPU by
    the rest of a step; ``benchmarks/device_decode_check.py`` checks it on a GPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


class DeviceDecoder:
    """Decode a batch's JPEGs on the device, crop each to its box and resize it to ``size`` (bilinear,
    antialiased, as ``RandomResizedCrop`` does); the images the workers decoded keep their places."""

    def __init__(self, size: int, max_pixels: int = MAX_PIXELS):
        self.size, self.max_pixels = size, max_pixels
        self.fallbacks = 0  # JPEGs the device refused, decoded on the CPU instead

    def decode(self, data: list[torch.Tensor], device: torch.device | str) -> list[torch.Tensor | str]:
        """``uint8 [3, H, W]`` images on ``device``: all at once, else one by one, a refused one by
        Pillow on the CPU; the reason (``bad_image``, ``truncated_image``) for one nothing decodes."""
        drain(device)
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            return [self._one(d, device) for d in data]

    def _one(self, data: torch.Tensor, device: torch.device | str) -> torch.Tensor | str:
        drain(device)
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            try:
                image = TF.pil_to_tensor(decode_image(data.numpy().tobytes(), self.max_pixels)).to(device)
            except BadImage as bad:
                return bad.reason
            self.fallbacks += 1
            if self.fallbacks == 1:
                log.warning("a JPEG the device cannot decode (%s) was decoded on the CPU; later ones are only counted",
                            str(e).strip().splitlines()[-1][:200])
            return image

    def __call__(self, jpegs: dict[str, Any], decoded: torch.Tensor | None,
                 device: torch.device | str) -> tuple[torch.Tensor | None, Counter[str]]:
        """The batch's ``uint8 [B, 3, size, size]`` images, and what was skipped. ``jpegs`` holds the JPEGs'
        ``bytes`` end to end with the ``ends`` of each, their ``crop`` boxes and their places ``at``;
        ``decoded`` (already on ``device``) fills the other places. A JPEG that passed its header check
        but that neither the device nor Pillow can decode (its data corrupt) cannot leave a hole in a
        batch whose size every process shares: the whole batch is skipped instead (``None``), counted
        as ``in_batch_of_a_bad_jpeg``."""
        at = jpegs["at"]
        n = len(at) + (0 if decoded is None else len(decoded))
        ends = jpegs["ends"].tolist()
        images = self.decode([jpegs["bytes"][a:b] for a, b in zip([0, *ends[:-1]], ends)], device)
        bad = Counter(img for img in images if isinstance(img, str))
        if bad:
            return None, bad + Counter({IN_BATCH_OF_A_BAD_JPEG: n - sum(bad.values())})
        out = torch.empty(n, 3, self.size, self.size, dtype=torch.uint8, device=device)
        if decoded is not None and len(decoded):
            out[host_index(sorted(set(range(n)) - set(at)), device)] = decoded
        for i, img, (top, left, h, w) in zip(at, images, jpegs["crop"].tolist()):
            out[i] = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        return out, Counter()
