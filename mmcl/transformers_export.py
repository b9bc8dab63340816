"""Export a CLIP model to Hugging Face ``transformers``: a folder that ``from_pretrained`` loads,
giving the same embeddings as mmcl (and open_clip).

open_clip has no export of its own. The map is one of names and shapes: the towers' blocks are the
same transformer (open_clip's fused ``in_proj`` splits into ``q_proj``, ``k_proj``, ``v_proj``; the
projections are stored transposed), and the tokenizer is the same BPE (open_clip's vocabulary and
merges written as ``vocab.json`` and ``merges.txt``, its start and end tokens renamed as
``CLIPTokenizer`` names them). Two forms:

- ``CLIPModel`` (+ ``CLIPProcessor``): open_clip's ViT and text transformer with their default
  pooling, LayerNorm and no layer scale;
- ``VisionTextDualEncoderModel`` (+ ``VisionTextDualEncoderProcessor``): that ViT with a Hugging
  Face text tower pooled as transformers pools it (``model.text_tower.pooling: pooler``) through a
  linear projection. Mean or first-token pooling has no form there.

A SigLIP model (``model.init_logit_bias``) exports to the same forms: the embeddings are the same,
and its learned bias is kept in the config as ``logit_bias``, so
``sigmoid(logit_scale * cos + config.logit_bias)`` gives SigLIP's pair probabilities.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmcl.errors import MmclError

VISION_KEYS = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size", "patch_dropout"}
TEXT_KEYS = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
TOP_KEYS = {"embed_dim", "vision_cfg", "text_cfg", "quick_gelu", "custom_text", "init_logit_bias"}
SOT, EOT = 49406, 49407  # open_clip's start and end of text
SUBFOLDER = "transformers"  # where a model folder holds its transformers form


def obstacle(model_cfg: dict[str, Any]) -> str | None:
    """Why a CLIP model of this open_clip config has no ``transformers`` form, or None."""
    hf_text = model_cfg.get("hf_text")
    extra = set(model_cfg) - TOP_KEYS - {"hf_text"}
    extra |= {f"vision_cfg.{k}" for k in set(model_cfg.get("vision_cfg", {})) - VISION_KEYS}
    if hf_text is None:
        extra |= {f"text_cfg.{k}" for k in set(model_cfg.get("text_cfg", {})) - TEXT_KEYS}
    if extra:
        return f"transformers' CLIP vision model has nothing for {', '.join(sorted(extra))}"
    vision = model_cfg.get("vision_cfg", {})
    if not isinstance(vision.get("layers"), int) or not vision.get("patch_size"):
        return "its image tower is a ResNet, and transformers' CLIP vision model is a ViT"
    if hf_text is not None:
        if hf_text["pooling"] != "pooler" or hf_text["proj"] != "linear":
            return (f"its Hugging Face text tower is pooled by {hf_text['pooling']} through a {hf_text['proj']} "
                    f"projection, and VisionTextDualEncoderModel takes the transformer's pooler output through a "
                    f"linear one: train with model.text_tower.pooling: pooler and proj: linear to export")
        return None
    if model_cfg["text_cfg"].get("vocab_size", 49408) != 49408:
        return "its text tower does not use CLIP's tokenizer (vocabulary of 49408)"
    return None


def form(model_cfg: dict[str, Any]) -> str:
    """``CLIPModel`` or ``VisionTextDualEncoderModel``: the transformers class an exportable model takes."""
    return "VisionTextDualEncoderModel" if "hf_text" in model_cfg else "CLIPModel"


def vision_config(model_cfg: dict[str, Any]) -> Any:
    """The ``transformers.CLIPVisionConfig`` of open_clip's ViT image tower."""
    from transformers import CLIPVisionConfig

    v = model_cfg["vision_cfg"]
    size = v.get("image_size", 224)
    return CLIPVisionConfig(hidden_size=v["width"], intermediate_size=int(v["width"] * v.get("mlp_ratio", 4.0)),
                            num_hidden_layers=v["layers"], num_attention_heads=v["width"] // v.get("head_width", 64),
                            image_size=size if isinstance(size, int) else size[0], patch_size=v["patch_size"],
                            hidden_act=_act(model_cfg), layer_norm_eps=1e-5, projection_dim=model_cfg["embed_dim"])


def _act(model_cfg: dict[str, Any]) -> str:
    return "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"


