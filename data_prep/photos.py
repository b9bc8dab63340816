"""Real photographs that installed packages ship, cut into many random crops: image-text samples
at a realistic resolution (224 px JPEG by default), built offline, for GPU throughput benchmarks.

The digits are 8x8 images: upscaled to 224 px they are smooth, compress to a third of a photo and
decode faster than photographs, so they under-load a GPU data pipeline. These samples are
crops of real photos: scikit-learn's two sample images always, and the colour photos that the
scikit-image wheel ships when scikit-image is installed (``pip install 'mmcl[photos]'``; the
images scikit-image downloads on first use are left out, so the build never needs a network).

Each sample is a random crop (position, area ``--min-scale``..1 of the photo, aspect ratio 3/4..4/3,
as torchvision's RandomResizedCrop draws them) resized to ``size`` x ``size``, flipped left-right
half of the time, with a caption naming its photo ("a photo of the flower.") and the photo's index
as its label, so zero-shot classification over the photos is a sanity check of a trained model.
The train and test splits are different crops of the same photos: they overlap in content, so
test accuracy says that training worked, not how well a model generalises.

Every crop's parameters are drawn in the main process from one seeded generator, and only those
parameters travel to the worker processes that cut, resize and encode the pixels: a build is the
same bytes for a seed whatever the number of workers.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_prep.captions import PHOTO_TEMPLATES, caption_for
from data_prep.writer import Record
from mmcl.errors import DataError

# (photo, class name) per source. scikit-image's are the colour photographs its wheel ships
# (checked with scikit-image 0.26; lily, eagle, skin and the other downloaded images are not).
PHOTOS: dict[str, tuple[tuple[str, str], ...]] = {
    "sklearn": (("china.jpg", "pagoda"), ("flower.jpg", "flower")),
    "skimage": (
        ("astronaut", "astronaut"),
        ("chelsea", "cat"),
        ("coffee", "cup of coffee"),
        ("rocket", "rocket"),
        ("stereo_motorcycle", "motorcycle"),
        ("hubble_deep_field", "galaxies"),
        ("immunohistochemistry", "stained tissue"),
        ("retina", "retina"),
    ),
}
SOURCES = tuple(PHOTOS)
SKIMAGE_MISSING = "scikit-image is not installed (pip install 'mmcl[photos]' adds its 8 photos)"

SOURCE_SIDE = 640  # photos are shrunk to this longer side (or twice --size, if larger) before cropping
RATIO = (3 / 4, 4 / 3)  # crop aspect ratios, as RandomResizedCrop
SPLITS = ("train", "test")


@dataclass(frozen=True)
class Photo:
    """One source photograph, its class name and its size after :func:`photo_image` shrank it."""

    source: str
    name: str
    class_name: str
    width: int
    height: int

    @property
    def key(self) -> str:
        """``source/name``, as samples' ``source`` field names their photo."""
        return f"{self.source}/{self.name}"


def _read(source: str, name: str) -> np.ndarray:
    """The photo as the package ships it, a uint8 (H, W, 3) array."""
    if source == "sklearn":
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)
    import skimage.data

    arr = getattr(skimage.data, name)()
    return arr[0] if isinstance(arr, tuple) else arr  # stereo_motorcycle: (left, right, disparity)


@functools.cache
def photo_image(source: str, name: str, max_side: int) -> Image.Image:
    """A photo as an RGB image whose longer side is at most ``max_side`` (Lanczos).

    Cached, so a build reads each photo once; worker processes forked after the main process
    loaded them share the decoded images. Shrinking the two large ones (retina, 1411 px; the
    Hubble deep field, 1000 px) to the others' size keeps every crop's resize about as cheap.
    """
    img = Image.fromarray(np.ascontiguousarray(_read(source, name))).convert("RGB")
    if max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    return img


def source_side(size: int) -> int:
    """The longer side photos are shrunk to before cropping, for an output side of ``size``."""
    return max(SOURCE_SIDE, 2 * size)


