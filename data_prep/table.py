"""Rows of a CSV, TSV or JSONL file: image path(s) relative to the file, caption, optional label."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from data_prep.writer import Record
from mmcl.errors import DataError


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read all rows of a .csv, .tsv or .jsonl/.json-lines file as dicts."""
    if not path.is_file():
        raise DataError(f"table {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in (".jsonl", ".ndjson"):
            rows = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            return rows
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    raise DataError(f"{path}: unsupported table type {suffix!r}; use .csv, .tsv or .jsonl")


def table_records(path: Path, image_columns: list[str], caption_column: str | None,
                  label_column: str | None) -> tuple[list[Record], list[str] | None]:
    """Records for every row; labels may be integers or class names (mapped in sorted order)."""
    rows = read_rows(path)
    if not rows:
        raise DataError(f"{path}: the table has no rows")
    columns = set(rows[0])
    for col in [*image_columns, caption_column, label_column]:
        if col is not None and col not in columns:
            raise DataError(f"{path}: no column {col!r}; the columns are {', '.join(sorted(columns))}")
    class_names = None
    to_label: dict[Any, int] = {}
    if label_column:
        values = {r.get(label_column) for r in rows if r.get(label_column) not in (None, "")}
        if all(str(v).lstrip("-").isdigit() for v in values):
            to_label = {v: int(v) for v in values}
        else:
            class_names = sorted(str(v) for v in values)
            to_label = {v: class_names.index(str(v)) for v in values}
    base = path.parent
    records = []
    for i, row in enumerate(rows):
        images = {("image" if len(image_columns) == 1 else col): base / str(row.get(col) or "")
                  for col in image_columns}
        label = to_label.get(row.get(label_column)) if label_column else None
        records.append(Record(
            sample_id=i, images=images,
            caption=str(row.get(caption_column) or "") if caption_column else None,
            label=label,
            class_name=class_names[label] if class_names and label is not None else None,
            source=str(row.get(image_columns[0]) or ""),
        ))
    return records, class_names
