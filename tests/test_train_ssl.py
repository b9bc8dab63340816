"""Self-supervised recipes through the real trainer on digits shards: exact resume with momentum
targets, queues and trained predictor heads in the checkpoint; saved encoders; and learning: a few
seconds of training beat the same encoder at its initialisation by kNN on held-out digits."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.cli import main as mmcl_main
from mmcl.errors import DataError
from mmcl.evaluate.run import frozen_feature_evals
from mmcl.hub import from_pretrained, read_config
from mmcl.recipe import load_recipe
from mmcl.registry import build
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def recipe(method: str, digits_dir: Path, out: Path, *extra: str):
    return load_recipe(ROOT / "configs" / f"{method}_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}",
        "data.batch_size=32", "data.num_workers=1", "data.shuffle_buffer=64", "train.steps=4", "train.log_every=1",
        "train.save_every=2", "optim.warmup_steps=1", "train.progress=false", "model.backbone.width=8",
        "model.backbone.depth=3", "eval.knn_train_shards=null", "eval.knn_shards=[]", *extra])


# Enough training to learn (20 steps of 128 images, GroupNorm CNN): SimCLR, InvaSpread, CMC and CPC
# then beat their initialisation by 0.13-0.24 kNN top-1 on the held-out test split (seeds 0, 1, 2)
LEARN = ["data.batch_size=128", "data.shuffle_buffer=256", "train.steps=20", "optim.lr=5e-3", "optim.warmup_steps=1",
         "model.backbone.norm=gn", "train.save_every=0"]
MARGIN = 0.08


def initial_encoder(trainer: Trainer) -> torch.nn.Module:
    """The recipe's model built through the registry with the run's seed, on CPU: the encoder the
    trainer starts from (checked against the trainer's before it trains)."""
    r = trainer.recipe
    torch.manual_seed(r.run.seed)
    model = build("model", r.model).eval()
    start, built = trainer.unwrapped.state_dict(), model.state_dict()
    assert set(start) == set(built) and all(torch.equal(v, start[k].cpu()) for k, v in built.items())
    return model


def held_out_knn(model: torch.nn.Module, data: Path, preprocess: dict) -> float:
    """kNN top-1 (k 20) on the held-out test split, the training shards as the labelled reference."""
    res = frozen_feature_evals(model, f"{data}/train-{{000000..000004}}.tar", [f"{data}/test-{{000000..000001}}.tar"],
                               preprocess=preprocess, k=20, num_workers=0)
    return res[0]["metrics"]["top1"]


def cli_knn(model: Path, data: Path, capsys, *extra: str) -> float:
    """kNN top-1 (k 20) on the held-out test split as ``mmcl eval knn`` prints it."""
    assert mmcl_main(["eval", "knn", "--model", str(model), "--train-shards", f"{data}/train-{{000000..000004}}.tar",
                      "--shards", f"{data}/test-{{000000..000001}}.tar", "--workers", "0", "--k", "20", *extra]) == 0
    printed = capsys.readouterr().out
    found = re.search(r"knn top-1: ([0-9.]+) on digits/test \(360 images\)", printed)
    assert found, printed
    return float(found.group(1))


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("method", ["moco_v2", "byol", "instdisc"])
def test_resumed_ssl_run_matches_uninterrupted_run(method: str, digits_dir: Path, tmp_path: Path) -> None:
    full = tmp_path / "full"
    trainer = Trainer(recipe(method, digits_dir, full))
    trainer.fit()
    reference = losses(full)
    part = tmp_path / "part"
    shutil.copytree(full / "checkpoints" / "step_00000002", part / "checkpoints" / "step_00000002")
    Trainer(recipe(method, digits_dir, part)).fit(resume="latest")
    resumed = losses(part)
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert resumed[step] == pytest.approx(reference[step], abs=1e-5), (step, resumed, reference)
    objective = trainer.acc.unwrap_model(trainer.objective)
    if method == "instdisc":  # the memory bank (and NCE's normaliser) came back from the checkpoint
        assert int(objective.bank.seen.sum()) == 4 * 32
        return
    # the momentum target moved, and the saved encoder is the online network
    online = dict(trainer.unwrapped.named_parameters())
    target = dict(objective.target.net.named_parameters())
    assert any(not torch.equal(online[k], target[k]) for k in online)
    device = trainer.acc.device  # the GPU where there is one
    saved = from_pretrained(full / "final").to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    with torch.no_grad():
        assert torch.allclose(saved.encode_image(x), trainer.unwrapped.eval().encode_image(x), atol=1e-6)
    assert read_config(full / "final")["model_name"] == "encoder"


def test_instdisc_ids_outside_its_bank_stop_the_run_at_the_first_logging_window(digits_dir: Path,
                                                                                 tmp_path: Path) -> None:
    """No step waits to check the ids against the memory bank: they are checked where the trainer reads
    the device anyway (``Objective.check_deferred``), so ids beyond ``objective.bank_size`` (digits' run
    to 1796) stop the run at the first logging window, with the setting to change, before any
    checkpoint is written."""
    out = tmp_path / "run"
    trainer = Trainer(recipe("instdisc", digits_dir, out, "objective.bank_size=100", "train.log_every=2"))
    with pytest.raises(DataError, match=r"^sample ids range \d+\.\.\d+ but the memory bank has 100 rows: set "
                                        r"objective\.bank_size above the largest training id"):
        trainer.fit()
    assert trainer.state.step == 2 and not list(out.glob("checkpoints/step_*"))


def test_simclr_learns_features_that_beat_its_initialisation_on_held_out_digits(digits_dir: Path, tmp_path: Path,
                                                                                capsys) -> None:
    out = tmp_path / "simclr"
    train, test = f"{digits_dir}/train-{{000000..000004}}.tar", f"{digits_dir}/test-{{000000..000001}}.tar"
    trainer = Trainer(recipe("simclr", digits_dir, out, *LEARN, f"eval.knn_train_shards={train}",
                             f"eval.knn_shards=['{test}']", "eval.knn_k=20", "eval.linear=true", "eval.num_workers=0"))
    initial = initial_encoder(trainer)
    trainer.fit()
    evals = read_config(out / "final")["info"]["eval"]
    assert {(e["task"], e["dataset"]["name"]) for e in evals} == {("knn", "digits/test"), ("linear", "digits/test")}
    knn = next(e for e in evals if e["task"] == "knn")
    assert knn["k"] == 20
    before = held_out_knn(initial, digits_dir, trainer.recipe.data.preprocess())
    assert knn["metrics"]["top1"] >= before + MARGIN, (knn["metrics"], before)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stds = [r["embedding_std"] for r in rows if "embedding_std" in r]
    # not collapsed: 0 for a constant embedding, 1/√d when spread out (early training dips to ~0.4/√d)
    assert len(stds) == 20 and stds[-1] > 0.2 / math.sqrt(128), stds
    assert all(0 <= r["data_wait"] <= 1 for r in rows if "samples_per_s" in r)  # loader's share of the time
    card = (out / "final" / "README.md").read_text()
    assert "kNN classification" in card and "pipeline_tag: image-feature-extraction" in card
    # the command line finds what the trainer recorded, for the saved encoder (to one image: GPU vs
    # CPU), and records it in place of the trainer's result
    printed = cli_knn(out / "final", digits_dir, capsys)
    assert printed == pytest.approx(knn["metrics"]["top1"], abs=1.01 / 360)
    again = read_config(out / "final")["info"]["eval"]
    assert sorted(e["task"] for e in again) == ["knn", "linear"]
    assert round(next(e for e in again if e["task"] == "knn")["metrics"]["top1"], 3) == printed


@pytest.mark.parametrize("method", ["cmc", "cpc", "invaspread"])
def test_multiview_and_predictive_recipes_learn_save_and_evaluate(method: str, digits_dir: Path,
                                                                   digits_edges_dir: Path, tmp_path: Path,
                                                                   capsys) -> None:
    data = digits_edges_dir if method == "cmc" else digits_dir
    out = tmp_path / method
    # CPC: a 5×5 grid of 16 px patches (3 CNN blocks leave 2×2 maps; on 1×1 maps GroupNorm with one
    # channel per group would output a constant), 3 rows ahead predicted, 64 images a step
    extra = ["model.patch_size=16", "model.patch_stride=4", "objective.steps=3", "data.batch_size=64"] \
        if method == "cpc" else []
    trainer = Trainer(recipe(method, data, out, *LEARN, *extra))
    initial = initial_encoder(trainer)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 21)) and rows[-1]["bad_steps"] == 0
    if method == "cpc":
        assert {"acc_k1", "acc_k2", "acc_k3"} <= set(rows[-1])
    if method == "cmc":  # the card tells users each field goes to its own encoder
        assert "one image per field png, edges.png" in (out / "final" / "README.md").read_text()
    device = trainer.acc.device
    saved = from_pretrained(out / "final").to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    x = [x, torch.randn_like(x)] if method == "cmc" else x
    with torch.no_grad():
        assert torch.allclose(saved.encode_image(x), trainer.unwrapped.eval().encode_image(x), atol=1e-6)
    before = held_out_knn(initial, data, trainer.recipe.data.preprocess())
    after = cli_knn(out / "final", data, capsys, "--no-record")
    assert after >= before + MARGIN, (after, before)


