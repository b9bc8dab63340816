"""Run under ``torchrun --nproc_per_node 2``: CLIP loss and gradients through Accelerate's DDP on
half a batch per process, compared (on rank 0) with one process on the whole batch."""

from __future__ import annotations

import copy
import json
import sys

import torch
from accelerate import Accelerator

from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.objectives.clip import ClipLoss, ClipLossConfig, clip_loss


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def main(out_path: str) -> None:
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    base = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit"))
    tok = base.tokenizer()
    g = torch.Generator().manual_seed(1)
    images = torch.randn(8, 3, 32, 32, generator=g)
    texts = tok([f"a handwritten digit {w}" for w in "zero one two three four five six seven".split()])
    n, r = images.shape[0] // acc.num_processes, acc.process_index
    results = {}
    for local_loss in (False, True):
        model = acc.prepare(copy.deepcopy(base))
        objective = ClipLoss(ClipLossConfig(local_loss=local_loss))
        loss, _ = objective(model({"image": images[r * n:(r + 1) * n], "text": texts[r * n:(r + 1) * n]}))
        acc.backward(loss)
        mean_loss = acc.reduce(loss.detach(), "mean").item()
        dist_grads = grads(acc.unwrap_model(model))
        if acc.is_main_process:
            single = copy.deepcopy(base)
            # one process on the concatenated batch: the pure loss on all rows, no gather
            out = single({"image": images, "text": texts})
            f_img, f_txt = out["image_features"], out["text_features"]
            ref_loss, _ = clip_loss(f_img, f_txt, f_img, f_txt, out["logit_scale"], 0, local_loss)
            ref_loss.backward()
            ref = grads(single)
            diffs = [(dist_grads[k] - ref[k]).abs().max().item() for k in ref]
            results[str(local_loss)] = {"loss": mean_loss, "ref_loss": ref_loss.item(), "max_grad_diff": max(diffs),
                                        "n_params": len(diffs),
                                        "max_grad": max(v.abs().max().item() for v in ref.values())}
        acc.wait_for_everyone()
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump(results, f)
    acc.wait_for_everyone()  # shut the gloo group down together
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
