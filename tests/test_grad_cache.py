"""Gradient caching (mmcl/gradcache.py): the gradients of a chunked step equal the whole batch's,
random masks are replayed, and the trainer's ``train.grad_cache`` trains as without it. (Several
processes, and accumulation under DDP: tests/dist/test_training_steps.py.)"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
import torch

from mmcl.config import ConfigError
from mmcl.gradcache import grad_cache_step, split
from mmcl.models.clip import ClipModel, ClipModelConfig
from mmcl.objectives.clip import ClipLoss
from mmcl.recipe import load_recipe
from mmcl.registry import build
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def clip_batch(model: ClipModel, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    texts = [f"a photo of the digit {words[i % 10]} {'big' if i % 3 else 'small'}" for i in range(n)]
    return {"image": torch.randn(n, 3, 32, 32, generator=g), "text": model.tokenizer()(texts),
            "key": [str(i) for i in range(n)]}


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def assert_same_grads(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """All gradients together equal to ``tol`` relative to their norm, each to ``10 * tol`` (float32
    sums in another order: a small gradient's own relative error can exceed ``tol``), none missing."""
    assert a.keys() == b.keys() and a
    whole_a, whole_b = (torch.cat([g[k].flatten() for k in sorted(g)]) for g in (a, b))
    assert ((whole_a - whole_b).norm() / whole_b.norm()).item() < tol
    for k in a:
        rel = ((a[k] - b[k]).norm() / b[k].norm().clamp(min=1e-12)).item()
        assert rel < 10 * tol, (k, rel)


def test_split_slices_per_sample_members_only() -> None:
    batch = {"image": torch.arange(10).reshape(5, 2), "views": [torch.zeros(5, 3), torch.ones(5, 3)],
             "key": list("abcde"), "tokens": {"input_ids": torch.ones(5, 4)}, "scale": torch.tensor(2.0),
             "names": ["x", "y"]}
    part = split(batch, 1, 3, 5)
    assert torch.equal(part["image"], batch["image"][1:3]) and [v.shape[0] for v in part["views"]] == [2, 2]
    assert part["key"] == ["b", "c"] and part["tokens"]["input_ids"].shape == (2, 4)
    assert part["scale"] is batch["scale"] and part["names"] == ["x", "y"]


@pytest.mark.parametrize("keep_last", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 11, 12])
def test_clip_grad_cache_equals_the_whole_batch(chunk: int, keep_last: bool) -> None:
    """CLIP (open_clip tiny ViT + text transformer, learned logit_scale): loss and every gradient,
    with chunks that do not divide the batch of 12 (and one chunk of all), the last chunk's first
    pass kept or run again."""
    torch.manual_seed(0)
    model, loss_fn = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit")), ClipLoss()
    batch = clip_batch(model, 12, seed=1)
    loss, metrics = loss_fn(model(batch), batch)
    loss.backward()
    whole = grads(model)
    cached_loss, cached_metrics = grad_cache_step(model, loss_fn, batch, chunk, device=CPU, keep_last=keep_last)
    assert cached_loss.item() == pytest.approx(loss.item(), abs=1e-6)
    assert cached_metrics.keys() == metrics.keys()
    assert_same_grads(grads(model), whole)
    assert "clip.logit_scale" in whole and whole["clip.logit_scale"].abs().item() > 0


def test_simclr_grad_cache_equals_the_whole_batch_with_objective_parameters() -> None:
    """SimCLR on a GroupNorm encoder (two views per sample), and MoCo v3, whose predictor is a
    parameter of the objective: its gradient comes from the loss pass, the encoder's from the replay."""
    for config, extra in (("simclr_digits", []), ("moco_v3_digits", ["objective.predictor={dims: [32, 16], "
                                                                     "norm: none}"])):
        r = load_recipe(ROOT / "configs" / f"{config}.yaml", [
            "data.train_shards=unused.tar", "model.backbone={name: cnn, width: 8, depth: 2, norm: gn}",
            "model.projector={dims: [32, 16], norm: none}", *extra])
        torch.manual_seed(0)
        # float64: a CNN's tiny gradients would otherwise show float32 summation order at 1e-5
        model, objective = build("model", r.model).double(), build("objective", r.objective)
        objective.setup(model, 10)
        objective.double()
        g = torch.Generator().manual_seed(2)
        batch = {"views": [torch.randn(10, 3, 32, 32, generator=g, dtype=torch.float64) for _ in range(2)],
                 "key": [str(i) for i in range(10)]}
        loss, _ = objective(model(batch), batch)
        loss.backward()
        whole, whole_obj = grads(model), grads(objective)
        cached, _ = grad_cache_step(model, objective, batch, 4, device=CPU)
        assert cached.item() == pytest.approx(loss.item(), abs=1e-6), config
        assert_same_grads(grads(model), whole)
        if whole_obj:
            assert_same_grads(grads(objective), whole_obj)


