"""Image transforms by name: evaluation, CLIP training, and multi-view augmentation sets.

Each builder takes the output size, the normalisation and its own keyword parameters, so a
recipe says ``transform: simclr`` plus overrides in ``transform_args`` and nothing else. A builder
maps a PIL image to a ``uint8`` ``[C, H, W]`` tensor (its augmentations, then ``T.ToImage()``);
:class:`Normalize` turns that into the float input of a model (scale to [0, 1], colour space,
mean/std), in the loader's workers or, for whole batches, on the device (``data.normalize``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image, ImageFilter
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from mmcl.errors import ConfigError

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

Transform = Callable[[Any], torch.Tensor]
_BUILDERS: dict[str, Callable[..., Transform]] = {}


def register_transform(name: str) -> Callable[[Callable[..., Transform]], Callable[..., Transform]]:
    """Decorator adding a transform builder under ``name``."""

    def wrap(fn: Callable[..., Transform]) -> Callable[..., Transform]:
        _BUILDERS[name] = fn
        return fn

    return wrap


def transform_names() -> list[str]:
    """The registered transform names, sorted: what ``data.transform``, ``data.view_transforms`` and
    ``data.multi_crop.local_transform`` may name (checked when a recipe loads)."""
    return sorted(_BUILDERS)


def _finish(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> list[Any]:
    """The last step of every builder: the augmented PIL image as a ``uint8`` tensor."""
    return [T.ToImage()]


_CONSTANTS: dict[tuple[Any, ...], torch.Tensor] = {}


def constant(values: Any, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """``values`` (numbers, or nested lists of them) as a tensor of ``like``'s dtype and device, reshaped
    to ``shape``, made once per values, device and dtype. A tensor made from Python data on a GPU is a
    copy from pageable host memory, for which the host waits on the device: done at every call it would
    stall each training step (``data.normalize: device``, colour conversion on the device)."""
    frozen = _freeze(values)
    key = (frozen, shape, like.device, like.dtype)
    t = _CONSTANTS.get(key)
    if t is None:
        t = torch.tensor(values, dtype=like.dtype, device=like.device)
        _CONSTANTS[key] = t = t if shape is None else t.reshape(shape)
    return t


def _freeze(values: Any) -> Any:
    return tuple(_freeze(v) for v in values) if isinstance(values, (list, tuple)) else float(values)


class Normalize:
    """``uint8`` images (``[..., C, H, W]``, one image or a batch, on any device) to a model's float
    input: scaled to [0, 1], converted to ``colour`` (``rgb`` as is, ``lab``, ``ycbcr``), then
    ``(x - mean) / std``. The same operations in a worker or on a GPU, so the two give one result."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...], colour: str = "rgb"):
        if colour != "rgb" and colour not in COLOUR_SPACES:
            raise ConfigError(f"unknown colour space {colour!r}; available: rgb, {', '.join(sorted(COLOUR_SPACES))}")
        self.mean, self.std, self.colour = list(mean), list(std), colour

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = TF.to_dtype(x, torch.float32, scale=True)
        if self.colour != "rgb":
            x = COLOUR_SPACES[self.colour](x)
        if x.ndim < 3 or not all(self.std):  # torchvision's normalize, its checks and its operations, with
            return TF.normalize(x, self.mean, self.std)  # mean and std made once per device (see constant)
        return x.sub(constant(self.mean, x, (-1, 1, 1))).div_(constant(self.std, x, (-1, 1, 1)))


