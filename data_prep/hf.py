"""A Hugging Face ``datasets`` dataset (saved with ``save_to_disk``, a local builder or a Hub name)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from data_prep.writer import Record
from mmcl.errors import DataError


def load_hf(name_or_path: str, split: str | None) -> Any:
    """Load a ``DatasetDict``/``Dataset`` from disk, or by name through ``datasets.load_dataset``."""
    import datasets

    path = Path(name_or_path)
    try:
        if (path / "dataset_dict.json").exists() or (path / "dataset_info.json").exists() \
                or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
        else:
            ds = datasets.load_dataset(name_or_path, split=split)
    except (FileNotFoundError, ValueError, ConnectionError, OSError) as e:
        raise DataError(f"cannot load dataset {name_or_path!r}: {e}") from None
    if isinstance(ds, datasets.Dataset):
        return {split or "train": ds}
    if split:
        if split not in ds:
            raise DataError(f"{name_or_path}: no split {split!r}; it has {', '.join(ds)}")
        return {split: ds[split]}
    return dict(ds)


def _image_source(value: Any) -> Any:
    """Turn a datasets image cell (PIL image, {'bytes','path'} dict, path) into bytes or a path."""
    if value is None:
        return b""
    if isinstance(value, dict):
        return value.get("bytes") or Path(value.get("path") or "")
    if isinstance(value, (str, Path)):
        return Path(value)
    if hasattr(value, "save"):  # PIL image
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return value


def hf_records(splits: dict[str, Any], image_column: str, caption_column: str | None,
               label_column: str | None) -> tuple[dict[str, Iterator[Record]], list[str] | None, dict[str, int]]:
    """Lazy records per split; ids are row indices offset so they are unique across splits."""
    import datasets

    first = next(iter(splits.values()))
    for col in [image_column, caption_column, label_column]:
        if col is not None and col not in first.column_names:
            raise DataError(f"no column {col!r}; the columns are {', '.join(first.column_names)}")
    class_names = None
    if label_column and isinstance(first.features[label_column], datasets.ClassLabel):
        class_names = list(first.features[label_column].names)
    offsets, total = {}, 0
    for name, ds in splits.items():
        offsets[name] = total
        total += len(ds)

    def gen(name: str, ds: Any) -> Iterator[Record]:
        # Decoding stays off so that a corrupt image is counted by our converter, not raised here.
        raw = ds.cast_column(image_column, datasets.Image(decode=False)) \
            if isinstance(ds.features[image_column], datasets.Image) else ds
        for i, row in enumerate(raw):
            label = row.get(label_column) if label_column else None
            yield Record(sample_id=offsets[name] + i, images={"image": _image_source(row[image_column])},
                         caption=str(row[caption_column] or "") if caption_column else None,
                         label=int(label) if label is not None else None,
                         class_name=class_names[label] if class_names and label is not None else None,
                         source=f"{name}/{i}")

    return {name: gen(name, ds) for name, ds in splits.items()}, class_names, {k: len(v) for k, v in splits.items()}
