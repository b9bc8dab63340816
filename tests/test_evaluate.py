"""Zero-shot classifier and retrieval on hand-checkable examples."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mmcl.evaluate import classify, recall_at_k, zeroshot_classifier


class Lookup:
    """A 'model' whose text embedding is a fixed vector per prompt."""

    table = {"cat A": [1.0, 0.0], "cat B": [1.0, 1.0], "dog A": [0.0, 1.0], "dog B": [0.0, 3.0]}

    names = list(table)

    def tokenizer(self):
        return lambda texts: torch.tensor([self.names.index(t) for t in texts])

    def encode_text(self, tokens):
        return torch.tensor([self.table[self.names[i]] for i in tokens.tolist()])


def test_classifier_is_renormalised_mean_of_normalised_prompts() -> None:
    w = zeroshot_classifier(Lookup(), ["cat", "dog"], ["{} A", "{} B"])
    cat = F.normalize(torch.tensor([1.0, 0.0]) + torch.tensor([1.0, 1.0]) / 2 ** 0.5, dim=0)
    assert torch.allclose(w[:, 0], cat) and torch.allclose(w[:, 1], torch.tensor([0.0, 1.0]))
    images = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.5], [1.0, 0.0]])
    res = classify(images, torch.tensor([0, 1, 1, 0]), w)
    assert res["top1"] == 0.75 and res["top5"] == 1.0
    assert res["confusion"] == [[2, 0], [1, 1]] and res["per_class"] == [1.0, 0.5]


def test_recall_at_k_counts_rank_of_the_paired_key() -> None:
    q = torch.eye(4)
    keys = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0, 0, 0.2, 0], [0, 0, 0.9, 0.1]])
    # query0 -> key0 rank 0; query1 -> key1 rank 0; query2: key3 scores 0.9 > 0.2 -> rank 1; query3 rank 0
    assert recall_at_k(q, keys, ks=(1, 2), chunk=3) == {1: 0.75, 2: 1.0}


def test_flat_metrics_keep_one_key_per_dataset() -> None:
    from mmcl.evaluate.run import flat_metrics

    res = [{"task": "knn", "dataset": {"name": n}, "metrics": {"top1": v}}
           for n, v in (("d/test", 0.9), ("d/shift", 0.7))]
    res.append({"task": "zeroshot", "dataset": {"name": "d/test"}, "metrics": {"top1": 0.5}})
    assert flat_metrics(res) == {"knn/d/test/top1": 0.9, "knn/d/shift/top1": 0.7, "zeroshot/top1": 0.5}