def load_photos(sources: Sequence[str], size: int, *,
                explicit: bool = False) -> tuple[list[Photo], list[str]]:
    """The photos of ``sources`` that load here, and a note for each one left out.

    scikit-image missing is a note (its photos are left out) unless ``explicit`` (the user
    asked for ``--source skimage``): then it is a :class:`DataError`. So is finding no photo.
    """
    unknown = [s for s in sources if s not in PHOTOS]
    if unknown:
        raise DataError(f"unknown photo source {unknown[0]!r}; the sources are {', '.join(SOURCES)}")
    photos: list[Photo] = []
    notes: list[str] = []
    for source in sources:
        if source == "skimage":
            try:
                import skimage.data  # noqa: F401
            except ImportError:
                if explicit:
                    raise DataError(f"--source skimage: {SKIMAGE_MISSING}") from None
                notes.append(f"skimage photos left out: {SKIMAGE_MISSING}")
                continue
        for name, class_name in PHOTOS[source]:
            try:
                img = photo_image(source, name, source_side(size))
            except Exception as e:  # a file a repackaged scikit-image left out (it would download it)
                notes.append(f"{source}/{name} left out: it does not load offline ({type(e).__name__}: {e})")
                continue
            photos.append(Photo(source, name, class_name, img.width, img.height))
    if not photos:
        raise DataError(f"no photo of {', '.join(sources)} loads here"
                        + (f" ({'; '.join(notes)})" if notes else ""))
    return photos, notes


def crop_box(rng: random.Random, width: int, height: int, min_scale: float,
             ratio: tuple[float, float] = RATIO) -> tuple[int, int, int, int]:
    """A random ``(left, top, right, bottom)`` crop: area ``min_scale``..1 of the image, aspect
    ratio in ``ratio`` (log-uniform), random position; torchvision's RandomResizedCrop draw, with
    its fallback (the largest centred crop of an allowed ratio) after ten misses. Only
    ``rng.random()`` is used, whose sequence Python keeps the same across versions."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * (min_scale + (1 - min_scale) * rng.random())
        aspect = math.exp(log_lo + (log_hi - log_lo) * rng.random())
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x, y = int(rng.random() * (width - w + 1)), int(rng.random() * (height - h + 1))
            return x, y, x + w, y + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x, y = (width - w) // 2, (height - h) // 2
    return x, y, x + w, y + h


@dataclass(frozen=True)
class PhotoCrop:
    """One sample's pixels, as parameters: cut, resized and flipped when called (in the worker
    process that encodes the sample), so only these few numbers are pickled."""

    source: str
    name: str
    box: tuple[int, int, int, int]
    flip: bool
    size: int

    def __call__(self) -> np.ndarray:
        """The crop as a ``size`` x ``size`` x 3 uint8 array: bilinear with antialiasing, as
        torchvision's RandomResizedCrop resizes (bicubic costs half as much again)."""
        img = photo_image(self.source, self.name, source_side(self.size))
        out = img.resize((self.size, self.size), Image.Resampling.BILINEAR, box=self.box)
        if self.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)


def split_sizes(samples: int, test_fraction: float) -> dict[str, int]:
    """Samples per split: ``round(samples * test_fraction)`` test, the rest train; both at least 1."""
    n_test = round(samples * test_fraction)
    if not 0 < n_test < samples:
        raise DataError(f"{samples} x {test_fraction} rounds to {n_test} test samples of {samples}, which leaves "
                        "a split empty; give more samples or another test fraction")
    return {"train": samples - n_test, "test": n_test}


def photos_records(photos: Sequence[Photo], samples: int, *, size: int = 224, test_fraction: float = 0.1,
                   min_scale: float = 0.25, flip: bool = True,
                   seed: int = 0) -> tuple[dict[str, list[Record]], list[str]]:
    """Records of the train and test splits, and the class names (one per photo, in order).

    Each split's labels are balanced (every photo ``n // len(photos)`` or one more times) and
    shuffled; ids run on from train into test, so they are unique across the dataset.
    """
    sizes = split_sizes(samples, test_fraction)
    rng = random.Random(seed)
    out: dict[str, list[Record]] = {}
    next_id = 0
    for split in SPLITS:
        labels = [i % len(photos) for i in range(sizes[split])]
        rng.shuffle(labels)
        recs = []
        for label in labels:
            p = photos[label]
            box = crop_box(rng, p.width, p.height, min_scale)
            flipped = flip and rng.random() < 0.5
            recs.append(Record(sample_id=next_id, images={"image": PhotoCrop(p.source, p.name, box, flipped, size)},
                               caption=caption_for(p.class_name, PHOTO_TEMPLATES, rng), label=label,
                               class_name=p.class_name, source=p.key, extra={"crop": list(box), "flip": flipped}))
            next_id += 1
        out[split] = recs
    return out, [p.class_name for p in photos]


def describe(photos: Sequence[Photo], notes: Sequence[str], **settings: Any) -> dict[str, Any]:
    """The manifest's ``source`` entry: the settings, the photos used (size after shrinking), the
    caption templates (usable as zero-shot prompts) and what was left out."""
    return {"type": "photos", **settings, "templates": list(PHOTO_TEMPLATES),
            "photos": [{"source": p.source, "name": p.name, "class_name": p.class_name, "width": p.width,
                        "height": p.height} for p in photos],
            "left_out": list(notes)}
