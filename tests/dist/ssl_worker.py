"""Run under ``torchrun --nproc_per_node 1`` and ``2``: one forward/backward of every single-modal
objective through Accelerate (DDP for the model, and for objectives with trained heads) on the
same global batch of views; rank 0 saves the mean loss, all gradients and MoCo's queue.

Encoders and heads use GroupNorm / no norm, so per-process BatchNorm statistics cannot make the
two runs differ: what is compared is the objectives' cross-process maths.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

from mmcl.config import build, from_dict
from mmcl.models.encoder import EncoderModel, EncoderModelConfig
from mmcl.recipe import Recipe

HEAD = {"norm": "none"}
OBJECTIVES = {
    "simclr": {"name": "simclr", "temperature": 0.2},
    "moco": {"name": "moco", "queue_size": 12, "momentum": 0.9, "temperature": 0.2, "shuffle_bn": True},
    "mocov3": {"name": "mocov3", "temperature": 0.5, "predictor": {"dims": [32, 16], **HEAD}},
    "byol": {"name": "byol", "predictor": {"dims": [32, 16], **HEAD}},
    "simsiam": {"name": "simsiam", "predictor": {"dims": [8, 16], **HEAD}},
}


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    n, r = 8 // acc.num_processes, acc.process_index
    local = {"views": [v[r * n:(r + 1) * n] for v in views]}
    results = {}
    for name, raw in OBJECTIVES.items():
        torch.manual_seed(0)
        cfg = from_dict(EncoderModelConfig, {"backbone": {"name": "cnn", "width": 8, "depth": 2, "norm": "gn"},
                                             "projector": {"dims": [32, 16], **HEAD}})
        model = EncoderModel(cfg)
        objective = build("objective", from_dict(Recipe, {"data": {"train_shards": "x"}, "model": {"name": "encoder"},
                                                          "objective": raw}).objective)
        if hasattr(objective, "setup"):
            objective.setup(model, 10)
        trainable = any(p.requires_grad for p in objective.parameters())
        model = acc.prepare(model)
        objective = acc.prepare(objective) if trainable else objective
        loss, metrics = objective(model(local), local)
        acc.backward(loss)
        grads = {f"{prefix}.{k}": p.grad.detach().clone()
                 for prefix, m in (("model", acc.unwrap_model(model)), ("objective", acc.unwrap_model(objective)))
                 for k, p in m.named_parameters() if p.grad is not None}
        results[name] = {"loss": acc.reduce(loss.detach(), "mean").item(), "grads": grads,
                         "std": acc.reduce(metrics["embedding_std"].detach(), "mean").item()}
        if name == "moco":
            results[name]["queue"] = acc.unwrap_model(objective).queue.keys.clone()
            results[name]["ptr"] = int(acc.unwrap_model(objective).queue.ptr)
    if acc.is_main_process:
        torch.save(results, out_path)


if __name__ == "__main__":
    main(sys.argv[1])