@pytest.mark.parametrize("keep_last", [True, False])
def test_random_masks_are_replayed(keep_last: bool) -> None:
    """With FLIP patch dropout (random per sample) the replayed chunks draw the masks of the first
    pass: the gradients equal those of the same chunked forward taken with a graph at once. Without
    the replay of the random state they would not."""
    model = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit", patch_dropout=0.5)).train()
    loss_fn = ClipLoss()
    batch = clip_batch(model, 9, seed=3)
    torch.manual_seed(5)  # reference: the same chunks, in order, with a graph
    outs = [model(split(batch, s, min(s + 4, 9), 9)) for s in range(0, 9, 4)]
    joined = {"image_features": torch.cat([o["image_features"] for o in outs]),
              "text_features": torch.cat([o["text_features"] for o in outs]), "logit_scale": outs[-1]["logit_scale"]}
    ref_loss, _ = loss_fn(joined, batch)
    ref_loss.backward()
    reference = grads(model)
    torch.manual_seed(5)
    loss, _ = grad_cache_step(model, loss_fn, batch, 4, device=CPU, keep_last=keep_last)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)
    assert_same_grads(grads(model), reference)
    torch.manual_seed(6)  # another draw gives other gradients: the masks matter here
    loss_fn(model(batch), batch)[0].backward()
    other = grads(model)
    assert max(((other[k] - reference[k]).norm() / reference[k].norm()).item() for k in reference) > 1e-3


@pytest.mark.parametrize("keep_last, passes", [(True, 5), (False, 6)])
def test_the_last_chunk_is_not_run_again(keep_last: bool, passes: int) -> None:
    """Three chunks: every chunk is embedded once, then all but the kept last one again (with
    ``keep_last``), all three again without; the forward passes with a graph are the chunks run for
    their backward, and the kept chunk's backward is the first, so DDP's synchronising one is the
    last re-run (it alone runs outside ``no_sync``)."""
    model = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit"))
    batch = clip_batch(model, 10, seed=2)
    calls: list[tuple[int, bool, bool]] = []  # (chunk size, with a graph, inside no_sync)
    syncing = {"off": False}

    @contextlib.contextmanager
    def no_sync():
        syncing["off"] = True
        yield
        syncing["off"] = False

    def embed(b):
        calls.append((len(b["key"]), torch.is_grad_enabled(), syncing["off"]))
        return model(b)

    grad_cache_step(embed, ClipLoss(), batch, 4, device=CPU, no_sync=no_sync, keep_last=keep_last)
    assert len(calls) == passes
    assert [c[0] for c in calls[:3]] == [4, 4, 2]  # the first pass, in order
    assert [c[1] for c in calls[:3]] == [False, False, keep_last]
    reruns = calls[3:]
    assert all(graph for _, graph, _ in reruns)
    assert [size for size, _, _ in reruns] == ([4, 4] if keep_last else [4, 4, 2])
    assert [off for _, _, off in reruns] == [True] * (len(reruns) - 1) + [False]  # one synchronising pass, last
    if keep_last:
        assert calls[2][2]  # the kept chunk's pass, whose backward comes first, does not synchronise


def test_the_random_state_after_a_step_is_the_first_pass_state() -> None:
    """Replaying the chunks' random state must not make the next step draw the same numbers again:
    after the step the generator is where the first pass and the objective's own draws left it."""
    model = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit", patch_dropout=0.5)).train()
    batch = clip_batch(model, 6, seed=4)

    def drawing_loss(out, b):  # an objective that draws, as MoCo's shuffle does
        return ClipLoss()(out, b)[0] + 0 * torch.rand(()), {}

    torch.manual_seed(7)
    grad_cache_step(model, drawing_loss, batch, 4, device=CPU)
    after = torch.get_rng_state()
    torch.manual_seed(7)
    with torch.no_grad():
        model(split(batch, 0, 4, 6))
        model(split(batch, 4, 6, 6))
    torch.rand(())
    assert torch.equal(after, torch.get_rng_state())


