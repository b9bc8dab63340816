"""Image↔text retrieval recall@k, computed in row chunks so memory stays O(chunk × N)."""

from __future__ import annotations

import torch


def recall_at_k(queries: torch.Tensor, keys: torch.Tensor, ks: tuple[int, ...] = (1, 5, 10),
                chunk: int = 1024) -> dict[int, float]:
    """Fraction of queries i whose key i is among the k most similar keys (pairs share the index)."""
    n = queries.shape[0]
    hits = {k: 0 for k in ks}
    for start in range(0, n, chunk):
        sims = queries[start:start + chunk].float() @ keys.float().T
        correct = sims[torch.arange(sims.shape[0]), torch.arange(start, start + sims.shape[0])]
        rank = (sims > correct[:, None]).sum(dim=1)  # number of keys scored strictly higher
        for k in ks:
            hits[k] += int((rank < k).sum())
    return {k: hits[k] / max(1, n) for k in ks}


def retrieval(image_features: torch.Tensor, text_features: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
    """R@1/5/10 for image→text and text→image over paired features."""
    out = {}
    for name, q, k in (("image_to_text", image_features, text_features),
                       ("text_to_image", text_features, image_features)):
        for kk, v in recall_at_k(q, k, chunk=chunk).items():
            out[f"{name}_R@{kk}"] = v
    return out