def hf_config(model_cfg: dict[str, Any], logit_scale: float, logit_bias: float | None = None,
              text_config: Any = None) -> Any:
    """The ``transformers`` config of an exportable open_clip config: a ``CLIPConfig``, or with
    ``text_config`` (a Hugging Face text tower's) a ``VisionTextDualEncoderConfig``. A SigLIP
    model's bias rides along as ``logit_bias``."""
    from transformers import CLIPConfig, CLIPTextConfig, VisionTextDualEncoderConfig

    dim, bias = model_cfg["embed_dim"], {} if logit_bias is None else {"logit_bias": logit_bias}
    vision = vision_config(model_cfg)
    if text_config is not None:
        return VisionTextDualEncoderConfig.from_vision_text_configs(vision, text_config, projection_dim=dim,
                                                                    logit_scale_init_value=logit_scale, **bias)
    t = model_cfg["text_cfg"]
    text = CLIPTextConfig(vocab_size=t.get("vocab_size", 49408), hidden_size=t["width"],
                          intermediate_size=int(t["width"] * t.get("mlp_ratio", 4.0)), num_hidden_layers=t["layers"],
                          num_attention_heads=t["heads"], max_position_embeddings=t.get("context_length", 77),
                          hidden_act=_act(model_cfg), layer_norm_eps=1e-5, projection_dim=dim, bos_token_id=SOT,
                          eos_token_id=EOT, pad_token_id=EOT)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=dim,
                      logit_scale_init_value=logit_scale, **bias)


def _blocks(state: dict[str, torch.Tensor], src: str, dst: str, layers: int) -> dict[str, torch.Tensor]:
    """One tower's transformer blocks, from open_clip's names to transformers'."""
    out = {}
    for i in range(layers):
        s, d = f"{src}.resblocks.{i}", f"{dst}.layers.{i}"
        q, k, v = state[f"{s}.attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[f"{s}.attn.in_proj_bias"].chunk(3)
        out.update({f"{d}.self_attn.q_proj.weight": q, f"{d}.self_attn.k_proj.weight": k,
                    f"{d}.self_attn.v_proj.weight": v, f"{d}.self_attn.q_proj.bias": qb,
                    f"{d}.self_attn.k_proj.bias": kb, f"{d}.self_attn.v_proj.bias": vb})
        for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                     ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            out[f"{d}.{b}.weight"], out[f"{d}.{b}.bias"] = state[f"{s}.{a}.weight"], state[f"{s}.{a}.bias"]
    return out


def vision_state(s: dict[str, torch.Tensor], model_cfg: dict[str, Any], prefix: str) -> dict[str, torch.Tensor]:
    """open_clip's ViT (``visual.*`` of state ``s``) under ``CLIPVisionTransformer``'s names, each
    after ``prefix``, and its projection as ``visual_projection``."""
    out = {"embeddings.class_embedding": s["visual.class_embedding"],
           "embeddings.patch_embedding.weight": s["visual.conv1.weight"],
           "embeddings.position_embedding.weight": s["visual.positional_embedding"],
           "pre_layrnorm.weight": s["visual.ln_pre.weight"], "pre_layrnorm.bias": s["visual.ln_pre.bias"],
           "post_layernorm.weight": s["visual.ln_post.weight"], "post_layernorm.bias": s["visual.ln_post.bias"]}
    out.update(_blocks(s, "visual.transformer", "encoder", model_cfg["vision_cfg"]["layers"]))
    return {f"{prefix}.{k}": v for k, v in out.items()} | {"visual_projection.weight": s["visual.proj"].t()}


def hf_state(clip: torch.nn.Module, model_cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of an open_clip ``CustomTextCLIP`` under ``transformers.CLIPModel``'s names, or
    ``VisionTextDualEncoderModel``'s when its text tower is a Hugging Face one (mmcl's
    ``HFTextTower``: the transformer as ``text_model``, its linear projection as ``text_projection``)."""
    s = {k: v.detach().cpu() for k, v in clip.state_dict().items()}
    out = {"logit_scale": s["logit_scale"].reshape(())}
    if "hf_text" in model_cfg:
        out.update(vision_state(s, model_cfg, "vision_model"))
        out.update({f"text_model.{k.removeprefix('text.transformer.')}": v for k, v in s.items()
                    if k.startswith("text.transformer.")})
        out["text_projection.weight"] = s["text.proj.weight"]
        return {k: v.contiguous() for k, v in out.items()}
    out.update(vision_state(s, model_cfg, "vision_model"))
    out.update({"text_model.embeddings.token_embedding.weight": s["text.token_embedding.weight"],
                "text_model.embeddings.position_embedding.weight": s["text.positional_embedding"],
                "text_model.final_layer_norm.weight": s["text.ln_final.weight"],
                "text_model.final_layer_norm.bias": s["text.ln_final.bias"],
                "text_projection.weight": s["text.text_projection"].t()})
    out.update(_blocks(s, "text.transformer", "text_model.encoder", model_cfg["text_cfg"]["layers"]))
    return {k: v.contiguous() for k, v in out.items()}


def write_tokenizer(out: Path, context_length: int) -> None:
    """open_clip's BPE as ``CLIPTokenizer`` files: ``vocab.json`` (its start and end tokens under
    CLIP's names) and ``merges.txt`` in rank order."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    from transformers import CLIPTokenizer

    CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=context_length,
                  pad_token="<|endoftext|>").save_pretrained(str(out))


