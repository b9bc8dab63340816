"""Evaluation on frozen features: zero-shot classification and image-text retrieval."""

from mmcl.evaluate.features import extract
from mmcl.evaluate.retrieval import recall_at_k, retrieval
from mmcl.evaluate.zeroshot import classify, zeroshot_classifier

__all__ = ["extract", "recall_at_k", "retrieval", "classify", "zeroshot_classifier"]
