"""SigLIP in the library: the CLIP model's learnable logit bias (built, exempt from weight decay,
saved and loaded, loaded from open_clip weights), the recipe checks that pair the bias with the
objective that reads it, and a short training run on digits whose saved model open_clip loads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mmcl.errors import ConfigError
from mmcl.hub import from_pretrained, save_pretrained
from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.objectives.base import OUTPUTS
from mmcl.objectives.siglip import SigLipLoss
from mmcl.optim import param_groups
from mmcl.recipe import load_recipe, objective_class
from mmcl.registry import model_declaration
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PREPROCESS = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


def tiny(**kw: float | None) -> ClipModel:
    return ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit", **kw))


def refused(config: str, overrides: list[str], message: str) -> None:
    """Loading ``configs/<config>.yaml`` with ``overrides`` raises exactly ``message`` (after the file name)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(str(CONFIGS / config))}.yaml: {re.escape(message)}$"):
        load_recipe(CONFIGS / f"{config}.yaml", overrides)


# --------------------------------------------------------------------------------------------- the recipe
def test_siglip_without_the_models_bias_is_refused_at_load() -> None:
    refused("siglip_digits", ["model.init_logit_bias=null"],
            "objective.name siglip needs the model's learnable logit bias: set model.init_logit_bias: -10 (the "
            "SigLIP paper's start, with model.init_logit_scale: 10)")


def test_clip_with_a_biased_model_is_refused_at_load() -> None:
    """CLIP's loss never reads the bias: its parameter would get no gradient, which DDP stops on."""
    refused("clip_digits", ["model.init_logit_bias=-10"],
            "model.init_logit_bias is -10, but objective.name clip does not read the logit bias (its parameter "
            "would get no gradient, which stops DDP); remove model.init_logit_bias or use objective.name siglip")


def test_the_shipped_recipe_pairs_siglip_with_a_biased_clip_model() -> None:
    r = load_recipe(CONFIGS / "siglip_digits.yaml")
    assert objective_class(r.objective) is SigLipLoss and r.objective.exchange == "gather"
    assert r.model.init_logit_bias == -10 and r.model.init_logit_scale == 10
    assert load_recipe(CONFIGS / "siglip_digits.yaml", ["objective.exchange=ring", "objective.tile=16"])
    with pytest.raises(ConfigError, match="objective.exchange"):
        load_recipe(CONFIGS / "siglip_digits.yaml", ["objective.exchange=rign"])
    with pytest.raises(ConfigError, match="objective.tile"):
        load_recipe(CONFIGS / "siglip_digits.yaml", ["objective.tile=-1"])


def test_logit_bias_is_a_configured_output_the_static_declaration_leaves_out() -> None:
    """Every model output SigLIP reads is named in OUTPUTS; the bias is not in CLIP's declaration
    (an unbiased CLIP model does not produce it), so the recipe's contract does not ask for it and
    SigLIP's check_recipe does."""
    assert set(SigLipLoss.needs_outputs) | set(SigLipLoss.needs_configured_outputs) <= set(OUTPUTS)
    assert SigLipLoss.needs_configured_outputs == ("logit_bias",)
    assert "logit_bias" not in model_declaration("clip")[1] and SigLipLoss.fitting_models() == ["clip"]


# --------------------------------------------------------------------------------------------- the model
def test_the_bias_is_an_output_a_parameter_and_exempt_from_weight_decay() -> None:
    torch.manual_seed(0)
    plain, biased = tiny(), tiny(init_logit_scale=10, init_logit_bias=-10)
    batch = {"image": torch.randn(2, 3, 32, 32), "text": plain.tokenizer()(["a 1", "a 2"])}
    assert "logit_bias" not in plain(batch) and plain.clip.logit_bias is None
    out = biased(batch)
    assert out["logit_bias"] is biased.clip.logit_bias and out["logit_bias"].shape == () and out["logit_bias"] == -10
    assert out["logit_bias"].requires_grad and out["logit_scale"].item() == pytest.approx(10)
    decayed, exempt = param_groups([biased], 0.1)
    assert any(p is biased.clip.logit_bias for p in exempt["params"]) and exempt["weight_decay"] == 0.0
    assert not any(p is biased.clip.logit_bias for p in decayed["params"])
    assert "clip.logit_bias" in biased.no_weight_decay()
    loss, metrics = SigLipLoss()(out)  # the bias gets its gradient through the objective
    loss.backward()
    assert biased.clip.logit_bias.grad is not None and biased.clip.logit_bias.grad != 0
    assert metrics["logit_bias"] == -10