class RandomGaussianBlur(torch.nn.Module):
    """Gaussian blur with σ drawn uniformly from ``sigma`` for each image (SimCLR/BYOL's blur).

    PIL images are blurred by ``ImageFilter.GaussianBlur`` (PIL's fast box-filter approximation,
    as lightly and solo-learn do): about 1 ms at 224 px where a 23-tap convolution takes 45 ms and
    makes the loader the bottleneck of a GPU run. Tensors are convolved with a ±4σ kernel. σ comes
    from the torch generator, so the per-sample augmentation seeds still decide it."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        super().__init__()
        self.sigma = (float(sigma[0]), float(sigma[1]))

    def forward(self, img: Any) -> Any:
        s = float(torch.empty(1).uniform_(*self.sigma))
        if isinstance(img, Image.Image):
            return img.filter(ImageFilter.GaussianBlur(radius=s))
        k = 2 * math.ceil(4 * s) + 1
        return TF.gaussian_blur(img, [k, k], [s, s])


class CapAspect(torch.nn.Module):
    """Crop the middle of an image longer than ``max_ratio`` times its short side down to that length.

    Resizing the short side of a 1 x 100,000 px banner to 224 px would make a 224 x 22,400,000 px
    intermediate (gigabytes in a loader worker) of which the centre crop keeps one square; this
    crop keeps that square and a wide margin. Images within the ratio (every real photograph,
    panoramas included) are untouched; the others give the same centre crop to within resampling
    differences, and at most a ``size`` x ``max_ratio * size`` intermediate."""

    def __init__(self, max_ratio: float = 32.0):
        super().__init__()
        self.max_ratio = max_ratio

    def forward(self, img: Any) -> Any:
        w, h = TF.get_size(img)[::-1]
        limit = math.ceil(min(w, h) * self.max_ratio)
        if max(w, h) <= limit:
            return img
        if w > h:
            return TF.crop(img, 0, (w - limit) // 2, h, limit)
        return TF.crop(img, (h - limit) // 2, 0, limit, w)


@register_transform("eval")
def eval_transform(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Transform:
    """Resize the short side (bicubic) and centre-crop: open_clip's test-time preprocessing (very
    elongated images, beyond 32:1, are first cut to 32:1 around their centre, see :class:`CapAspect`)."""
    return T.Compose([CapAspect(), T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
                      T.CenterCrop(size), *_finish(size, mean, std)])


@register_transform("clip")
def clip_train(size: int, mean: tuple[float, ...], std: tuple[float, ...],
               scale: tuple[float, float] = (0.9, 1.0)) -> Transform:
    """open_clip's training transform: a mild random resized crop."""
    return T.Compose([T.RandomResizedCrop(size, scale=tuple(scale), antialias=True), *_finish(size, mean, std)])


@register_transform("digits")
def digits_train(size: int, mean: tuple[float, ...], std: tuple[float, ...], degrees: float = 15.0,
                 translate: float = 0.1, scale: tuple[float, float] = (0.85, 1.1),
                 crop_scale: tuple[float, float] = (0.7, 1.0)) -> Transform:
    """Small-image augmentation for digits: affine jitter and a crop, no flips (6 is not 9)."""
    return T.Compose([
        T.RandomAffine(degrees, translate=(translate, translate), scale=tuple(scale)),
        T.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=(0.8, 1.25), antialias=True),
        *_finish(size, mean, std),
    ])


@register_transform("simclr")
def simclr(size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_scale: tuple[float, float] = (0.08, 1.0),
           flip: float = 0.5, jitter: float = 0.8, strength: float = 1.0, grayscale: float = 0.2,
           blur: float = 0.5, solarize: float = 0.0) -> Transform:
    """SimCLR's augmentation set (crop, flip, colour jitter, grayscale, blur, optional solarize)."""
    s = strength
    steps: list[Any] = [
        T.RandomResizedCrop(size, scale=tuple(crop_scale), antialias=True),
        T.RandomHorizontalFlip(flip),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=jitter),
        T.RandomGrayscale(grayscale),
        T.RandomApply([RandomGaussianBlur((0.1, 2.0))], p=blur),
    ]
    if solarize > 0:
        steps.append(T.RandomSolarize(128, p=solarize))
    return T.Compose(steps + _finish(size, mean, std))