def test_channels_last_trains_the_same_weights(digits_dir: Path, tmp_path: Path) -> None:
    """``train.channels_last`` changes the memory order of weights and batches, not the run: BYOL (a
    momentum copy of the model, a trained predictor) over 4 steps gives the plain run's losses and
    weights to float round-off (convolutions in the other order sum in another order)."""
    runs, losses = {}, {}
    for order in ("false", "true"):
        trainer = Trainer(recipe("byol", digits_dir, tmp_path / order, f"train.channels_last={order}",
                                 "train.save_every=0"))
        conv = next(p for p in trainer.unwrapped.parameters() if p.dim() == 4)
        assert conv.is_contiguous(memory_format=torch.channels_last) == (order == "true")
        trainer.fit()
        runs[order] = torch.cat([v.float().flatten() for v in trainer.unwrapped.state_dict().values()])
        rows = [json.loads(line) for line in (tmp_path / order / "metrics.jsonl").read_text().splitlines()]
        losses[order] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses["true"]) == 4 and losses["true"] == pytest.approx(losses["false"], rel=1e-4)
    torch.manual_seed(trainer.recipe.run.seed)  # the trainer's set_seed: the weights both runs started from
    start = torch.cat([v.float().flatten() for v in build("model", trainer.recipe.model).state_dict().values()])
    moved = (runs["false"] - start).norm()
    # the two runs differ far less than training moved the weights
    assert moved > 0 and (runs["true"] - runs["false"]).norm() < 1e-2 * moved, moved
