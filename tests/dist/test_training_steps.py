"""The real trainer for several optimizer steps in 2 gloo processes against 1 process on the same
global batches (``trainer_worker.py``): every objective whose negatives are the global batch (CLIP
with its learned temperature, SimCLR, InvaSpread, MoCo v3, SimSiam, CPC, CMC core and full, DCL,
DCLW, NNCLR with its support set; the batch statistics of Barlow Twins and VICReg),
momentum teachers, MoCo's queue wrapping around, DINO's centre, SwAV's frozen prototypes, memory
banks by loss over steps, gradient accumulation under DDP, SyncBN, MoCo's shuffle-BN, and exact
resume of 2 processes with and without it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from .launch import torchrun

HERE = Path(__file__).parent
IN_BATCH = ["clip", "siglip", "siglip_ring", "simclr", "invaspread", "mocov3", "simsiam", "cpc", "cmc", "cmc_full",
            "dcl", "dclw", "nnclr", "barlow_twins", "vicreg", "slip"]
CPU_CASES = ["byol", "moco", "dino", "swav", "swav_queue", "instdisc", "cmc_bank", "simclr_accum", "byol_accum",
             "moco_sync_bn", "clip_grad_cache", "clip_tiled", "siglip_grad_cache", "simclr_accum_grad_cache", *IN_BATCH]
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(digits_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, Any]]:
    """Every case trained by 1 and by 2 processes (one launch each); shuffle-BN and resume with 2 only."""
    tmp = tmp_path_factory.mktemp("trainer_worker")
    shards = f"{digits_dir}/train-{{000000..000004}}.tar"
    out = {}
    for procs in (1, 2):
        cases = CPU_CASES + (["shuffle_bn", "resume_plain", "resume_shuffle_bn", "resume_swav_queue",
                              "resume_resampled"]
                             if procs == 2 else [])
        torchrun(HERE / "trainer_worker.py", str(tmp / f"{procs}.pt"), str(tmp / f"runs{procs}"), shards, *cases,
                 nproc=procs, timeout=300)
        out[procs] = torch.load(tmp / f"{procs}.pt")
    return out


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest absolute difference between two state dicts with the same keys, and where."""
    assert set(a) == set(b)
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].numel() else 0.0 for k in a}
    worst = max(diffs, key=diffs.get, default="")
    return diffs.get(worst, 0.0), worst


def assert_same_run(runs: dict[int, dict[str, Any]], name: str,
                    tol: float = TOL) -> tuple[dict[str, Any], dict[str, Any]]:
    """Same loss at every step and the same final model and objective state (1 vs 2 processes),
    after training that moved the weights well beyond the tolerance."""
    one, two = runs[1][name], runs[2][name]
    assert "error" not in one and "error" not in two, (name, one.get("error"), two.get("error"))
    assert sorted(one["losses"]) == sorted(two["losses"]) == list(range(1, len(one["losses"]) + 1)), name
    assert len(one["losses"]) >= 3, name
    for step, loss in one["losses"].items():
        assert two["losses"][step] == pytest.approx(loss, abs=tol), (name, step, one["losses"], two["losses"])
    for part in ("model", "objective"):
        diff, where = max_diff(one[part], two[part])
        assert diff < tol, (name, part, where, diff)
    moved, _ = max_diff(one["start"], one["model"])
    assert moved > 100 * TOL, (name, moved)
    return one, two


@pytest.mark.parametrize("name", IN_BATCH)
def test_in_batch_objectives_over_steps(name: str, runs: dict[int, dict[str, Any]]) -> None:
    """Negatives (CPC: other patches; SimSiam: none) from every process's rows, gathered with
    gradient: 2 processes on half batches train as 1 process on the whole batch, step after step."""
    # Barlow Twins' loss (about 15) has gradients of about 24: weights equal to 1e-7 after a step give
    # logged losses equal to 3e-5 (a per-process standardisation would be off by more than 1e-1)
    one, two = assert_same_run(runs, name, tol=5 * TOL if name == "barlow_twins" else TOL)
    learned = {"clip": ["clip.logit_scale"], "slip": ["clip.logit_scale"],
               "siglip": ["clip.logit_scale", "clip.logit_bias"],
               "siglip_ring": ["clip.logit_scale", "clip.logit_bias"]}
    for key in learned.get(name, []):  # the temperature (and SigLIP's bias) is learned, and learned the same
        start, end = one["start"][key], one["model"][key]
        assert (end - start).abs().item() > 100 * TOL, (name, key, start, end)
        assert (end - two["model"][key]).abs().item() < TOL, (name, key)