@register_transform("byol1")
def byol_view1(size: int, mean: tuple[float, ...], std: tuple[float, ...], **kwargs: Any) -> Transform:
    """BYOL's first view: SimCLR's set with blur always applied and no solarization."""
    return simclr(size, mean, std, **{"blur": 1.0, "solarize": 0.0, **kwargs})


@register_transform("byol2")
def byol_view2(size: int, mean: tuple[float, ...], std: tuple[float, ...], **kwargs: Any) -> Transform:
    """BYOL's second view: blur with probability 0.1 and solarization with probability 0.2."""
    return simclr(size, mean, std, **{"blur": 0.1, "solarize": 0.2, **kwargs})


@register_transform("digits_ssl")
def digits_ssl(size: int, mean: tuple[float, ...], std: tuple[float, ...], crop_scale: tuple[float, float] = (0.4, 1.0),
               degrees: float = 20.0, translate: float = 0.15, scale: tuple[float, float] = (0.8, 1.1),
               jitter: float = 0.8, strength: float = 0.4, blur: float = 0.3) -> Transform:
    """The small-image SimCLR variant for digits: crop, affine jitter (rotation, shift, scale),
    brightness/contrast jitter and light blur; no flips or hue changes (6 is not 9, digits are grey)."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
    return T.Compose([
        T.RandomResizedCrop(size, scale=tuple(crop_scale), ratio=(0.75, 1.33), antialias=True),
        T.RandomAffine(degrees, translate=(translate, translate), scale=tuple(scale)),
        T.RandomApply([T.ColorJitter(strength, strength)], p=jitter),
        T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 1.0))], p=blur),
        *_finish(size, mean, std),
    ])


_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
_WHITE = (0.950456, 1.0, 1.088754)
_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def srgb_to_lab(x: torch.Tensor) -> torch.Tensor:
    """sRGB in [0, 1] ([..., 3, H, W]) to CIE L*a*b* (D65), scaled to about [0, 1]:
    ``L / 100``, ``(a + 128) / 255``, ``(b + 128) / 255``."""
    lin = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,...jhw->...ihw", constant(_XYZ, x), lin) / constant(_WHITE, x, (-1, 1, 1))
    f = torch.where(xyz > 0.008856, xyz.clamp(min=1e-12) ** (1 / 3), 7.787 * xyz + 16 / 116)
    fx, fy, fz = f.unbind(-3)
    lab = torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)
    return (lab + constant((0.0, 128.0, 128.0), x, (-1, 1, 1))) / constant((100.0, 255.0, 255.0), x, (-1, 1, 1))


def rgb_to_ycbcr(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 1] ([..., 3, H, W]) to full-range YCbCr in [0, 1] (JPEG's, as PIL's ``"YCbCr"``)."""
    return torch.einsum("ij,...jhw->...ihw", constant(_YCBCR, x), x) + constant((0.0, 0.5, 0.5), x, (-1, 1, 1))


COLOUR_SPACES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"lab": srgb_to_lab, "ycbcr": rgb_to_ycbcr}


def build_transform(name: str, size: int, mean: tuple[float, ...] = OPENAI_MEAN,
                    std: tuple[float, ...] = OPENAI_STD, colour: str = "rgb", *, normalize: bool = True,
                    **kwargs: Any) -> Transform:
    """Build the transform registered as ``name``: with ``normalize`` it returns the model's float
    input (see :class:`Normalize`: ``colour`` ``lab`` or ``ycbcr`` converts after augmentation and
    before ``mean``/``std``), without it the augmented ``uint8`` image, to be normalised later."""
    if name not in _BUILDERS:
        raise ConfigError(f"unknown transform {name!r}; available: {', '.join(sorted(_BUILDERS))}")
    norm = Normalize(mean, std, colour)
    try:
        augment = _BUILDERS[name](size, tuple(mean), tuple(std), **kwargs)
    except TypeError as e:
        raise ConfigError(f"transform {name!r}: {e}") from None
    return T.Compose([augment, norm]) if normalize else augment