def trainer(digits_dir: Path, out: Path, *extra: str) -> Trainer:
    return Trainer(load_recipe(ROOT / "configs" / "clip_digits.yaml", [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={out}",
        "data.batch_size=16", "data.num_workers=0", "data.shuffle_buffer=50", "train.steps=3", "train.log_every=1",
        "optim.warmup_steps=1", "train.progress=false", "eval.zeroshot_shards=null", *extra]))


@pytest.mark.parametrize("extra", [[], ["optim.grad_accum=2"]])
def test_trainer_with_grad_cache_trains_as_without(digits_dir: Path, tmp_path: Path, extra: list[str]) -> None:
    """Three optimizer steps of the real trainer (with and without accumulation) give the same weights
    with ``train.grad_cache: 5`` as without (batches of 16: chunks of 5, 5, 5 and 1)."""
    plain = trainer(digits_dir, tmp_path / "plain", *extra)
    plain.fit()
    cached = trainer(digits_dir, tmp_path / "cached", "train.grad_cache=5", *extra)
    cached.fit()
    a, b = plain.unwrapped.state_dict(), cached.unwrapped.state_dict()
    moved = max((a[k] - s).abs().max().item() for k, s in trainer(digits_dir, tmp_path / "s").unwrapped
                .state_dict().items())
    assert moved > 1e-3
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_grad_cache_must_be_below_the_batch(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"train.grad_cache \(64\) must be below data.batch_size \(64\)"):
        load_recipe(ROOT / "configs" / "clip_digits.yaml", ["data.batch_size=64", "train.grad_cache=64"])


@pytest.mark.parametrize("objective, extra", [
    ("clip", ["eval.zeroshot_shards=null"]),
    ("simclr", ["model.backbone.norm=gn", "model.backbone.width=8", "model.backbone.depth=2",  # no BatchNorm:
                "model.projector={dims: [32, 16], norm: none}", "eval.knn_train_shards=null",  # its statistics
                "eval.knn_shards=[]", "eval.linear=false"]),  # would be per embedded chunk
])
def test_accumulated_micro_batches_are_one_contrastive_batch(digits_dir: Path, tmp_path: Path, objective: str,
                                                             extra: list[str]) -> None:
    """``data.batch_size: 8`` with ``optim.grad_accum: 2`` trains as ``data.batch_size: 16``: the
    loss sees the 16 samples of a step together (its first value near ln 16 for CLIP, not ln 8, as
    plain accumulation gave), and losses and weights over 3 steps equal to 1e-5. One loader process:
    the same samples in the same order either way."""
    def run(out: str, *more: str) -> tuple[dict[int, float], Trainer, str]:
        t = Trainer(load_recipe(ROOT / "configs" / f"{objective}_digits.yaml", [
            f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={tmp_path / out}",
            "data.num_workers=0", "data.shuffle_buffer=32", "train.steps=3", "train.log_every=1",
            "train.save_every=0", "optim.warmup_steps=1", "train.progress=false", *extra, *more]))
        said = t.sizes()
        t.fit()
        rows = [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}, t, said

    whole, big, _ = run("whole", "data.batch_size=16")
    merged, small, said = run("merged", "data.batch_size=8", "optim.grad_accum=2")
    assert "the loss sees 16 samples at a time" in said and "one contrastive batch" in said
    if objective == "clip":
        assert abs(whole[1] - math.log(16)) < 0.3
    assert sorted(merged) == [1, 2, 3]
    for step, loss in whole.items():
        assert merged[step] == pytest.approx(loss, abs=1e-5), (whole, merged)
    a, b = big.unwrapped.state_dict(), small.unwrapped.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    summary = json.loads((tmp_path / "merged" / "summary.json").read_text())
    assert summary["train"]["global_batch"] == summary["train"]["contrastive_batch"] == 16


def test_a_per_sample_objective_accumulates_micro_batches(digits_dir: Path) -> None:
    """BYOL's loss is per sample: accumulation adds micro-batches, and the run says so."""
    from mmcl.recipe import merged_micro_batches

    r = load_recipe(ROOT / "configs" / "byol_digits.yaml", [f"data.train_shards={digits_dir}/train-000000.tar",
                                                           "optim.grad_accum=4"])
    assert merged_micro_batches(r) == 1
    r = load_recipe(ROOT / "configs" / "clip_digits.yaml", [f"data.train_shards={digits_dir}/train-000000.tar",
                                                           "optim.grad_accum=4"])
    assert merged_micro_batches(r) == 4
