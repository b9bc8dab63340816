"""Run under ``torchrun --nproc_per_node 2``: CLIP loss and gradients through Accelerate's DDP on
half a batch per process (``ClipLoss``, with and without ``local_loss``), compared (on rank 0) with
one process on the whole batch under a plain-torch reference loss written from the CLIP paper
(Radford et al., 2021, Figure 3), not with the library's own loss."""

from __future__ import annotations

import copy
import json
import sys

import torch
from accelerate import Accelerator

from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.objectives.clip import ClipLoss, ClipLossConfig


def paper_clip_loss(model: ClipModel, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP's pseudocode on the global batch: I_e, T_e = l2_normalize(tower outputs);
    logits = I_e T_e^T exp(t); labels = arange(n); loss = (CE over rows + CE over columns) / 2,
    each cross-entropy written out as -log softmax of the matching pair."""
    i_e = model.clip.visual(images)
    t_e = model.clip.text(texts)
    i_e = i_e / i_e.norm(dim=1, keepdim=True)
    t_e = t_e / t_e.norm(dim=1, keepdim=True)
    logits = i_e @ t_e.T * model.clip.logit_scale.exp()  # [n images, n texts]
    pairs = torch.arange(logits.shape[0])
    loss_i = -(logits[pairs, pairs] - logits.logsumexp(dim=1)).mean()  # each image picks its text
    loss_t = -(logits[pairs, pairs] - logits.logsumexp(dim=0)).mean()  # each text picks its image
    return (loss_i + loss_t) / 2


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
            # one process on the concatenated batch, the paper's loss (no gather, no library loss)
            ref_loss = paper_clip_loss(single, images, texts)
            ref_loss.backward()
            ref = grads(single)
            diffs = [(dist_grads[k] - ref[k]).abs().max().item() for k in ref]
            scale = "clip.logit_scale"
            results[str(local_loss)] = {"loss": mean_loss, "ref_loss": ref_loss.item(), "max_grad_diff": max(diffs),
                                        "n_params": len(diffs), "same_params": sorted(dist_grads) == sorted(ref),
                                        "max_grad": max(v.abs().max().item() for v in ref.values()),
                                        "scale_grad": dist_grads[scale].item(), "ref_scale_grad": ref[scale].item()}
        acc.wait_for_everyone()
    if acc.is_main_process:
        with open(out_path, "w") as f:
            json.dump(results, f)
    acc.wait_for_everyone()  # shut the gloo group down together
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