def test_siglip_ring_trains_as_gather(runs: dict[int, dict[str, Any]]) -> None:
    """Texts passed around the ring in chunks of 3, or all-gathered: the same losses and weights, in
    1 process and in 2."""
    for procs in (1, 2):
        ring, gather = runs[procs]["siglip_ring"], runs[procs]["siglip"]
        assert ring["losses"].keys() == gather["losses"].keys()
        for step, loss in gather["losses"].items():
            assert ring["losses"][step] == pytest.approx(loss, abs=TOL), (procs, step)
        diff, where = max_diff(ring["model"], gather["model"])
        assert diff < TOL, (procs, where, diff)


def test_momentum_teachers_queue_and_centre_over_steps(runs: dict[int, dict[str, Any]]) -> None:
    for name in ("byol", "moco", "mocov3", "dino"):
        one, _ = assert_same_run(runs, name)
        state = one["objective"]
        # the teacher is an EMA, neither the online network nor its starting copy
        prefix = "target.net.model." if name == "dino" else "target.net."
        for k, online in one["model"].items():
            if online.is_floating_point() and k.endswith("weight"):
                teacher = state[prefix + k]
                assert not torch.allclose(teacher, online, atol=1e-6), (name, k)
                assert not torch.allclose(teacher, one["start"][k], atol=1e-6), (name, k)
    # MoCo: 4 pushes of 8 keys into 12 rows; the pointer before each step and at the end
    assert [int(s["ptr"]) for s in runs[2]["moco"]["snapshots"]] == [0, 8, 4, 0, 8]
    # DINO: the centre moved at every step (and equally in both runs, checked above)
    centres = [s["center"] for s in runs[2]["dino"]["snapshots"]]
    assert not centres[0].any() and all(not torch.equal(a, b) for a, b in zip(centres, centres[1:]))


def test_nnclr_support_set_over_steps(runs: dict[int, dict[str, Any]]) -> None:
    """4 pushes of 8 gathered projections into 12 rows (the pointer before each step and at the end);
    the final support set is the same in both runs (``test_in_batch_objectives_over_steps``)."""
    for procs in (1, 2):
        assert [int(s["support_ptr"]) for s in runs[procs]["nnclr"]["snapshots"]] == [0, 8, 4, 0, 8], procs


def test_swav_prototypes_stay_frozen_then_train(runs: dict[int, dict[str, Any]]) -> None:
    one, two = assert_same_run(runs, "swav")
    for run in (one, two):  # freeze_prototypes_steps 2: steps 1 and 2 leave their directions unchanged
        protos = [s["prototypes"] for s in run["snapshots"]]  # before steps 1..4, and at the end
        assert torch.allclose(protos[0], protos[1], atol=1e-6) and torch.allclose(protos[0], protos[2], atol=1e-6)
        assert (protos[3] - protos[2]).abs().max() > 1e-4 and (protos[4] - protos[3]).abs().max() > 1e-4


def test_swav_queue_of_each_process_over_steps(runs: dict[int, dict[str, Any]]) -> None:
    one, two = runs[1]["swav_queue"], runs[2]["swav_queue"]
    assert "error" not in one and "error" not in two
    for step, loss in one["losses"].items():  # step 1 has no queue yet; steps 2-3 use it
        assert two["losses"][step] == pytest.approx(loss, abs=TOL), (step, one["losses"], two["losses"])


def test_memory_banks_by_loss_over_steps(runs: dict[int, dict[str, Any]]) -> None:
    for name in ("instdisc", "cmc_bank"):
        one, _ = assert_same_run(runs, name)  # losses, bank rows, seen rows, draw counts, NCE normaliser
        seen = [k for k in one["objective"] if k.endswith("seen")]
        assert seen and all(one["objective"][k].sum() >= 8 for k in seen), name
    assert torch.isfinite(runs[2]["instdisc"]["objective"]["log_z"])


