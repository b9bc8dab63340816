"""SLIP: image-text data with augmented views of each image (``data.view_transforms``), a CLIP model
with a view head (``model.view_projector``) and CLIP + SimCLR combined in one recipe
(``configs/slip_digits.yaml``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmcl
from mmcl.data import DataConfig
from mmcl.errors import ConfigError
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def slip(digits_dir: Path, out: Path, *extra: str):  # noqa: ANN201
    return load_recipe(ROOT / "configs" / "slip_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}", "data.batch_size=32",
        "data.num_workers=0", "train.steps=3", "train.log_every=1", "train.progress=false",
        "eval.zeroshot_shards=null", *extra])


def test_image_text_batches_carry_augmented_views_for_training_only(digits_dir: Path) -> None:
    """Each view is the same image under its own augmentation (neither the CLIP image nor the other
    view); evaluation loaders give the pair alone."""
    cfg = DataConfig(train_shards=f"{digits_dir}/train-000000.tar", image_size=32, transform="digits",
                     view_transforms=["digits_ssl", "digits_ssl"], batch_size=8, num_workers=0, normalize="workers")
    loader = mmcl.make_loader(cfg)
    loader.set_epoch(0)
    batch = next(iter(loader))
    views = batch["views"]
    assert len(views) == 2 and views[0].shape == views[1].shape == batch["image"].shape == (8, 3, 32, 32)
    assert not torch.equal(views[0], views[1]) and not torch.equal(views[0], batch["image"])
    evaluation = mmcl.make_loader(cfg, train=False)
    evaluation.set_epoch(0)
    assert "views" not in next(iter(evaluation))


def test_the_slip_recipe_trains_both_losses_and_saves_the_towers(digits_dir: Path, tmp_path: Path) -> None:
    """Both parts are logged and add up to the loss; ``final/`` holds the CLIP towers (the view head is
    for training only) and loads with open_clip-identical embeddings."""
    trainer = Trainer(slip(digits_dir, tmp_path / "run"))
    final = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert last["loss"] == pytest.approx(last["clip/loss"] + 0.5 * last["simclr/loss"], abs=1e-5)
    assert trainer.unwrapped.view_head is not None
    model = mmcl.from_pretrained(final)
    assert model.view_head is None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), trainer.unwrapped.cpu().eval().encode_image(x), atol=1e-6)


@pytest.mark.parametrize(("extra", "message"), [
    (["data.view_transforms=[]"], r"objective.parts\[1\].name simclr trains on data.kind multi_view \(or image_text "
                                  r"with data.view_transforms naming its views\), but data.kind is image_text"),
    (["model.view_projector=null"], r"objective.parts\[1\].name simclr reads model output z:views, which model.name "
                                    r"clip does not produce"),
    (["data.view_transforms=[digits_ssl]"], r"objective.parts\[1\].name simclr compares 2 or more views"),
    (["objective.parts=[{name: clip}, {name: simsiam, predictor: {dims: [32, 32]}}]"],
     r"objective.parts\[1\].predictor.dims ends with 32 but the model's embeddings are 64 wide"),
])
def test_slip_recipes_that_cannot_work_are_refused(extra: list[str], message: str, digits_dir: Path,
                                                   tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message):
        slip(digits_dir, tmp_path, *extra)


def test_clip_with_a_momentum_teacher_on_the_views(digits_dir: Path, tmp_path: Path) -> None:
    """CLIP + BYOL: the BYOL target is a momentum copy of the CLIP model's image tower and view head
    (not of its text tower, which it would never use); it moves away from the online weights as the
    steps go, and both losses are logged."""
    trainer = Trainer(slip(digits_dir, tmp_path / "run", "objective.parts=[{name: clip}, {name: byol, predictor: "
                                                          "{dims: [64, 64]}}]"))
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"clip/loss", "byol/loss", "byol/momentum"} <= set([r for r in rows if "loss" in r][-1])
    target = trainer.acc.unwrap_model(trainer.objective).parts[1].target.net
    online = trainer.unwrapped
    assert {k.split(".")[0] for k in target.state_dict()} == {"visual", "head"}
    assert [k for k, _ in target.visual.named_parameters()] == [k for k, _ in online.clip.visual.named_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(target.visual.parameters(), online.clip.visual.parameters()))


def test_clip_with_dino_on_the_views(digits_dir: Path, tmp_path: Path) -> None:
    """``configs/clip_dino_digits.yaml``: the DINO teacher, a momentum copy of the CLIP model's image
    tower and view head, embeds the two views alone (not the batch's image), moves away from the
    student, and DINO's collapse monitors are logged beside CLIP's loss."""
    recipe = load_recipe(ROOT / "configs" / "clip_dino_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={tmp_path / 'run'}",
        "data.batch_size=32", "data.num_workers=0", "train.steps=3", "train.log_every=1", "train.progress=false",
        "eval.zeroshot_shards=null"])
    trainer = Trainer(recipe)
    teacher = trainer.acc.unwrap_model(trainer.objective).parts[1].target.net.model
    assert {k.split(".")[0] for k in teacher.state_dict()} == {"visual", "head"}  # no text tower
    images_seen = []
    teacher.visual.register_forward_hook(lambda *args: images_seen.append(args[1][0].shape[0]))
    trainer.fit()
    assert images_seen == [32, 32] * 3  # two views of 32 images a step: the views alone
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "loss" in r][-1]
    assert {"clip/loss", "dino/loss", "dino/teacher_entropy", "dino/kl_teacher_student"} <= set(last)
    assert last["loss"] == pytest.approx(last["clip/loss"] + 0.5 * last["dino/loss"], abs=1e-5)
    online = trainer.unwrapped.clip.visual
    assert any(not torch.equal(a, b) for a, b in zip(teacher.visual.parameters(), online.parameters()))


@pytest.mark.parametrize("part", ["byol", "dino"])
def test_a_teacher_saved_as_a_whole_clip_model_still_loads(part: str, digits_dir: Path, tmp_path: Path) -> None:
    """Checkpoints written before the teachers copied only the views' network hold the whole CLIP
    model under ``target.net``: they load into today's teacher (image tower and view head kept)."""
    from mmcl.objectives.momentum import MomentumTarget

    extra = "predictor: {dims: [64, 64]}" if part == "byol" else "out_dim: 32"
    parts = f"objective.parts=[{{name: clip}}, {{name: {part}, {extra}}}]"
    trainer = Trainer(slip(digits_dir, tmp_path / "run", parts))
    objective = trainer.acc.unwrap_model(trainer.objective)
    model = trainer.unwrapped
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # weights the teacher does not hold yet
    old = objective.parts[1]
    whole = MomentumTarget(model if part == "byol" else type(old.target.net)(model, old.last), 0.99)
    state = {k: v for k, v in objective.state_dict().items() if ".target." not in k}
    state.update({f"parts.1.target.{k}": v for k, v in whole.state_dict().items()})
    assert any(".clip.transformer." in k or ".clip.text." in k for k in state)  # the text tower was in it
    objective.load_state_dict(state, strict=True)
    tower = old.target.net if part == "byol" else old.target.net.model
    assert all(torch.equal(a, b) for a, b in zip(tower.visual.parameters(), model.clip.visual.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(tower.head.parameters(), model.view_head.parameters()))