def export_files(model: Any, preprocess: dict[str, Any]) -> dict[str, bytes]:
    """The files of :func:`export`, as ``{"transformers/NAME": bytes}`` for a model folder (written
    with it, atomically); {} when the model has no transformers form."""
    import tempfile

    if getattr(model, "model_cfg", None) is None or obstacle(model.model_cfg) is not None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        export(model, tmp, preprocess)
        return {f"{SUBFOLDER}/{f.name}": f.read_bytes() for f in sorted(Path(tmp).iterdir()) if f.is_file()}


def export(model: Any, out: str | Path, preprocess: dict[str, Any]) -> Path:
    """Write ``model`` (an mmcl CLIP model with open_clip's ViT) to ``out`` as a ``transformers``
    folder: weights (safetensors), config, tokenizer and image processor, for ``CLIPModel`` and
    ``CLIPProcessor`` or, with a Hugging Face text tower, ``VisionTextDualEncoderModel`` and
    ``VisionTextDualEncoderProcessor``. Raises :class:`MmclError` saying why when it has no such form.
    A trained model's ``final/transformers/`` is written by this.

    >>> import tempfile, torch, mmcl
    >>> from transformers import CLIPModel
    >>> model, _, tokenizer = mmcl.create_model("clip", open_clip_config="mmcl-tiny-vit")
    >>> hf = CLIPModel.from_pretrained(export(model, f"{tempfile.mkdtemp()}/hf", {"mean": [0.5] * 3, "std": [0.5] * 3}))
    >>> images = torch.randn(2, 3, 32, 32)
    >>> with torch.no_grad():
    ...     theirs = torch.nn.functional.normalize(hf.get_image_features(pixel_values=images).pooler_output, dim=-1)
    >>> bool((theirs - model.encode_image(images)).abs().max() < 1e-5)
    True
    """
    from transformers import CLIPImageProcessor, CLIPModel, VisionTextDualEncoderModel, VisionTextDualEncoderProcessor

    why = obstacle(model.model_cfg)
    if why is not None:
        raise MmclError(f"cannot export to transformers: {why}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bias = model.clip.logit_bias
    bias = None if bias is None else float(bias.detach())
    scale = float(model.clip.logit_scale.detach().exp())
    hf_text = "hf_text" in model.model_cfg
    if hf_text:
        config = hf_config(model.model_cfg, scale, bias, model.clip.text.transformer.config)
        hf = VisionTextDualEncoderModel(config).eval()
    else:
        hf = CLIPModel(hf_config(model.model_cfg, scale, bias)).eval()
    hf.load_state_dict(hf_state(model.clip, model.model_cfg), strict=True)
    hf.save_pretrained(str(out), safe_serialization=True)
    size = hf.config.vision_config.image_size
    images = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                image_mean=list(preprocess["mean"]), image_std=list(preprocess["std"]), resample=3)
    if hf_text:  # the text tower's own tokenizer, cut where mmcl cuts it
        tok, length = model.tokenizer().tok, model.model_cfg["hf_text"]["context_length"]
        tok.model_max_length = length
        if "max_length" in tok.init_kwargs:  # a saved truncation length (sentence-transformers) would win
            tok.init_kwargs["max_length"] = length
        VisionTextDualEncoderProcessor(image_processor=images, tokenizer=tok).save_pretrained(str(out))
    else:
        write_tokenizer(out, model.model_cfg["text_cfg"].get("context_length", 77))
        images.save_pretrained(str(out))
    return out
