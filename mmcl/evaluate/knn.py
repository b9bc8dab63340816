"""Frozen-feature classification: weighted kNN and a linear probe.

kNN follows InstDisc/DINO: cosine similarity to every training feature, the ``k`` nearest vote
for their label with weight ``exp(sim / T)`` (torch, chunked, on the features' device). The linear
probe is scikit-learn's multinomial logistic regression on standardised features, fitted
full-batch with L-BFGS; its L2 penalty is chosen on a held-out fifth of the training features,
then refitted on all of them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Top-1/top-5 accuracy of temperature-weighted kNN votes (features are L2-normalised here).

    >>> train_f, train_y = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]), torch.tensor([0, 0, 1, 1])
    >>> knn_classify(train_f, train_y, torch.tensor([[0.8, 0.2], [0.3, 0.7]]), torch.tensor([0, 0]), k=2)
    {'top1': 0.5, 'top5': 1.0}
    """
    train_f, test_f = F.normalize(train_f.float(), dim=-1), F.normalize(test_f.float(), dim=-1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    k = min(k, train_f.shape[0])
    correct1 = correct5 = 0
    for start in range(0, test_f.shape[0], chunk):
        sims, idx = (test_f[start:start + chunk] @ train_f.T).topk(k, dim=1)
        votes = torch.zeros(sims.shape[0], n_classes).scatter_add_(1, train_y[idx], (sims / temperature).exp())
        top = votes.topk(min(5, n_classes), dim=1).indices
        y = test_y[start:start + chunk]
        correct1 += (top[:, 0] == y).sum().item()
        correct5 += (top == y[:, None]).any(dim=1).sum().item()
    n = test_f.shape[0]
    return {"top1": correct1 / n, "top5": correct5 / n}


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2), iters: int = 1000) -> dict[str, float]:
    """Top-1 accuracy of a logistic-regression probe (``l2`` from ``l2_grid`` by held-out accuracy).

    scikit-learn fits it (``StandardScaler`` then ``LogisticRegression``, L-BFGS to its tolerance, at
    most ``iters`` iterations), as CLIP's linear-probe protocol does, and leaves torch's global random
    state alone (the hand-written L-BFGS probe before it reseeded it, mid-training when ``eval_every``
    ran it). ``l2`` is the weight of ``‖W‖²`` beside the mean cross-entropy, i.e.
    ``C = 1 / (2 · l2 · n)`` in scikit-learn's terms.

    >>> g = torch.Generator().manual_seed(0)
    >>> centres = torch.randn(3, 8, generator=g) * 3   # three classes, around three centres
    >>> y = torch.arange(60) % 3
    >>> x = centres[y] + torch.randn(60, 8, generator=g)
    >>> result = linear_probe(x[:45], y[:45], x[45:], y[45:])
    >>> result["top1"], result["l2"] in (1e-5, 1e-4, 1e-3, 1e-2)
    (1.0, True)
    """
    from sklearn.dummy import DummyClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = train_f.detach().float().cpu().numpy(), train_y.cpu().numpy()
    xt, yt = test_f.detach().float().cpu().numpy(), test_y.cpu().numpy()
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0)).numpy()
    hold, fit = perm[: len(x) // 5], perm[len(x) // 5:]

    def probe(l2: float, a: np.ndarray, b: np.ndarray) -> Any:
        if len(np.unique(b)) < 2:  # one class: scikit-learn refuses to fit, the answer is that class
            return DummyClassifier(strategy="most_frequent").fit(a, b)
        return make_pipeline(StandardScaler(), LogisticRegression(C=1 / (2 * l2 * len(a)), max_iter=iters)).fit(a, b)

    best = max(l2_grid, key=lambda l2: probe(l2, x[fit], y[fit]).score(x[hold], y[hold]))
    return {"top1": float(probe(best, x, y).score(xt, yt)), "l2": best}
