"""``train.fsdp`` (FSDP2 through Accelerate) on 2 gloo CPU processes against DDP (``fsdp_worker.py``,
one launch): the same losses and weights step after step, with and without gradient accumulation; a
run checkpointed at step 3 and resumed (under FSDP, and under DDP: one checkpoint format) equals the
uninterrupted one; ``final/`` is one safetensors file that mmcl and open_clip load; on CPU processes
as Accelerate runs them, ``train.fsdp`` is a clear error. Accelerate's choice of FSDP for GPU-type
processes only is flipped in the worker (see its docstring); ``benchmarks/fsdp_check.py`` runs the
unflipped path on GPUs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mmcl.config import ConfigError
from mmcl.recipe import load_recipe

from .launch import torchrun

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("fsdp_worker")
    shards = f"{digits_dir}/train-{{000000..000004}}.tar"
    torchrun(HERE / "fsdp_worker.py", str(tmp / "out.pt"), str(tmp / "runs"), shards, "ddp", "fsdp", "fsdp_resume",
             "ddp_from_fsdp", "fsdp_from_ddp", "ddp_accum", "fsdp_accum", "siglip_ddp", "siglip_fsdp", "cpu_refused",
             timeout=240)
    return torch.load(tmp / "out.pt")


def assert_same(a: dict[str, Any], b: dict[str, Any], steps: list[int], tol: float = TOL) -> None:
    assert [s for s in steps if s in a["losses"]] == steps and [s for s in steps if s in b["losses"]] == steps
    for s in steps:
        assert b["losses"][s] == pytest.approx(a["losses"][s], abs=tol), (s, a["losses"], b["losses"])
    assert set(a["model"]) == set(b["model"])
    for k, v in a["model"].items():
        assert v.shape == b["model"][k].shape, k
        assert (v.double() - b["model"][k].double()).abs().max().item() < tol, k


@pytest.mark.parametrize(("ddp", "fsdp"), [("ddp", "fsdp"), ("ddp_accum", "fsdp_accum"), ("siglip_ddp", "siglip_fsdp")])
def test_fsdp_trains_as_ddp(runs: dict[str, Any], ddp: str, fsdp: str) -> None:
    """Sharded over 2 processes (DTensor parameters), the loss and weights of DDP at every step (CLIP;
    with 2 micro-batches per step; SigLIP), the learned temperature and bias included (0-dim parameters,
    sharded as 1-element ones, saved with their own shape)."""
    assert runs[fsdp]["params"] == "DTensor" and runs[ddp]["params"] == "Parameter"
    assert_same(runs[ddp], runs[fsdp], list(range(1, 7)))
    for scalar in ("clip.logit_scale", "clip.logit_bias"):
        assert runs[fsdp]["model"].get(scalar, torch.zeros(())).shape == ()
    for scalar in ("clip.logit_scale", "clip.logit_bias") if ddp == "siglip_ddp" else ("clip.logit_scale",):
        assert scalar in runs[fsdp]["model"]
    first = runs[ddp]["losses"][1]
    assert abs(runs[ddp]["losses"][6] - first) > 100 * TOL  # training moved the loss well beyond the tolerance


@pytest.mark.parametrize(("resumed", "whole"), [("fsdp_resume", "fsdp"), ("ddp_from_fsdp", "fsdp"),
                                                ("fsdp_from_ddp", "ddp")])
def test_fsdp_checkpoint_resumes_exactly(runs: dict[str, Any], resumed: str, whole: str) -> None:
    """A step-3 checkpoint resumed under FSDP or under DDP (written by either: one format) continues as
    the uninterrupted run: steps 4 to 6 and the final weights."""
    assert sorted(runs[resumed]["losses"]) == [4, 5, 6]
    assert_same(runs[whole], runs[resumed], [4, 5, 6])


def test_fsdp_final_folder_loads_in_open_clip(runs: dict[str, Any]) -> None:
    """``final/`` holds the weights as one safetensors file, which open_clip builds the model from."""
    import open_clip

    final = Path(runs["fsdp"]["final"])
    assert sorted(p.name for p in final.glob("*.safetensors")) == ["open_clip_model.safetensors"]
    model = open_clip.create_model("local-dir:" + str(final))
    state = model.state_dict()
    for k, v in runs["fsdp"]["model"].items():
        assert torch.equal(state[k.removeprefix("clip.")], v), k
    manifest = json.loads(next((final.parent / "checkpoints").glob("step_00000006")).joinpath("manifest.json")
                          .read_text())
    assert manifest["processes"] == 2


def test_fsdp_on_cpu_processes_is_a_clear_error(runs: dict[str, Any]) -> None:
    error = runs["cpu_refused"]["error"]
    assert error and "train.fsdp needs GPU processes" in error and "train.fsdp: false" in error, error


def test_fsdp_refuses_objectives_with_parameters_and_batchnorm() -> None:
    """Momentum copies and trained heads live in the objective, which FSDP does not shard; BatchNorm
    running statistics would drift apart over processes (DDP copies rank 0's at each forward)."""
    from torch import nn

    from mmcl.errors import MmclError
    from mmcl.fsdp import check_modules

    check_modules(nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), nn.Module())
    with pytest.raises(MmclError, match="holds parameters of its own"):
        check_modules(nn.Linear(2, 2), nn.Linear(2, 2))
    with pytest.raises(MmclError, match="BatchNorm running statistics"):
        check_modules(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Module())


def test_fsdp_refuses_evaluation_during_training() -> None:
    with pytest.raises(ConfigError, match="train.fsdp: evaluation during training"):
        load_recipe(ROOT / "configs" / "clip_digits.yaml", ["train.fsdp=true"])
    load_recipe(ROOT / "configs" / "clip_digits.yaml", ["train.fsdp=true", "eval.zeroshot_shards=null"])
