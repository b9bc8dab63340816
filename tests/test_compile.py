"""``train.compile: true`` (torch.compile through Accelerate) trains, and compiles once: values that
change every step (a momentum or a teacher temperature on a schedule, the step itself) must not be
read inside the compiled graph, where each new value would be a constant and force a recompilation
(after 8 of them torch gives up and runs the objective uncompiled). Random draws (FLIP's patch dropout,
dropout) compile too, and gradient caching replays them in the compiled passes. (Several processes with a
compiled objective: tests/dist/test_compile_processes.py.)"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_grad_cache import grads

import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
import mmcl.objectives  # noqa: F401
from mmcl.models.clip import PatchDropout
from mmcl.objectives.clip import ClipLoss
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
# an open_clip CLIP smaller than the shipped mmcl-tiny-vit (one block a tower), which compiles faster
TINY_VIT = {"embed_dim": 16,
            "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "mlp_ratio": 2.0,
                           "patch_size": 8},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                         "mlp_ratio": 2.0}}


@pytest.mark.parametrize("config, extra", [
    ("dino_digits.yaml", ["model.backbone.width=8", "objective.warmup_teacher_steps=10"]),
    ("clip_digits.yaml", ["eval.zeroshot_shards=null"]),
    # FLIP: random patches kept in every forward (drawn inside the graph by inductor), replayed by gradient
    # caching, in chunks of 8 without and with a graph (chunks of uneven sizes, each size a graph, in
    # test_compiled_grad_cache_replays_the_compiled_random_draws)
    ("clip_digits.yaml", ["eval.zeroshot_shards=null", "model.open_clip_config={tiny}", "model.patch_dropout=0.5",
                          "train.grad_cache=8"]),
])
def test_a_compiled_run_does_not_recompile_every_step(digits_dir: Path, tmp_path: Path, config: str,
                                                      extra: list[str]) -> None:
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_VIT))
    extra = [e.replace("{tiny}", str(tmp_path / "tiny.json")) for e in extra]
    trainer = Trainer(load_recipe(ROOT / "configs" / config, [
        f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={tmp_path}",
        "data.batch_size=16", "data.num_workers=0", "train.steps=100", "train.progress=false", "train.compile=true",
        "optim.warmup_steps=2", "eval.knn_train_shards=null", "eval.knn_shards=[]", "eval.linear=false", *extra]))
    # compiled in place: the state dict keeps its keys (checkpoints resume with or without compile)
    assert trainer.unwrapped._compiled_call_impl is not None
    assert not any("_orig_mod" in k for k in trainer.unwrapped.state_dict())
    trainer.loader.set_epoch(0)
    batches = iter(trainer.loader)
    step = lambda: trainer.train_step(trainer.loader.prepare(next(batches), trainer.acc.device))  # noqa: E731
    try:
        for _ in range(3):  # the first compilations, and the one that makes a changing integer dynamic
            step()
        torch._dynamo.config.error_on_recompile = True
        losses = [step() for _ in range(3)]
    finally:
        torch._dynamo.config.error_on_recompile = False
        trainer.loader.close()
        torch._dynamo.reset()
    assert losses == [True] * 3


class Drawing(torch.nn.Module):
    """A CLIP-shaped model small enough to compile in seconds that draws random numbers as the real
    ones do: FLIP's patch dropout (:class:`~mmcl.models.clip.PatchDropout`, ``torch.randn`` and top-k)
    on its image tokens and ``nn.Dropout`` on both towers' features."""

    def __init__(self, patch_dropout: float, dropout: float):
        super().__init__()
        self.embed, self.text = torch.nn.Linear(12, 16), torch.nn.Linear(8, 16)
        self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))
        self.patch_dropout, self.dropout = PatchDropout(patch_dropout), torch.nn.Dropout(dropout)
        self.scale = torch.nn.Parameter(torch.tensor(2.3))

    def forward(self, batch: dict) -> dict:
        tokens = self.embed(batch["image"])
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        image = self.dropout(self.patch_dropout(tokens)).mean(dim=1)
        text = self.dropout(self.text(batch["text"]))
        return {"image_features": F.normalize(image, dim=-1), "text_features": F.normalize(text, dim=-1),
                "logit_scale": self.scale.exp()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_compiled_grad_cache_replays_the_compiled_random_draws() -> None:
    """``train.compile`` with ``train.grad_cache`` on a model that draws random numbers (patch dropout,
    dropout): inductor draws them itself (its own generator, seeded from torch's default one, unless
    ``fallback_random``), and the compiled no-grad pass and the compiled pass with a graph must still
    draw the same ones under :mod:`mmcl.gradcache`'s replay of the random state. The gradients then equal
    those of the same compiled chunks taken with a graph at once (to float round-off), and without
    random draws those of the whole batch, compiled or not."""
    from mmcl.gradcache import grad_cache_step, split

    cpu, n, chunk = torch.device("cpu"), 10, 4  # chunks of 4, 4 and 2: the last one recompiles, once
    g = torch.Generator().manual_seed(1)
    batch = {"image": torch.randn(n, 6, 12, generator=g), "text": torch.randn(n, 8, generator=g),
             "key": [str(i) for i in range(n)]}
    loss_fn = ClipLoss()
    torch.manual_seed(0)
    model = Drawing(patch_dropout=0.5, dropout=0.3).train()

    def chunked(seed: int) -> dict[str, torch.Tensor]:  # the chunks in order, with a graph at once
        torch.manual_seed(seed)
        outs = [model(split(batch, s, min(s + chunk, n), n)) for s in range(0, n, chunk)]
        joined = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
        loss_fn({**joined, "logit_scale": outs[-1]["logit_scale"]}, batch)[0].backward()
        return grads(model)

    def cached(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        grad_cache_step(model, loss_fn, batch, chunk, device=cpu)
        return grads(model)

    def whole() -> dict[str, torch.Tensor]:
        loss_fn(model(batch), batch)[0].backward()
        return grads(model)

    def without_draws(step: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        model.eval()  # neither dropout draws
        try:
            return step()
        finally:
            model.train()

    eager = {"chunked": chunked(5), "cached": cached(5)}
    eager_whole = without_draws(whole)
    model.compile()
    try:
        compiled = {"chunked": chunked(5), "cached": cached(5), "other": chunked(6)}
        compiled_whole, compiled_cached = without_draws(whole), without_draws(lambda: cached(5))
    finally:
        torch._dynamo.reset()
    assert _max_diff(compiled["cached"], compiled["chunked"]) < 1e-6  # the replay: same draws in both passes
    assert _max_diff(eager["cached"], eager["chunked"]) < 1e-6
    # the draws matter: another seed, other gradients (as do inductor's numbers and eager torch's)
    assert _max_diff(compiled["other"], compiled["chunked"]) > 1e-2
    assert _max_diff(compiled_cached, compiled_whole) < 1e-5
    assert _max_diff(compiled_whole, eager_whole) < 1e-5


def test_cut_token_ids_compile_once_for_every_width(tmp_path: Path) -> None:
    """``model.trim_text``: batches of new widths (cut after their longest caption) reuse one
    compiled graph once torch has made the width dynamic (its second width), with the eager values."""
    (tmp_path / "tiny.json").write_text(json.dumps({**TINY_VIT, "text_cfg": {**TINY_VIT["text_cfg"],
                                                                             "context_length": 32}}))
    from mmcl.models.clip import ClipModel, ClipModelConfig

    torch.manual_seed(0)
    model = ClipModel.from_config(ClipModelConfig(open_clip_config=str(tmp_path / "tiny.json"), trim_text=8))
    compiled = ClipModel.from_config(ClipModelConfig(open_clip_config=str(tmp_path / "tiny.json"), trim_text=8))
    compiled.load_state_dict(model.state_dict())
    compiled.compile()
    words = {8: "one", 16: "a handwritten digit seven on a white page", 24: "the number three written by hand "
             "on a page, tilted a little to the left"}
    batches = [{"image": torch.randn(4, 3, 32, 32), "text": model.tokenizer()([words[w], "x", "y", "z"])}
               for w in (8, 16, 24, 8, 24)]
    assert [b["text"].shape[1] for b in batches] == [8, 16, 24, 8, 24]
    try:
        for i, batch in enumerate(batches):
            if i == 2:
                torch._dynamo.config.error_on_recompile = True
            got, want = compiled(batch), model(batch)
            assert torch.allclose(got["text_features"], want["text_features"], atol=1e-5), i
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
