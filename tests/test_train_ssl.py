"""Self-supervised recipes through the real trainer on digits shards: exact resume with momentum
targets, queues and trained predictor heads in the checkpoint; saved encoders; kNN from the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mmcl.cli import main as mmcl_main
from mmcl.hub import from_pretrained, read_config
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]


def recipe(method: str, digits_dir: Path, out: Path, *extra: str):
    return load_recipe(ROOT / "configs" / f"{method}_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}",
        "data.batch_size=32", "data.num_workers=1", "data.shuffle_buffer=64", "train.steps=4", "train.log_every=1",
        "train.save_every=2", "optim.warmup_steps=1", "train.progress=false", "model.backbone.width=8",
        "model.backbone.depth=3", "eval.knn_train_shards=null", "eval.knn_shards=[]", *extra])


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


def test_simclr_recipe_trains_evaluates_and_reports_knn(digits_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "simclr"
    shards = f"{digits_dir}/val-000000.tar"
    Trainer(recipe("simclr", digits_dir, out, "train.save_every=0", f"eval.knn_train_shards={shards}",
                   f"eval.knn_shards=[{shards}]", "eval.linear=true", "eval.num_workers=0")).fit()
    evals = read_config(out / "final")["info"]["eval"]
    assert {(e["task"], e["dataset"]["name"]) for e in evals} == {("knn", "digits/val"), ("linear", "digits/val")}
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(0 < r["embedding_std"] < 1 for r in rows if "embedding_std" in r)
    assert all(0 <= r["data_wait"] <= 1 for r in rows if "samples_per_s" in r)  # loader's share of the time
    card = (out / "final" / "README.md").read_text()
    assert "kNN classification" in card and "pipeline_tag: image-feature-extraction" in card
    assert mmcl_main(["eval", "knn", "--model", str(out / "final"), "--train-shards", shards, "--shards", shards,
                      "--workers", "0", "--k", "1"]) == 0
    assert "knn top-1: 1.000 on digits/val (180 images)" in capsys.readouterr().out  # each image is its own neighbour


@pytest.mark.parametrize("method", ["cmc", "cpc", "invaspread"])
def test_multiview_and_predictive_recipes_train_save_and_evaluate(method: str, digits_dir: Path,
                                                                   digits_edges_dir: Path, tmp_path: Path,
                                                                   capsys) -> None:
    data = digits_edges_dir if method == "cmc" else digits_dir
    out = tmp_path / method
    # CPC: a 5×5 grid of 16 px patches (3 CNN blocks leave 2×2 maps; on 1×1 maps GroupNorm with one
    # channel per group would output a constant), 3 rows ahead predicted
    extra = ["model.patch_size=16", "model.patch_stride=4", "objective.steps=3"] if method == "cpc" else []
    trainer = Trainer(recipe(method, data, out, "train.save_every=0", *extra))
    trainer.fit()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows if "loss" in r)
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
    shards = f"{data}/val-000000.tar"
    assert mmcl_main(["eval", "knn", "--model", str(out / "final"), "--train-shards", shards, "--shards", shards,
                      "--workers", "0", "--k", "1", "--no-record"]) == 0
    assert "knn top-1: 1.000 on digits/val (180 images)" in capsys.readouterr().out
