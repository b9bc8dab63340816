"""Run under ``torchrun --nproc_per_node 1`` and ``2``: one forward/backward of every single-modal
and multi-view objective through Accelerate (DDP for the model, and for objectives with trained
heads) on the same global batch of views; rank 0 saves the mean loss, all gradients, MoCo's queue,
NNCLR's support set after its step and the memory banks of InstDisc and CMC (bank mode).

Encoders and heads use GroupNorm / no norm, so per-process BatchNorm statistics cannot make the
two runs differ: what is compared is the objectives' cross-process maths.
"""

from __future__ import annotations

import sys

import torch
from accelerate import Accelerator

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.config import from_dict
from mmcl.dist import gather_no_grad
from mmcl.objectives.swav import sinkhorn
from mmcl.recipe import Recipe
from mmcl.registry import build

HEAD = {"norm": "none"}
CNN = {"name": "cnn", "width": 8, "depth": 2, "norm": "gn"}
ENCODER = {"name": "encoder", "backbone": CNN, "projector": {"dims": [32, 16], **HEAD}}
MULTIVIEW = {"name": "multiview", "views": 2, "backbone": CNN, "projector": {"dims": [32, 16], **HEAD}}
OBJECTIVES = {
    "simclr": ({"name": "simclr", "temperature": 0.2}, ENCODER),
    "moco": ({"name": "moco", "queue_size": 12, "momentum": 0.9, "temperature": 0.2, "shuffle_bn": True}, ENCODER),
    "mocov3": ({"name": "mocov3", "temperature": 0.5, "predictor": {"dims": [32, 16], **HEAD}}, ENCODER),
    "byol": ({"name": "byol", "predictor": {"dims": [32, 16], **HEAD}}, ENCODER),
    "simsiam": ({"name": "simsiam", "predictor": {"dims": [8, 16], **HEAD}}, ENCODER),
    "invaspread": ({"name": "invaspread", "temperature": 0.1}, ENCODER),
    "dcl": ({"name": "dcl", "temperature": 0.2}, ENCODER),
    "dclw": ({"name": "dclw", "temperature": 0.2, "sigma": 0.5}, ENCODER),
    # support set of 12 rows; after the step it holds the 8 gathered view-1 projections at rows 0..7
    "nnclr": ({"name": "nnclr", "queue_size": 12, "temperature": 0.2, "predictor": {"dims": [32, 16], **HEAD}},
              ENCODER),
    # batch statistics (standardisation, correlation, variance, covariance) of the global batch
    "barlow_twins": ({"name": "barlow_twins", "lambd": 0.05}, ENCODER),
    "vicreg": ({"name": "vicreg"}, ENCODER),
    "cmc": ({"name": "cmc", "mode": "core", "temperature": 0.1}, MULTIVIEW),
    "cmc_full_lab": ({"name": "cmc", "mode": "full", "temperature": 0.1},
                     {**MULTIVIEW, "channels": [[0], [1], [2]]}),
    "cpc": ({"name": "cpc", "steps": 2}, {"name": "cpc", "backbone": CNN, "context_dim": 16}),
    "cpc_gru": ({"name": "cpc", "steps": 1, "normalize": True},
                {"name": "cpc", "backbone": CNN, "context_dim": 16, "context": "gru"}),
    # negatives are drawn per process, so only the banks are compared
    "instdisc": ({"name": "instdisc", "bank_size": 20, "negatives": 5}, ENCODER),
    "cmc_bank": ({"name": "cmc", "negatives": "bank", "bank_size": 20, "bank_negatives": 5}, MULTIVIEW),
}
# multi-crop objectives get 2 extra local 8 px views, encoded once per size
CROPPED = {"swav": ({"name": "swav", "prototypes": 10, "freeze_prototypes_steps": 0, "temperature": 0.1},
                    {**ENCODER, "group_views": True}),
           "dino": ({"name": "dino", "out_dim": 12, "momentum": 0.9},
                    {**ENCODER, "projector": {"dims": [32, 16], "norm": "none", "activation": "gelu"},
                     "group_views": True})}
OBJECTIVES.update(CROPPED)
BANKED = {"instdisc", "cmc_bank"}


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(8, 3, 16, 16, generator=g) for _ in range(2)]
    n, r = 8 // acc.num_processes, acc.process_index
    ids = torch.tensor([3, 7, 11, 19, 0, 5, 2, 13])
    local = {"views": [v[r * n:(r + 1) * n] for v in views], "id": ids[r * n:(r + 1) * n]}
    small = [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)]
    cropped = {**local, "views": local["views"] + [v[r * n:(r + 1) * n] for v in small]}
    results = {}
    for name, (raw, model_raw) in OBJECTIVES.items():
        torch.manual_seed(0)
        recipe = from_dict(Recipe, {"data": {"train_shards": "x", "kind": "multi_view"}, "model": model_raw,
                                    "objective": raw})
        model = build("model", recipe.model)
        objective = build("objective", recipe.objective)
        if hasattr(objective, "setup"):
            objective.setup(model, 10)
        trainable = any(p.requires_grad for p in objective.parameters())
        model = acc.prepare(model)
        objective = acc.prepare(objective) if trainable else objective
        batch = cropped if name in CROPPED else local
        loss, metrics = objective(model(batch), batch)
        acc.backward(loss)
        grads = {f"{prefix}.{k}": p.grad.detach().clone()
                 for prefix, m in (("model", acc.unwrap_model(model)), ("objective", acc.unwrap_model(objective)))
                 for k, p in m.named_parameters() if p.grad is not None}
        results[name] = {"loss": acc.reduce(loss.detach(), "mean").item(), "grads": grads,
                         "std": acc.reduce(metrics["embedding_std"].detach(), "mean").item()}
        if name in BANKED:
            obj = acc.unwrap_model(objective)
            banks = [obj.bank] if name == "instdisc" else list(obj.banks)
            results[name] = {"rows": [b.rows.clone() for b in banks], "seen": [b.seen.clone() for b in banks]}
        if name == "dino":
            results[name]["center"] = acc.unwrap_model(objective).center.clone()
        if name == "nnclr":
            obj = acc.unwrap_model(objective)
            obj.after_optimizer_step(1)
            results[name]["support"] = obj.support.keys.clone()
            results[name]["support_ptr"] = int(obj.support.ptr)
        if name == "moco":
            results[name]["queue"] = acc.unwrap_model(objective).queue.keys.clone()
            results[name]["ptr"] = int(acc.unwrap_model(objective).queue.ptr)
    scores = torch.nn.functional.normalize(torch.randn(8, 5, generator=g), dim=1)
    results["sinkhorn"] = gather_no_grad(sinkhorn(scores[r * n:(r + 1) * n], 0.05, 3))
    if acc.is_main_process:
        torch.save(results, out_path)
    acc.wait_for_everyone()  # shut the gloo group down together
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
