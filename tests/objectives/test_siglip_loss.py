"""SigLIP's loss and its gradients (image and text features, scale, bias) on one process, in every
exchange and chunk mode, against a loop-by-loop float64 reference written from the paper and
against open_clip's own ``SigLipLoss``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmcl.errors import ConfigError
from mmcl.objectives.siglip import SigLipConfig, SigLipLoss

MODES = [SigLipConfig(), SigLipConfig(tile=1), SigLipConfig(tile=4), SigLipConfig(exchange="ring"),
         SigLipConfig(exchange="ring", tile=2)]
IDS = ["gather", "gather-chunk1", "gather-chunk4", "ring", "ring-chunk2"]


def reference_siglip(image: list[list[float]], text: list[list[float]], scale: float, bias: float,
                     positive_from: int = 0) -> tuple[float, dict[str, object]]:
    """Plain-Python SigLIP of ``image`` rows against ``text`` rows (image i's pair: text i +
    positive_from): loss -1/B Σ_ij log σ(y_ij z_ij), z_ij = scale·x_i·t_j + bias, and its gradients
    written out by hand: dL/dz_ij = -y_ij σ(-y_ij z_ij) / B, then the chain rule through z."""
    b = len(image)
    dot = [[sum(u * v for u, v in zip(x, t)) for t in text] for x in image]
    loss, dz = 0.0, [[0.0] * len(text) for _ in image]
    for i in range(b):
        for j in range(len(text)):
            y = 1.0 if j == i + positive_from else -1.0
            z = scale * dot[i][j] + bias
            loss += math.log1p(math.exp(-y * z)) / b  # -log σ(y z)
            dz[i][j] = -y / (1.0 + math.exp(y * z)) / b  # -y σ(-y z) / B
    d = len(image[0])
    grads = {"image": [[scale * sum(dz[i][j] * text[j][k] for j in range(len(text))) for k in range(d)]
                       for i in range(b)],
             "text": [[scale * sum(dz[i][j] * image[i][k] for i in range(b)) for k in range(d)]
                      for j in range(len(text))],
             "scale": sum(dz[i][j] * dot[i][j] for i in range(b) for j in range(len(text))),
             "bias": sum(sum(row) for row in dz)}
    return loss, grads


def features(n: int = 6, d: int = 5, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)  # pairs agree
    return image.to(dtype), text.to(dtype)


def run(objective: SigLipLoss, image: torch.Tensor, text: torch.Tensor, scale: float, bias: float
        ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Loss, metrics and the gradients of the loss with respect to the four inputs."""
    leaves = {"image": image.clone().requires_grad_(), "text": text.clone().requires_grad_(),
              "scale": torch.tensor(scale, dtype=image.dtype, requires_grad=True),
              "bias": torch.tensor(bias, dtype=image.dtype, requires_grad=True)}
    loss, metrics = objective({"image_features": leaves["image"], "text_features": leaves["text"],
                               "logit_scale": leaves["scale"], "logit_bias": leaves["bias"]})
    loss.backward()
    return loss.detach(), metrics, {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("cfg", MODES, ids=IDS)
def test_loss_and_every_gradient_match_the_hand_reference(cfg: SigLipConfig) -> None:
    image, text = features()
    scale, bias = 7.5, -3.0
    loss, metrics, grads = run(SigLipLoss(cfg), image, text, scale, bias)
    ref_loss, ref = reference_siglip(image.tolist(), text.tolist(), scale, bias)
    assert loss.dtype == torch.float64 and abs(loss.item() - ref_loss) < 1e-12 and ref_loss > 1.0
    for name in ("image", "text"):
        torch.testing.assert_close(grads[name], torch.tensor(ref[name], dtype=torch.float64), rtol=1e-10, atol=1e-12)
    assert abs(grads["scale"].item() - ref["scale"]) < 1e-12 and abs(ref["scale"]) > 1e-2
    assert abs(grads["bias"].item() - ref["bias"]) < 1e-12 and abs(ref["bias"]) > 1e-2
    assert metrics["logit_scale"].item() == scale and metrics["logit_bias"].item() == bias
    best = [max(range(6), key=lambda j, i=i: float(image[i] @ text[j])) for i in range(6)]
    hits = sum(b == i for i, b in enumerate(best))
    assert 0 < hits < 6 and metrics["acc_i2t"].item() == pytest.approx(hits / 6)  # image i's best text is text i


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", MODES, ids=IDS)
def test_matches_open_clip_siglip_loss(cfg: SigLipConfig, dtype: torch.dtype) -> None:
    """open_clip's loss on one process (its ``world_size`` 1): same value and gradients to round-off."""
    from open_clip.loss import SigLipLoss as OpenClipSigLipLoss

    image, text = features(n=7, d=6, seed=1, dtype=dtype)
    loss, _, grads = run(SigLipLoss(cfg), image, text, 10.0, -10.0)
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
              torch.tensor(10.0, dtype=dtype, requires_grad=True), torch.tensor(-10.0, dtype=dtype, requires_grad=True)]
    theirs = OpenClipSigLipLoss(rank=0, world_size=1)(*leaves)
    theirs.backward()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert abs(loss.item() - theirs.item()) < tol * max(1.0, abs(theirs.item()))
    for name, leaf in zip(("image", "text", "scale", "bias"), leaves):
        torch.testing.assert_close(grads[name], leaf.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("cfg", MODES, ids=IDS)
def test_gradients_pass_a_finite_difference_check(cfg: SigLipConfig) -> None:
    """The hand-made backward of the chunked and ring paths against finite differences (float64)."""
    image, text = features(n=4, d=3, seed=2)
    objective = SigLipLoss(cfg)

    def loss(i: torch.Tensor, t: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return objective({"image_features": i, "text_features": t, "logit_scale": s, "logit_bias": b})[0]

    inputs = (image, text, torch.tensor(4.0, dtype=torch.float64), torch.tensor(-2.0, dtype=torch.float64))
    assert torch.autograd.gradcheck(loss, tuple(x.clone().requires_grad_() for x in inputs))


def test_the_loss_is_taken_in_float32_from_half_precision_features() -> None:
    """bf16 features (as under autocast) give the float32 loss of their float32 values."""
    image, text = features(dtype=torch.float32)
    half = SigLipLoss()({"image_features": image.bfloat16(), "text_features": text.bfloat16(),
                         "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-10.0)})[0]
    full = SigLipLoss()({"image_features": image.bfloat16().float(), "text_features": text.bfloat16().float(),
                         "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-10.0)})[0]
    assert half.dtype == torch.float32 and half.item() == pytest.approx(full.item(), rel=1e-6)


def test_perfect_pairs_give_a_low_loss_and_full_accuracy() -> None:
    image = torch.eye(6, dtype=torch.float64)  # orthogonal: logit 20 - 8 for a pair, -8 for a non-pair
    out = {"image_features": image, "logit_scale": torch.tensor(20.0), "logit_bias": torch.tensor(-8.0)}
    good, metrics = SigLipLoss()({**out, "text_features": image})
    wrong, wrong_metrics = SigLipLoss()({**out, "text_features": image.roll(1, 0)})
    assert good < 0.01 < 8 < wrong and metrics["acc_i2t"] == 1.0 and wrong_metrics["acc_i2t"] == 0.0


def test_a_model_output_without_logit_bias_is_a_clear_error() -> None:
    image, text = features()
    with pytest.raises(ConfigError, match=r"objective siglip reads the model output logit_bias: build the model with "
                                          r"model.init_logit_bias \(e.g. -10\)"):
        SigLipLoss()({"image_features": image, "text_features": text, "logit_scale": torch.tensor(10.0)})


def test_a_caption_repeated_in_the_batch_counts_as_a_hit_for_both_its_images() -> None:
    """Digits batches repeat captions: an image whose own text ties with an identical text is a hit."""
    pairs = torch.eye(4, dtype=torch.float64)[[0, 0, 2, 3]]  # rows 0 and 1: the same image and the same caption
    out = {"image_features": pairs, "text_features": pairs.clone(), "logit_scale": torch.tensor(10.0),
           "logit_bias": torch.tensor(-10.0)}
    for cfg in MODES:
        assert SigLipLoss(cfg)(out)[1]["acc_i2t"].item() == 1.0, cfg
