"""An image folder with one subfolder per class; captions come from the class name."""

from __future__ import annotations

import random
from pathlib import Path

from data_prep.captions import CLASS_TEMPLATES, caption_for
from data_prep.writer import Record
from mmcl.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def folder_records(root: Path, seed: int = 0) -> tuple[list[Record], list[str]]:
    """Records in sorted (class, file) order, so ids are stable between builds."""
    if not root.is_dir():
        raise DataError(f"image folder {str(root)!r} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: expected one subfolder per class, found none")
    rng = random.Random(seed)
    records = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
                records.append(Record(sample_id=len(records), images={"image": path},
                                      caption=caption_for(name.replace("_", " "), CLASS_TEMPLATES, rng),
                                      label=label, class_name=name, source=str(path.relative_to(root))))
    if not records:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in the class folders")
    return records, classes
