"""Combined objectives (``objective: {name: combined, parts: [...]}``): the loss is the weighted sum
of the parts computed on their own, gradients included; every part is checked by the recipe under
its own key; the parts' hooks and state survive a resume exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import mmcl
from mmcl.errors import ConfigError
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[2]
ENCODER = {"backbone": {"name": "cnn", "width": 8, "depth": 2, "norm": "gn"}, "projector": {"dims": [32, 16]}}


def test_the_loss_is_the_weighted_sum_of_the_parts_on_their_own() -> None:
    """SimCLR (weight 1) + SimSiam (weight 0.5) against each built alone with the same weights: equal
    loss and equal gradients for the encoder and for SimSiam's predictor."""
    torch.manual_seed(0)
    model, _, _ = mmcl.create_model("encoder", **ENCODER)
    both = mmcl.create_objective("combined", model=model, parts=[
        {"name": "simclr", "temperature": 0.2}, {"name": "simsiam", "weight": 0.5, "predictor": {"dims": [32, 16]}}])
    simclr = mmcl.create_objective("simclr", model=model, temperature=0.2)
    simsiam = mmcl.create_objective("simsiam", model=model, predictor={"dims": [32, 16]})
    simsiam.load_state_dict(both.parts[1].state_dict())
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    batch = {"views": views}

    loss, metrics = both(model(batch), batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in [*model.named_parameters(), *both.parts[1].named_parameters()]}
    model.zero_grad()
    out = model(batch)
    alone = simclr(out, batch)[0] + 0.5 * simsiam(out, batch)[0]
    alone.backward()
    expected = {n: p.grad for n, p in [*model.named_parameters(), *simsiam.named_parameters()]}
    assert torch.allclose(loss, alone, atol=1e-6)
    assert grads.keys() == expected.keys() and all(torch.allclose(grads[n], expected[n], atol=1e-6) for n in grads)
    assert metrics["simclr/loss"] == pytest.approx(simclr(out, batch)[0].item(), abs=1e-6)
    assert {"simclr/acc", "simsiam/loss"} <= set(metrics)


def recipe_dict(digits_dir: Path, out: Path, parts: list[dict]) -> dict:
    return {"data": {"train_shards": f"{digits_dir}/train-{{000000..000004}}.tar", "kind": "multi_view",
                     "image_size": 32, "transform": "digits_ssl", "mean": [0.5] * 3, "std": [0.5] * 3,
                     "batch_size": 32, "num_workers": 1, "shuffle_buffer": 64},
            "model": {"name": "encoder", **ENCODER},
            "objective": {"name": "combined", "parts": parts},
            "optim": {"lr": 1e-3, "warmup_steps": 1},
            "train": {"steps": 4, "log_every": 1, "save_every": 2, "progress": False},
            "run": {"output_dir": str(out)}}


@pytest.mark.parametrize(("parts", "message"), [
    ([{"name": "simclr"}, {"name": "clip"}],
     r"objective.parts\[1\].name clip reads model outputs image_features, text_features, logit_scale"),
    ([{"name": "simclr", "temperatur": 0.1}], r"unknown key 'objective.parts\[0\].temperatur'"),
    ([{"name": "simclr", "weight": 0}], r"objective.parts\[0\].weight: got 0.0, allowed: > 0"),
    ([{"name": "simclr"}, {"name": "simclr", "temperature": 0.1}], "each objective may appear once"),
    ([{"name": "combined", "parts": [{"name": "simclr"}]}], "a part cannot itself be combined"),
    ([], "objective.parts: must not be empty"),
])
def test_each_part_is_checked_under_its_own_key(parts: list, message: str, digits_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        mmcl.recipe_from(recipe_dict(digits_dir, tmp_path, parts))


def test_a_resumed_combined_run_matches_the_uninterrupted_one(digits_dir: Path, tmp_path: Path) -> None:
    """MoCo (a momentum encoder and a queue, updated after each step) + SimCLR: stopped at step 2 and
    resumed, steps 3-4 give the same losses, per part too; each part's metrics are logged."""
    parts = [{"name": "moco", "queue_size": 64, "temperature": 0.2}, {"name": "simclr", "weight": 0.5}]
    full = tmp_path / "full"
    trainer = Trainer(mmcl.recipe_from(recipe_dict(digits_dir, full, parts)))
    trainer.fit()
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step_00000002", part / "checkpoints" / "step_00000002")
    Trainer(mmcl.recipe_from(recipe_dict(digits_dir, part, parts))).fit(resume="latest")

    def logged(run: Path) -> dict[int, dict]:
        return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r}

    reference, resumed = logged(full), logged(part)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "moco/loss", "simclr/loss", "moco/acc"):
            assert resumed[step][key] == pytest.approx(reference[step][key], abs=1e-5), (step, key)
    assert reference[4]["loss"] == pytest.approx(reference[4]["moco/loss"] + 0.5 * reference[4]["simclr/loss"],
                                                 abs=1e-5)
    objective = trainer.acc.unwrap_model(trainer.objective)
    online = dict(trainer.unwrapped.named_parameters())
    target = dict(objective.parts[0].target.net.named_parameters())
    assert any(not torch.equal(online[k], target[k]) for k in online)  # the momentum hook ran


def test_the_combined_recipe_refuses_the_device_vote_when_a_part_has_after_step_state(digits_dir: Path,
                                                                                      tmp_path: Path) -> None:
    r = recipe_dict(digits_dir, tmp_path, [{"name": "simclr"}, {"name": "byol", "predictor": {"dims": [32, 16]}}])
    r["optim"]["fused"] = True
    r["train"]["vote"] = "device"
    with pytest.raises(ConfigError, match="objective byol updates state after each step"):
        mmcl.recipe_from(r)
    r["objective"]["parts"] = [{"name": "simclr"}, {"name": "invaspread"}]
    assert mmcl.recipe_from(r).train.vote == "device"
