"""Streaming data: WebDataset shards -> decoded, augmented, tokenized batches."""

from mmcl.data.loader import DataConfig, Loader, make_loader
from mmcl.data.shards import class_names, count_samples, describe, expand_shards

__all__ = ["DataConfig", "Loader", "make_loader", "class_names", "count_samples", "describe", "expand_shards"]
