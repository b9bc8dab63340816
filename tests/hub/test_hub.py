"""Model folders and the Hub, with no network: save/load round trip, the model card, and push/pull
against an in-memory Hub stand-in on 127.0.0.1 (mmcl, open_clip ``hf-hub:`` and ``local-dir:``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmcl.errors import MmclError
from mmcl.evaluate.run import result
from mmcl.hub import from_pretrained, push, read_config, record_eval, save_pretrained
from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.testing.hub_standin import HubStandIn
from mmcl.transformers_export import export_files

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "hf_standinSECRETtoken0123456789"
PRE = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory, digits_dir: Path) -> Path:
    """A tiny open_clip-tower CLIP saved with a training summary, a validation result and its
    ``transformers/`` folder, as a trained model's ``final/`` holds them."""
    torch.manual_seed(0)
    model = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit"))
    info = {"run_name": "tiny-test", "objective": "clip", "train": {"steps": 3, "global_batch": 8},
            "data": {"train_samples": 1257, "class_names": ["zero", "one"]},
            "eval": [result("zeroshot", f"{digits_dir}/val-000000.tar", {"top1": 0.5, "top5": 0.9})]}
    info["transformers"], info["transformers_class"] = "transformers", "CLIPModel"
    return save_pretrained(model, tmp_path_factory.mktemp("m") / "final", name="clip", preprocess=PRE, info=info,
                           files=export_files(model, PRE))


@pytest.fixture()
def hub():
    with HubStandIn({TOKEN: "alice", "hf_bob": "bob"}, orgs={"lab": {"alice"}}) as server:
        yield server


def client_env(hub: HubStandIn, home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}


def test_round_trip_is_identical_and_loads_no_code(folder: Path, tmp_path: Path) -> None:
    model = from_pretrained(folder)
    again = from_pretrained(save_pretrained(model, tmp_path / "again", name="clip", preprocess=PRE))
    x = torch.randn(2, 3, 32, 32)
    tokens = model.tokenizer()(["seven", "a digit"])
    with torch.no_grad():
        assert torch.equal(model.encode_image(x), again.encode_image(x))
        assert torch.equal(model.encode_text(tokens), again.encode_text(tokens))
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["README.md", "mmcl_config.json", "open_clip_config.json", "open_clip_model.safetensors",
                     "transformers"]
    assert not any(p.suffix in (".py", ".bin", ".pt", ".pkl") for p in folder.rglob("*"))


def test_card_metadata_parses_and_tracks_the_latest_results(folder: Path, digits_dir: Path) -> None:
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard((folder / "README.md").read_text())
    meta = card.data.to_dict()
    assert meta["library_name"] == "open_clip" and meta["pipeline_tag"] == "zero-shot-image-classification"
    assert {"clip", "contrastive-learning", "mmcl"} <= set(meta["tags"]) and meta["license"] == "apache-2.0"
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-test" and {(r.task_type, r.dataset_name, r.dataset_split, r.metric_type, r.metric_name,
                                     r.metric_value) for r in results} == {
        ("zero-shot-image-classification", "digits/val", "val", "accuracy", "zeroshot top1", 0.5),
        ("zero-shot-image-classification", "digits/val", "val", "accuracy", "zeroshot top5", 0.9)}
    assert card.data.eval_results == results  # what the Hub reads from the card
    # a new result on another split is added, a repeated one replaces the old figures
    record_eval(folder, [result("zeroshot", f"{digits_dir}/test-{{000000..000001}}.tar", {"top1": 0.75, "top5": 1})])
    record_eval(folder, [result("zeroshot", f"{digits_dir}/val-000000.tar", {"top1": 0.625, "top5": 1})])
    evals = read_config(folder)["info"]["eval"]
    assert [(e["dataset"]["name"], e["dataset"]["samples"], e["metrics"]["top1"]) for e in evals] == [
        ("digits/test", 360, 0.75), ("digits/val", 180, 0.625)]
    text = (folder / "README.md").read_text()
    assert "| zero-shot classification | digits/test | 360 | top1 | 0.7500 |" in text
    assert "0.5000" not in text and "local-dir:PATH/TO/FOLDER" in text


