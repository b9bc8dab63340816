"""scikit-learn's digits (1,797 labelled 8x8 images) as a small, real, offline dataset.

Splits are stratified and seeded, so every machine builds the same shards. ``test-shifted``
holds the test images under a fixed random affine perturbation, to measure learned invariance.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator

import numpy as np
from PIL import Image

from data_prep.captions import DIGIT_NAMES, DIGIT_TEMPLATES, caption_for
from data_prep.writer import Record
from mmcl.errors import DataError

SPLITS = ("train", "val", "test", "test-shifted")


def upscale(img8: np.ndarray, size: int) -> np.ndarray:
    """Map an 8x8 image with values 0..16 to a ``size`` x ``size`` uint8 image (bicubic)."""
    small = Image.fromarray(np.clip(img8 * (255.0 / 16.0), 0, 255).astype(np.uint8), mode="L")
    return np.asarray(small.resize((size, size), Image.Resampling.BICUBIC))


def edge_map(img: np.ndarray) -> np.ndarray:
    """Sobel gradient magnitude of a uint8 image, rescaled to 0..255: a second "modality" of a
    digit (its strokes' outlines) for multi-view methods such as CMC."""
    x = np.pad(img.astype(np.float32), 1, mode="edge")
    gx = (x[:-2, 2:] + 2 * x[1:-1, 2:] + x[2:, 2:]) - (x[:-2, :-2] + 2 * x[1:-1, :-2] + x[2:, :-2])
    gy = (x[2:, :-2] + 2 * x[2:, 1:-1] + x[2:, 2:]) - (x[:-2, :-2] + 2 * x[:-2, 1:-1] + x[:-2, 2:])
    mag = np.hypot(gx, gy)
    return np.clip(mag * (255.0 / max(float(mag.max()), 1e-6)), 0, 255).astype(np.uint8)


def random_affine(img: np.ndarray, rng: random.Random, *, max_rotate: float = 20.0,
                  max_translate: float = 0.15, scale: tuple[float, float] = (0.8, 1.1)) -> np.ndarray:
    """Rotate (±max_rotate degrees), translate (± fraction of size) and scale an image about its centre."""
    h, w = img.shape[:2]
    angle = math.radians(rng.uniform(-max_rotate, max_rotate))
    s = rng.uniform(*scale)
    tx, ty = rng.uniform(-max_translate, max_translate) * w, rng.uniform(-max_translate, max_translate) * h
    cx, cy = (w - 1) / 2, (h - 1) / 2
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    # PIL wants the inverse map: output (x, y) -> input (a x + b y + c, d x + e y + f).
    a, b, d, e = cos, sin, -sin, cos
    c = cx - a * (cx + tx) - b * (cy + ty)
    f = cy - d * (cx + tx) - e * (cy + ty)
    out = Image.fromarray(img).transform((w, h), Image.Transform.AFFINE, (a, b, c, d, e, f),
                                         resample=Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float,
                  seed: int) -> dict[str, np.ndarray]:
    """Stratified, seeded train/val/test index split."""
    from sklearn.model_selection import train_test_split

    if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction}: each must be "
                        "between 0 and 1, and together below 1")
    idx = np.arange(len(labels))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
        val_of_rest = val_fraction / (1.0 - test_fraction)
        train, val = train_test_split(rest, test_size=val_of_rest, stratify=labels[rest], random_state=seed)
    except ValueError as e:  # a split too small (or too large) to hold every class
        raise DataError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} leave a split "
                        f"with fewer samples than the {len(set(labels.tolist()))} classes ({e})") from None
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def digits_records(size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.2,
                   seed: int = 0, edges: bool = False) -> tuple[dict[str, list[Record]], list[str]]:
    """Records for every split, and the class names ``zero`` .. ``nine``. With ``edges`` each
    sample also has an ``edges`` image field (:func:`edge_map`, stored as ``{key}.edges.png``)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    n = len(labels)
    parts = split_indices(labels, val_fraction, test_fraction, seed)
    rng = random.Random(seed)
    out: dict[str, list[Record]] = {}
    for split, idx in parts.items():
        out[split] = [
            Record(sample_id=int(i), images={"image": upscale(images[i], size)},
                   caption=caption_for(DIGIT_NAMES[labels[i]], DIGIT_TEMPLATES, rng),
                   label=int(labels[i]), class_name=DIGIT_NAMES[labels[i]], source=f"sklearn-digits/{i}")
            for i in idx
        ]
    shift_rng = random.Random(seed + 1)
    out["test-shifted"] = [
        Record(sample_id=n + r.sample_id, images={"image": random_affine(r.images["image"], shift_rng)},
               caption=r.caption, label=r.label, class_name=r.class_name,
               source=f"{r.source}:shifted", extra={"source_id": r.sample_id})
        for r in out["test"]
    ]
    if edges:
        for recs in out.values():
            for r in recs:
                r.images["edges"] = edge_map(r.images["image"])
    return out, list(DIGIT_NAMES)


def iter_split(records: list[Record]) -> Iterator[Record]:
    """Iterate records in their fixed order."""
    yield from records