def test_the_bias_round_trips_through_the_saved_folder(tmp_path: Path) -> None:
    model = tiny(init_logit_bias=-10)
    with torch.no_grad():
        model.clip.logit_bias.fill_(-7.25)
    folder = save_pretrained(model, tmp_path / "m", name="clip", preprocess=PREPROCESS)
    again = from_pretrained(folder)
    assert again.clip.logit_bias.item() == -7.25 and again.cfg.init_logit_bias == -10
    assert json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["init_logit_bias"] == -10
    plain = from_pretrained(save_pretrained(tiny(), tmp_path / "plain", name="clip", preprocess=PREPROCESS))
    assert plain.clip.logit_bias is None  # models without a bias still load without one


def test_open_clip_weights_with_and_without_a_bias(tmp_path: Path) -> None:
    """CLIP weights under a SigLIP model keep the bias's start; SigLIP weights under a model without
    a bias (fine-tuning with the CLIP loss) leave the bias out, saying so, so DDP sees no unused
    parameter; every tower weight loads either way."""
    torch.manual_seed(0)
    clip_weights, siglip_weights = tmp_path / "clip.pt", tmp_path / "siglip.pt"
    source = tiny()
    torch.save(source.clip.state_dict(), clip_weights)
    torch.save(tiny(init_logit_bias=-3).clip.state_dict(), siglip_weights)
    loaded = tiny(init_logit_bias=-10, pretrained=str(clip_weights))
    assert loaded.clip.logit_bias.item() == -10
    assert torch.equal(loaded.clip.visual.conv1.weight, source.clip.visual.conv1.weight)
    assert tiny(init_logit_bias=-10, pretrained=str(siglip_weights)).clip.logit_bias.item() == -3
    with pytest.warns(UserWarning, match=re.escape("the weights hold a logit_bias (a SigLIP model) and "
                                                   "model.init_logit_bias is not set: the bias is left out")):
        for_clip = tiny(pretrained=str(siglip_weights))
    assert for_clip.clip.logit_bias is None and "logit_bias" not in dict(for_clip.named_parameters())
    siglip_state = torch.load(siglip_weights, weights_only=True)
    assert all(torch.equal(v, siglip_state[k]) for k, v in for_clip.clip.state_dict().items())


# --------------------------------------------------------------------------------------------- training
# SigLIP from scratch on batches of 64 with the paper's bias of -10 can sit at chance for a few hundred
# steps (one pair in ~20,000 would have its log-odds); -5 and a gentler rate leave that plateau sooner
LEARN = ["data.batch_size=64", "data.num_workers=0", "data.shuffle_buffer=200", "train.steps=150",
         "train.log_every=50", "optim.warmup_steps=10", "optim.lr=1e-3", "model.init_logit_bias=-5",
         "train.progress=false", "eval.num_workers=0"]


def test_siglip_learns_digits_and_open_clip_loads_the_saved_model(digits_dir: Path, tmp_path: Path) -> None:
    """150 steps of the shipped recipe at batch 64: zero-shot top-1 on the validation digits well
    above chance (0.1), the bias and scale trained; open_clip loads the saved folder with the bias."""
    import open_clip

    out = tmp_path / "siglip"
    recipe = load_recipe(CONFIGS / "siglip_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}",
        f"eval.zeroshot_shards={digits_dir}/val-000000.tar", *LEARN])
    trainer = Trainer(recipe)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    top1 = next(r["zeroshot/top1"] for r in rows if "zeroshot/top1" in r)
    assert top1 >= 0.3, rows
    logged = [r for r in rows if "loss" in r]
    assert [r["step"] for r in logged] == [50, 100, 150] and logged[-1]["loss"] < logged[0]["loss"]
    model = from_pretrained(out / "final")
    assert model.clip.logit_bias.item() != -5 and model.logit_scale().item() != pytest.approx(10, abs=1e-4)
    assert model.clip.logit_bias.item() == pytest.approx(logged[-1]["logit_bias"], abs=1e-3)  # the last step's
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out / 'final'}")
    images, tokens = torch.randn(3, 3, 32, 32), model.tokenizer()(["a handwritten digit one", "two", "seven"])
    oc.eval()
    with torch.no_grad():
        assert oc.logit_bias.item() == model.clip.logit_bias.item()
        assert torch.allclose(oc.logit_scale.exp(), model.logit_scale())
        assert torch.allclose(oc.encode_image(images, normalize=True), model.encode_image(images), atol=1e-6)
        assert torch.allclose(oc.encode_text(tokens, normalize=True), model.encode_text(tokens), atol=1e-6)