def test_push_then_pull_with_mmcl_and_open_clip(folder: Path, digits_dir: Path, hub: HubStandIn,
                                                tmp_path: Path) -> None:
    env = client_env(hub, tmp_path / "hf")
    run = subprocess.run([sys.executable, "-m", "mmcl", "push", "--model", str(folder), "--repo-id", "lab/tiny"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "pushed" in run.stdout and TOKEN not in run.stdout + run.stderr
    repo = hub.repos["lab/tiny"]
    sha, files = repo.files("main")
    assert repo.private and sorted(files) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                                                    if p.is_file())
    assert "transformers/model.safetensors" in files
    assert files["open_clip_model.safetensors"] == (folder / "open_clip_model.safetensors").read_bytes()
    assert 'hf-hub:lab/tiny' in files["README.md"].decode()  # the uploaded card names the repo
    assert all(TOKEN.encode() not in data for data in files.values())
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for m, p, h in hub.requests if m == "POST")

    shards = f"{digits_dir}/val-000000.tar"
    client = [sys.executable, str(ROOT / "tests" / "hub" / "hub_client.py"), "lab/tiny", str(folder), shards]
    run = subprocess.run(client, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    hf = out.pop("transformers_hub")   # CLIPModel.from_pretrained(repo, subfolder="transformers")
    assert hf["image_diff"] < 1e-5 and hf["text_diff"] < 1e-5, hf
    assert set(out) == {"mmcl_local", "mmcl_hub", "open_clip_hf_hub", "open_clip_local_dir"}
    for name, r in out.items():
        assert r["image_diff"] < 1e-5 and r["text_diff"] < 1e-5, name
        assert r["confusion"] == out["mmcl_local"]["confusion"] and r["top1"] == out["mmcl_local"]["top1"], name
        assert r["preprocess"] == PRE, name
    # HF_HUB_OFFLINE: the second load comes from the cache without a single request
    before = len(hub.requests)
    run = subprocess.run(client + ["--offline"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout.strip().splitlines()[-1])["mmcl_hub"]["image_diff"] < 1e-5
    assert len(hub.requests) == before


def test_push_to_a_branch_and_push_errors(folder: Path, hub: HubStandIn, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    push(folder, "alice/tiny", revision="v1", token=TOKEN, endpoint=hub.url, commit_message="first")
    repo = hub.repos["alice/tiny"]
    assert repo.files("main")[1] == {} and "open_clip_model.safetensors" in repo.files("v1")[1]
    assert repo.messages == ["first"]
    errors = {
        "no write access to 'bob/tiny'": dict(repo_id="bob/tiny", token=TOKEN, endpoint=hub.url),
        "rejected the token": dict(repo_id="alice/x", token="hf_wrong", endpoint=hub.url),
        "cannot reach the Hub": dict(repo_id="alice/x", token=TOKEN, endpoint="http://127.0.0.1:9"),
        "expected ORG/NAME": dict(repo_id="tiny", token=TOKEN, endpoint=hub.url),
    }
    for message, kwargs in errors.items():
        with pytest.raises(MmclError, match=message) as e:
            push(folder, **kwargs)
        assert TOKEN not in str(e.value)
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(MmclError, match="no Hugging Face token"):
        push(folder, "alice/y", endpoint=hub.url)
    with pytest.raises(MmclError, match="not an mmcl model folder"):
        push(tmp_path, "alice/y", token=TOKEN, endpoint=hub.url)
    assert "bob/tiny" not in hub.repos and "alice/x" not in hub.repos


def test_training_pushes_when_the_recipe_asks(digits_dir: Path, hub: HubStandIn, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    from mmcl.recipe import load_recipe
    from mmcl.train import Trainer

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    def recipe(out: Path, repo: str):
        return load_recipe(ROOT / "configs" / "clip_digits.yaml", [
            f"data.train_shards={digits_dir}/train-000000.tar", f"run.output_dir={out}", "data.batch_size=16",
            "data.num_workers=0", "train.steps=2", "train.progress=false", "eval.zeroshot_shards=null",
            "hub.push=true", f"hub.repo_id={repo}"])

    final = Trainer(recipe(tmp_path / "ok", "lab/run")).fit()
    files = hub.repos["lab/run"].files("main")[1]
    assert files["open_clip_model.safetensors"] == (final / "open_clip_model.safetensors").read_bytes()
    assert hub.repos["lab/run"].messages == ["mmcl: ok, step 2"]
    with pytest.raises(MmclError, match=r"no write access(.|\n)*saved in .*mmcl push --model") as e:
        Trainer(recipe(tmp_path / "denied", "bob/run")).fit()
    assert (tmp_path / "denied" / "final" / "open_clip_model.safetensors").is_file() and TOKEN not in str(e.value)


def test_card_names_the_base_model_the_dataset_and_the_license() -> None:
    """``base_model`` for towers that started from Hub weights, ``datasets`` for shards prepared from a
    Hub dataset, ``license`` from ``hub.license``: as huggingface_hub parses them."""
    from huggingface_hub import ModelCard

    from mmcl.card import render

    config = {"model_name": "clip", "model_cfg": {}, "info": {
        "run_name": "ft", "objective": "clip", "license": "mit",
        "starts_from": {"image": "hf-hub:lab/base-clip", "text": "hf-hub:lab/base-clip"},
        "data": {"source": {"type": "hf", "name": "lab/pairs"}, "train_samples": 10}}}
    data = ModelCard(render(config)).data
    assert data.base_model == "lab/base-clip" and data.datasets == ["lab/pairs"] and data.license == "mit"
    assert "model-index" not in data.to_dict()  # no results yet


def test_card_lists_the_training_facts_under_training() -> None:
    """The run's ``info.train`` figures are in every card's Training section, merged model or not."""
    from mmcl.card import render

    info = {"run_name": "run", "objective": "clip", "train": {"steps": 7, "wall_s": 12.5}}
    for extra in ({}, {"merged": {"method": "WiSE-FT", "alpha": 0.5, "zero_shot": "a", "fine_tuned": "b"}}):
        text = render({"model_name": "clip", "model_cfg": {}, "info": {**info, **extra}})
        training = text.split("## Training", 1)[1].split("\n## ", 1)[0]
        assert "- steps: 7" in training and "- training time (s): 12.5" in training