def test_grad_accum_under_ddp(runs: dict[int, dict[str, Any]]) -> None:
    # 2 processes x 2 micro-batches of 4 = 1 process x 2 micro-batches of 8 (SimCLR: the micro-batches
    # are one contrastive batch of 16, whose rows the 2 processes gather in another order: each
    # process's micro-batches in turn; float32 sums in another order, 1.8e-5 after 3 steps) ... and,
    # without in-batch negatives, 1 process on all 16 rows (BYOL)
    assert_same_run(runs, "simclr_accum", tol=3 * TOL)
    assert_same_run(runs, "byol_accum")


def test_grad_cache_under_ddp_equals_the_whole_batch(runs: dict[int, dict[str, Any]]) -> None:
    """``train.grad_cache: 3`` in 1 and 2 processes (with accumulation for SimCLR; with the CLIP loss in
    3 x 3 blocks, ``objective.tile: 3``; SigLIP around the ring in chunks of 3) trains as the same
    recipe without it: same losses at every step, same weights."""
    # the tiled loss sums its float32 blocks in another order: 1.5e-5 after 4 steps (a wrong block,
    # a missing target term, would be off by orders of magnitude more)
    for cached, plain, tol in (("clip_grad_cache", "clip", TOL), ("clip_tiled", "clip", 3 * TOL),
                               ("siglip_grad_cache", "siglip", 3 * TOL),
                               ("simclr_accum_grad_cache", "simclr_accum", TOL)):
        one, two = assert_same_run(runs, cached, tol)
        for run, reference in ((one, runs[1][plain]), (two, runs[2][plain])):
            for step, loss in reference["losses"].items():
                assert run["losses"][step] == pytest.approx(loss, abs=tol), (cached, step)
            diff, where = max_diff(run["model"], reference["model"])
            assert diff < tol, (cached, where, diff)


def test_sync_bn_two_processes_equal_one_process(runs: dict[int, dict[str, Any]], digits_dir: Path,
                                                 tmp_path: Path) -> None:
    """MoCo with a BatchNorm encoder, SyncBN and shuffle-BN: 2 processes on half batches = 1 process
    on the whole batch. SyncBatchNorm runs on GPUs only (torch has no CPU kernel)."""
    error = runs[2]["moco_sync_bn"].get("error")
    if torch.cuda.device_count() < 2:  # on CPU processes: a clear error naming the fix
        assert error and "train.sync_bn needs GPU processes" in error and "train.sync_bn=false" in error, error
        pytest.skip("SyncBatchNorm needs 2 GPUs")
    shards = f"{digits_dir}/train-{{000000..000004}}.tar"
    gpu = {}
    for procs in (1, 2):
        torchrun(HERE / "trainer_worker.py", str(tmp_path / f"{procs}.pt"), str(tmp_path / f"runs{procs}"), shards,
                 "moco_sync_bn", nproc=procs, cpu=False, timeout=300)
        gpu[procs] = torch.load(tmp_path / f"{procs}.pt")
    assert gpu[2]["moco_sync_bn"]["device"].startswith("cuda")
    assert_same_run(gpu, "moco_sync_bn")


def test_shuffle_bn_encodes_keys_on_a_cross_process_permutation(runs: dict[int, dict[str, Any]]) -> None:
    """Each process gets back the keys of its own rows, each computed in a BatchNorm batch of 4 rows
    drawn from both processes (one split of the global batch, the same on both processes), so a
    key's batch statistics do not come from its query's batch; without shuffle-BN the BatchNorm
    batches are the processes' own rows."""
    found = runs[2]["shuffle_bn"]
    own = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert found["False"] == [own] * 3
    assert all(split is not None for split in found["True"]), found
    assert any(split != own for split in found["True"]), found


@pytest.mark.parametrize("name", ["resume_plain", "resume_shuffle_bn", "resume_swav_queue", "resume_resampled"])
def test_two_process_resume_is_exact(name: str, runs: dict[int, dict[str, Any]]) -> None:
    """MoCo v2 with a BatchNorm encoder, without and with shuffle-BN, and SwAV with queues, on the
    real digits loader, resumed at step 3 of 6. Shuffle-BN draws its permutations from the global
    torch RNG (the loader must not shift it at a resume); SwAV's queues are each process's own
    (each process must get its own back); a resampled stream (shards drawn with replacement,
    ``data.resample``) resumed mid-epoch draws what the uninterrupted run drew."""
    r = runs[2][name]
    assert sorted(r["resumed"]) == [4, 5, 6]
    for step, loss in r["resumed"].items():
        assert loss == pytest.approx(r["full"][step], abs=1e-6), (step, r)
