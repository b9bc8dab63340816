"""Frozen-feature classification: weighted kNN and a linear probe.

kNN follows InstDisc/DINO: cosine similarity to every training feature, the ``k`` nearest vote
for their label with weight ``exp(sim / T)``. The linear probe is multinomial logistic
regression on standardised features, fitted full-batch with L-BFGS; its L2 penalty is chosen
on a held-out fifth of the training features, then refitted on all of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> dict[str, float]:
    """Top-1/top-5 accuracy of temperature-weighted kNN votes (features are L2-normalised here)."""
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


def _fit(x: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, iters: int) -> torch.nn.Linear:
    torch.manual_seed(0)
    clf = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(clf(x), y) + l2 * clf.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return clf


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 l2_grid: tuple[float, ...] = (1e-5, 1e-4, 1e-3, 1e-2), iters: int = 200) -> dict[str, float]:
    """Top-1 accuracy of a logistic-regression probe (``l2`` from ``l2_grid`` by held-out accuracy)."""
    train_f, test_f = train_f.float(), test_f.float()
    mean, std = train_f.mean(0), train_f.std(0).clamp(min=1e-6)
    x, xt = (train_f - mean) / std, (test_f - mean) / std
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    hold, fit = perm[: x.shape[0] // 5], perm[x.shape[0] // 5:]

    def acc(clf: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor) -> float:
        with torch.no_grad():
            return (clf(a).argmax(1) == b).float().mean().item()

    best = max(l2_grid, key=lambda l2: acc(_fit(x[fit], train_y[fit], n_classes, l2, iters), x[hold], train_y[hold]))
    return {"top1": acc(_fit(x, train_y, n_classes, best, iters), xt, test_y), "l2": best}
