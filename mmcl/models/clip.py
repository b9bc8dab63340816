"""CLIP: an image tower and a text tower mapping into one space, plus a learnable temperature
(and, for SigLIP, a learnable logit bias).

Towers come from open_clip (any built-in model name or a JSON config; see
``model_configs/`` for the tiny CPU one) or, for text, from any Hugging Face model loaded
with ``transformers.AutoModel`` (mean/CLS pooling and a projection, optionally locked).
Internally this wraps open_clip's ``CustomTextCLIP``, whose ``visual.* / text.* / logit_scale
/ logit_bias`` layout is what open_clip itself loads, so open_clip-tower models export without
conversion.
"""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mmcl.config import spec
from mmcl.errors import ConfigError
from mmcl.models.heads import HeadConfig, build_head
from mmcl.registry import register

CONFIG_DIR = Path(__file__).parent / "model_configs"


@dataclass
class HFTextConfig:
    """A Hugging Face text tower: ``path`` is a local folder, a Hub id, or ``package:NAME/sub``."""

    path: str = spec(help="folder, Hub id, or package:python_package/subfolder")
    pooling: Literal["mean", "cls", "pooler"] = spec("mean", help="mean: the mask-aware mean of the last hidden "
                                                     "states; cls: the first token's; pooler: the transformer's "
                                                     "own pooler output (BERT's dense+tanh on [CLS]), as "
                                                     "transformers' VisionTextDualEncoderModel pools, so the "
                                                     "model also exports to it")
    proj: Literal["linear", "mlp"] = "linear"
    locked: bool = True
    context_length: int = spec(32, ge=4)


@dataclass
class ClipModelConfig:
    """Which towers, how they start, and the temperature's initial value and cap."""

    open_clip_model: str | None = None
    open_clip_config: str | None = None
    pretrained: str | None = None
    text_tower: HFTextConfig | None = None
    init_logit_scale: float = spec(1 / 0.07, gt=0)
    init_logit_bias: float | None = spec(None, ge=-100, le=100,
                                         help="SigLIP: a learnable scalar bias added to the scaled similarities, "
                                              "starting here (-10 in the paper); the model then also outputs "
                                              "logit_bias. null: no bias (CLIP)")
    max_logit_scale: float = spec(100.0, gt=0)
    lock_image: bool = spec(False, help="LiT: the image tower is not trained (see image_unlocked_groups)")
    image_unlocked_groups: int = spec(0, ge=0, help="with lock_image: the last N groups of the image tower stay "
                                                    "trainable, as open_clip's lock_image_tower(unlocked_groups) "
                                                    "counts them (the projection is the last group)")
    lock_text: bool = spec(False, help="the open_clip text tower is not trained (see text_unlocked_layers; a Hugging "
                                       "Face tower locks with text_tower.locked)")
    text_unlocked_layers: int = spec(0, ge=0, help="with lock_text: the last N groups stay trainable, as open_clip's "
                                                   "lock_text_tower(unlocked_layers) counts them (the projection, "
                                                   "then the last block with the final norm, ...)")
    grad_checkpointing: bool = spec(False, help="recompute each tower block's activations in the backward pass: "
                                                "about a third more compute for far less activation memory")
    patch_dropout: float = spec(0.0, ge=0, lt=1, help="FLIP: share of image patches dropped at random in training "
                                                      "(ViT image towers of open_clip)")
    trim_text: int = spec(0, ge=0, help="N > 0: cut each batch's token ids after its longest text, rounded up to a "
                                         "multiple of N tokens (8: few shapes for train.compile); the text tower "
                                         "skips the padding and gives the same embeddings to float round-off. For "
                                         "open_clip's causal text towers pooled at the end token (CLIP's) or the "
                                         "first, and Hugging Face towers. 0: padded to the context length")
    view_projector: HeadConfig | None = spec(None, help="SLIP: a head on the image embeddings of data.view_transforms' "
                                                        "views, giving out['z'] for a self-supervised objective "
                                                        "combined with CLIP's (training only: final/ keeps the towers)")

    def embedding_width(self) -> int | None:
        """Width of the per-view embeddings (the view projector's last layer), which a predictor of a
        combined objective maps to; None without a view projector."""
        return self.view_projector.dims[-1] if self.view_projector is not None else None

    def configured_outputs(self) -> tuple[str, ...]:
        """Outputs this configuration adds to :attr:`ClipModel.outputs`: per-view embeddings with a
        ``view_projector``."""
        return ("z:views",) if self.view_projector is not None else ()

    def output_views(self, data: Any) -> int:
        """Views embedded per sample (``z:views``): one per ``data.view_transforms`` entry."""
        return len(data.view_transforms) if self.view_projector is not None else 0

    def validate(self) -> None:
        """Exactly one source of the open_clip architecture."""
        if (self.open_clip_model is None) == (self.open_clip_config is None):
            raise ConfigError("model: give exactly one of open_clip_model (a name such as ViT-B-32) "
                              "or open_clip_config (a JSON file, or a shipped name such as mmcl-tiny-vit)")
        if self.init_logit_scale > self.max_logit_scale:
            raise ConfigError(f"model.init_logit_scale ({self.init_logit_scale}) is above model.max_logit_scale "
                              f"({self.max_logit_scale})")
        if self.image_unlocked_groups and not self.lock_image:
            raise ConfigError("model.image_unlocked_groups leaves groups of a locked image tower trainable: set "
                              "model.lock_image: true (or image_unlocked_groups: 0)")
        if self.text_unlocked_layers and not self.lock_text:
            raise ConfigError("model.text_unlocked_layers leaves layers of a locked text tower trainable: set "
                              "model.lock_text: true (or text_unlocked_layers: 0)")
        if self.lock_text and self.text_tower is not None:
            raise ConfigError("model.lock_text locks open_clip's text tower; a Hugging Face text tower is locked by "
                              "model.text_tower.locked")

    def check_recipe(self, recipe: Any) -> None:
        """Shapes, before step 1 (they were an open_clip traceback there): the images fit the image
        tower (open_clip's ViTs and modified ResNets take one size), and a Hugging Face text tower's
        context fits its position embeddings. A ``hf-hub:`` model's config is read when it is built."""
        if self.open_clip_model and self.open_clip_model.startswith("hf-hub:"):
            return
        name = self.open_clip_model or self.open_clip_config
        vision = open_clip_model_cfg(self).get("vision_cfg", {})
        size = vision.get("image_size", 224)
        size = size if isinstance(size, int) else size[0]
        if "timm_model_name" not in vision and recipe.data.image_size != size:
            raise ConfigError(f"data.image_size {recipe.data.image_size} does not fit model {name}: its image tower "
                              f"takes {size} px images; set data.image_size: {size}")
        tower = self.text_tower
        if tower is not None and Path(resolve_path(tower.path)).is_dir():
            from transformers import AutoConfig

            positions = getattr(AutoConfig.from_pretrained(resolve_path(tower.path)), "max_position_embeddings", None)
            if positions and tower.context_length > positions:
                raise ConfigError(f"model.text_tower.context_length {tower.context_length} is above the "
                                  f"{positions} positions of {tower.path}; set it to at most {positions}")


def is_saved_open_clip(name: str | None) -> bool:
    """A saved open_clip model (``local-dir:PATH``, ``hf-hub:ORG/NAME``): an architecture *and* its
    weights, as ``open_clip.create_model`` takes it (a bare name such as ViT-B-32 is an architecture)."""
    return bool(name) and name.startswith(("local-dir:", "hf-hub:"))


def resolve_path(path: str) -> str:
    """Resolve ``package:NAME/sub`` to the folder inside an installed Python package."""
    if not path.startswith("package:"):
        return path
    package, _, sub = path[len("package:"):].partition("/")
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"{path}: Python package {package!r} is not installed (pip install it)") from None
    return str(Path(module.__file__).parent / sub)


def open_clip_model_cfg(cfg: ClipModelConfig) -> dict[str, Any]:
    """The open_clip ``model_cfg`` dict (embed_dim, vision_cfg, text_cfg, ...) for a recipe."""
    import open_clip

    if cfg.open_clip_model:
        model_cfg = open_clip.get_model_config(cfg.open_clip_model)
        if model_cfg is None:
            raise ConfigError(f"model.open_clip_model: unknown open_clip model {cfg.open_clip_model!r}")
        return json.loads(json.dumps(model_cfg))
    path = Path(cfg.open_clip_config)
    if not path.suffix:
        path = CONFIG_DIR / f"{cfg.open_clip_config}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"model.open_clip_config: {str(path)!r} not found (shipped configs: {shipped})")
    return json.loads(path.read_text())


class PatchDropout(nn.Module):
    """FLIP's patch dropout as open_clip's ``PatchDropout`` (same draw, same patches kept, the class
    token kept when ``exclude_first_token``, only in training), its random numbers drawn on the
    tokens' device: open_clip draws them on the CPU and indexes the device tensor with them, a copy
    from host memory in every forward. The draw comes from the device's default generator, which
    :mod:`mmcl.gradcache` replays. No parameters or buffers: a model's state dict is unchanged."""

    def __init__(self, prob: float = 0.5, exclude_first_token: bool = True):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout {prob} is outside [0, 1)")
        self.prob, self.exclude_first_token = prob, exclude_first_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0.0:
            return x
        if self.exclude_first_token:
            cls_tokens, x = x[:, :1], x[:, 1:]
        batch, num_tokens = x.shape[0], x.shape[1]
        keep = max(1, int(num_tokens * (1 - self.prob)))
        rand = torch.randn(batch, num_tokens, device=x.device)
        kept = rand.topk(keep, dim=-1).indices
        x = x.gather(1, kept[..., None].expand(-1, -1, *x.shape[2:]))  # open_clip's x[rows, kept]
        return torch.cat((cls_tokens, x), dim=1) if self.exclude_first_token else x

    def extra_repr(self) -> str:
        return f"prob={self.prob}, exclude_first_token={self.exclude_first_token}"


def use_device_patch_dropout(module: nn.Module) -> None:
    """Replace each open_clip ``PatchDropout`` in ``module`` by :class:`PatchDropout` (in place, same
    settings). Neither holds state, so checkpoints, saved models and their open_clip export (which
    open_clip rebuilds with its own) are unaffected."""
    from open_clip.transformer import PatchDropout as OpenClipPatchDropout

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, OpenClipPatchDropout):
                setattr(parent, name, PatchDropout(child.prob, child.exclude_first_token).train(child.training))


class HFTextTower(nn.Module):
    """A ``transformers.AutoModel`` encoder, pooled and projected to the shared embedding size."""

    def __init__(self, transformer: nn.Module, embed_dim: int, pooling: str = "mean", proj: str = "linear",
                 locked: bool = True):
        super().__init__()
        self.transformer, self.pooling, self.locked = transformer, pooling, locked
        hidden = transformer.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False) if proj == "linear" else nn.Sequential(
            nn.Linear(hidden, (hidden + embed_dim) // 2, bias=False), nn.GELU(),
            nn.Linear((hidden + embed_dim) // 2, embed_dim, bias=False))
        if locked:
            self.transformer.requires_grad_(False)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the transformer's activations in the backward pass (a trained tower only)."""
        if enable and not self.locked:
            self.transformer.gradient_checkpointing_enable()
        elif not enable and self.transformer.is_gradient_checkpointing:
            self.transformer.gradient_checkpointing_disable()

    def train(self, mode: bool = True) -> HFTextTower:
        """A locked transformer stays in eval mode (no dropout), as in LiT."""
        super().train(mode)
        if self.locked:
            self.transformer.eval()
        return self

    def forward(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pool (the last hidden states' mask-aware mean, the first token, or the transformer's own
        pooler output) and project."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.locked):
            out = self.transformer(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        if self.pooling == "pooler":
            return self.proj(out.pooler_output)
        hidden = out.last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.proj(pooled)


class ViewTower(nn.Module):
    """A CLIP image tower and the view head on it, as :meth:`ClipModel.forward` embeds views:
    ``{"views": [...]}`` to ``{"z": [...]}``. It also loads the state of a whole :class:`ClipModel`
    (keeping its image tower and view head): momentum teachers saved before 2026-11-29 were copies of
    the whole model, and their checkpoints resume."""

    def __init__(self, visual: nn.Module, head: nn.Module):
        super().__init__()
        self.visual, self.head = visual, head
        self.register_load_state_dict_pre_hook(_view_tower_keys)

    def forward(self, batch: dict[str, Any]) -> dict[str, list[torch.Tensor]]:
        return {"z": [self.head(self.visual(v)) for v in batch["views"]]}


def _view_tower_keys(module: nn.Module, state: dict[str, Any], prefix: str, *args: Any) -> None:
    """A whole CLIP model's keys as a :class:`ViewTower`'s: ``clip.visual.*`` to ``visual.*``,
    ``view_head.*`` to ``head.*``, the rest (text tower, temperature) dropped."""
    if not any(k.startswith(prefix + "clip.visual.") for k in state):
        return
    for key in [k for k in state if k.startswith(prefix)]:
        rest = key[len(prefix):]
        value = state.pop(key)
        if rest.startswith("clip.visual."):
            state[prefix + rest[len("clip."):]] = value
        elif rest.startswith("view_head."):
            state[prefix + "head." + rest[len("view_head."):]] = value


def trim_padding(tokens: Any, multiple: int = 8) -> Any:
    """A batch of token ids padded with 0 (or of Hugging Face ``input_ids``/``attention_mask``) without
    the padding columns after its longest text, the length rounded up to a multiple of ``multiple`` and capped at
    the padded length (``model.trim_text``). Done where the batch is made, on the host: cutting on
    the device would wait for it to read the length.

    >>> ids = torch.tensor([[49406, 320, 49407] + [0] * 74, [49406, 49407] + [0] * 75])
    >>> trim_padding(ids).shape, trim_padding(ids, 1).tolist()
    (torch.Size([2, 8]), [[49406, 320, 49407], [49406, 49407, 0]])
    """
    used = tokens["attention_mask"].bool() if isinstance(tokens, dict) else tokens != 0
    columns = used.any(0).nonzero()
    width = used.shape[1]
    end = int(columns.max()) + 1 if len(columns) else 1
    keep = min(width, -(-end // multiple) * multiple)
    # contiguous: pinned and sent to the device as one block of the kept width
    if isinstance(tokens, dict):
        return {k: v[:, :keep].contiguous() for k, v in tokens.items()}
    return tokens[:, :keep].contiguous()


class TrimmedTokenizer:
    """A tokenizer whose batches end after their longest text (:func:`trim_padding`; the towers
    :func:`untrimmable` lets through pad with 0)."""

    def __init__(self, tokenizer: Any, multiple: int = 8):
        self.tokenizer, self.multiple = tokenizer, multiple

    def __call__(self, texts: list[str]) -> Any:
        return trim_padding(self.tokenizer(texts), self.multiple)


def untrimmable(tower: nn.Module) -> str | None:
    """Why cutting the padding would change ``tower``'s embeddings (``model.trim_text``), or None:
    every position up to the pooled one must be blind to what follows the text."""
    from open_clip.transformer import TextTransformer

    if isinstance(tower, HFTextTower):  # attention masks padding, pooling is mask-aware or the first token
        return None
    if not isinstance(tower, TextTransformer):
        return "open_clip's Hugging Face text encoder is not supported (use model.text_tower)"
    if tower.cls_emb is not None:
        return "its text tower appends a class token after the padding (CoCa)"
    if tower.pool_type not in ("argmax", "eos", "first"):
        return f"its text tower pools '{tower.pool_type}', which reads the padding"
    if tower.attn_mask is None:  # open_clip's configs build no padding mask for these
        return "its bidirectional text tower attends to the padding"
    if tower.pad_id != 0:
        return f"its text tower pads with id {tower.pad_id} (mmcl cuts and merges ids padded with 0)"
    return None


def causal_text(tower: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """open_clip's ``TextTransformer.forward`` for token ids shorter than its context
    (``model.trim_text``): the positions and the causal mask cut to their length, which open_clip
    does for padding-masked towers only. A causal mask keeps every position blind to what follows it,
    so the end token's embedding is the one of the full-length ids."""
    from open_clip.transformer import text_global_pool

    n = text.shape[1]
    cast = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(text).to(cast) + tower.positional_embedding[:n].to(cast)
    x = tower.ln_final(tower.transformer(x, attn_mask=tower.attn_mask[:n, :n]))
    pooled = text_global_pool(x, text, pool_type=tower.pool_type, eos_token_id=tower.eos_id)
    proj = tower.text_projection
    if proj is None:
        return pooled
    return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


class HFTokenizer:
    """Callable tokenizer returning ``input_ids`` / ``attention_mask`` padded to ``context_length``, as
    open_clip's ``HFTokenizer`` pads, or with ``trim`` N > 0 (``model.trim_text``) cut after the
    batch's longest text, in multiples of N."""

    def __init__(self, path: str, context_length: int, trim: int = 0):
        from transformers import AutoTokenizer

        self.path, self.context_length, self.trim = path, context_length, trim
        self.tok = AutoTokenizer.from_pretrained(path)

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        out = self.tok(list(texts), padding="max_length", truncation=True, max_length=self.context_length,
                       return_tensors="pt")
        tokens = {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}
        return trim_padding(tokens, self.trim) if self.trim else tokens


@register("model", "clip", ClipModelConfig)
class ClipModel(nn.Module):
    """Image and text towers with a learnable logit scale (``exp`` clamped at ``max_logit_scale``).
    Registered as ``model: {name: clip, ...}``; the registry builds it with :meth:`from_config`.

    >>> m = ClipModel.from_config(ClipModelConfig(open_clip_config="mmcl-tiny-vit"))
    >>> out = m({"image": torch.zeros(2, 3, 32, 32), "text": m.tokenizer()(["a 1", "a 2"])})
    >>> out["image_features"].shape, float(out["logit_scale"]) > 14
    (torch.Size([2, 64]), True)
    """

    data_kinds = ("image_text",)  # what the recipe checks at load (mmcl.registry.model_declaration)
    # what every configuration produces; ``logit_bias`` is added by model.init_logit_bias, which the
    # objectives' check_recipe checks (SigLIP needs it, CLIP refuses it)
    outputs = ("image_features", "text_features", "logit_scale")

    def __init__(self, model_cfg: dict[str, Any], cfg: ClipModelConfig, hf_text: nn.Module | None = None,
                 hf_tokenizer_path: str | None = None):
        super().__init__()
        from open_clip.model import CustomTextCLIP

        # the recipe's model.init_logit_bias decides whether there is a bias; it is written into the
        # architecture (open_clip's SigLIP configs carry the same key), so open_clip builds it too
        model_cfg = {k: v for k, v in model_cfg.items() if k != "init_logit_bias"}
        if cfg.init_logit_bias is not None:
            model_cfg["init_logit_bias"] = cfg.init_logit_bias
        self.cfg, self.model_cfg = cfg, model_cfg
        kwargs = {k: v for k, v in model_cfg.items() if k not in ("custom_text", "hf_text")}
        self.clip = CustomTextCLIP(**kwargs, init_logit_scale=math.log(cfg.init_logit_scale))
        use_device_patch_dropout(self.clip.visual)  # model.patch_dropout, drawn on the device
        self.hf_tokenizer_path = hf_tokenizer_path
        if hf_text is not None:
            self.clip.text = hf_text
        # SLIP: the views' image embeddings through an MLP head, for a self-supervised objective
        self.view_head = build_head(cfg.view_projector, model_cfg["embed_dim"]) if cfg.view_projector else None
        if cfg.trim_text and (why := untrimmable(self.clip.text)):
            raise ConfigError(f"model.trim_text would change the text embeddings: {why}; set model.trim_text: 0")
        if cfg.lock_image:  # open_clip's own locking: every group of the tower but the last N
            self.clip.lock_image_tower(unlocked_groups=cfg.image_unlocked_groups)
        if cfg.lock_text:
            self.clip.lock_text_tower(unlocked_layers=cfg.text_unlocked_layers)

    # -------------------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, cfg: ClipModelConfig) -> ClipModel:
        """Build from a recipe: resolve the architecture, load pretrained weights if asked."""
        model_cfg = open_clip_model_cfg(cfg)
        hf_text, tok_path = None, None
        if cfg.text_tower is not None:
            from transformers import AutoModel

            tok_path = resolve_path(cfg.text_tower.path)
            try:
                transformer = AutoModel.from_pretrained(tok_path)
            except OSError as e:
                raise ConfigError(f"model.text_tower.path: cannot load {cfg.text_tower.path!r}: {e}") from None
            t = cfg.text_tower
            if t.pooling == "pooler" and getattr(transformer, "pooler", None) is None:
                raise ConfigError(f"model.text_tower.pooling: {cfg.text_tower.path!r} ({type(transformer).__name__}) "
                                  f"has no pooler; use pooling: mean or cls")
            hf_text = HFTextTower(transformer, model_cfg["embed_dim"], t.pooling, t.proj, t.locked)
            model_cfg = {**model_cfg, "hf_text": {"pooling": t.pooling, "proj": t.proj, "locked": t.locked,
                                                  "context_length": t.context_length}}
        if cfg.patch_dropout:
            if "timm_model_name" in model_cfg.get("vision_cfg", {}):
                raise ConfigError("model.patch_dropout applies to open_clip's own ViT image towers, not to timm "
                                  "towers; set it to 0")
            model_cfg = {**model_cfg, "vision_cfg": {**model_cfg["vision_cfg"], "patch_dropout": cfg.patch_dropout}}
        model = cls(model_cfg, cfg, hf_text, tok_path)
        if cfg.pretrained or is_saved_open_clip(cfg.open_clip_model):  # open_clip loads a folder's weights too
            model.load_open_clip_pretrained(cfg)
        if cfg.grad_checkpointing:
            model.clip.set_grad_checkpointing(True)
        return model

    def starts_from(self) -> dict[str, str]:
        """Where each tower's weights start: ``scratch`` (random initialisation), or the open_clip
        weights (``model.pretrained``: a tag or a file, or a ``local-dir:``/``hf-hub:`` model), or the
        Hugging Face text tower's folder. Said when a run starts and recorded in the model card."""
        cfg = self.cfg
        if cfg.pretrained:
            source = f"{cfg.open_clip_model or cfg.open_clip_config} pretrained={cfg.pretrained}"
        elif is_saved_open_clip(cfg.open_clip_model):
            source = cfg.open_clip_model
        else:
            source = "scratch"
        text = f"{cfg.text_tower.path} (transformers)" if cfg.text_tower is not None else source
        return {"image": source, "text": text}

    def load_open_clip_pretrained(self, cfg: ClipModelConfig) -> None:
        """Load open_clip weights (a tag such as 'openai' or a checkpoint file, or those of a saved
        ``local-dir:``/``hf-hub:`` model) into the towers (and the temperature, and the bias when both
        the weights and the model have one)."""
        import open_clip

        name = cfg.open_clip_model or "custom"
        try:
            ref = open_clip.create_model(name, pretrained=cfg.pretrained, force_custom_text=True) \
                if cfg.open_clip_model else None
        except RuntimeError as e:
            raise ConfigError(f"model.pretrained: cannot load {cfg.pretrained!r} for {name}: {e}") from None
        if ref is None:
            state = torch.load(cfg.pretrained, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
            state = {k.removeprefix("module."): v for k, v in state.items()}
        else:
            state = ref.state_dict()
        keep_text = self.cfg.text_tower is None
        state = {k: v for k, v in state.items() if keep_text or not k.startswith("text.")}
        if "logit_bias" in state and self.clip.logit_bias is None:
            # SigLIP weights fine-tuned with the CLIP loss: the loss, and zero-shot ranking, have no use for
            # a bias, and a parameter no loss reads would stop DDP ("unused parameters"), so it is left out
            import warnings

            warnings.warn("model.pretrained: the weights hold a logit_bias (a SigLIP model) and model.init_logit_bias "
                          "is not set: the bias is left out (the CLIP loss has none); to keep it, set "
                          "model.init_logit_bias and objective.name siglip", stacklevel=2)
            state = {k: v for k, v in state.items() if k != "logit_bias"}
        missing, unexpected = self.clip.load_state_dict(state, strict=False)
        # CLIP weights under a SigLIP model: the bias keeps its model.init_logit_bias start
        missing = [k for k in missing if k != "logit_bias"]
        if unexpected or (keep_text and missing):
            raise ConfigError(f"model.pretrained: weights do not fit the architecture "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")

    # -------------------------------------------------------------------------- use
    @property
    def embed_dim(self) -> int:
        """Width of ``out['z']`` with a view projector (what a view objective sizes its heads and
        queues to), else of the CLIP embeddings."""
        return self.cfg.embedding_width() or self.model_cfg["embed_dim"]

    @property
    def image_size(self) -> int:
        """Side of the square input image."""
        size = self.model_cfg["vision_cfg"].get("image_size", 224)
        return size if isinstance(size, int) else size[0]

    def tokenizer(self) -> Any:
        """The tokenizer matching the text tower (open_clip's or the Hugging Face one)."""
        if "hf_text" in self.model_cfg:
            return HFTokenizer(self.hf_tokenizer_path, self.model_cfg["hf_text"]["context_length"],
                               trim=self.cfg.trim_text)
        import open_clip

        text_cfg = self.model_cfg.get("text_cfg", {})
        if text_cfg.get("hf_tokenizer_name"):
            tokenizer = open_clip.HFTokenizer(text_cfg["hf_tokenizer_name"],
                                              context_length=text_cfg.get("context_length", 77))
        else:
            tokenizer = open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
        if self.cfg.trim_text:
            return TrimmedTokenizer(tokenizer, self.cfg.trim_text)
        return tokenizer

    def logit_scale(self) -> torch.Tensor:
        """``exp(logit_scale)`` clamped to ``max_logit_scale`` (100 by default)."""
        return self.clip.logit_scale.exp().clamp(max=self.cfg.max_logit_scale)

    def encode_image(self, image: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Image embeddings, L2-normalised by default."""
        x = self.clip.visual(image)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: Any, normalize: bool = True) -> torch.Tensor:
        """Text embeddings from token ids (open_clip) or a tokenizer dict (Hugging Face)."""
        tower = self.clip.text
        # model.trim_text: ids (a Hugging Face tower takes a dict) cut short go to a causal open_clip tower, the
        # only kind untrimmable() lets through, by their own forward
        cut = self.cfg.trim_text and isinstance(text, torch.Tensor) and text.shape[1] < tower.context_length
        x = causal_text(tower, text) if cut else tower(text)
        return F.normalize(x, dim=-1) if normalize else x

    def logit_bias(self) -> torch.Tensor | None:
        """The learnable scalar added to the scaled similarities (``model.init_logit_bias``), or None."""
        return self.clip.logit_bias

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Embed a batch's images and texts; the objective turns these into a loss. ``logit_bias``
        only when the model has one (``model.init_logit_bias``): see :attr:`outputs`."""
        out = {"logit_scale": self.logit_scale()}
        if "image" in batch:  # a momentum copy for a view objective is called with views only
            out["image_features"] = self.encode_image(batch["image"])
        if "text" in batch:
            out["text_features"] = self.encode_text(batch["text"])
        if self.clip.logit_bias is not None:
            out["logit_bias"] = self.clip.logit_bias
        if self.view_head is not None and "views" in batch:
            out["z"] = [self.view_head(self.encode_image(v, normalize=False)) for v in batch["views"]]
        return out

    def views_network(self) -> nn.Module:
        """What embeds ``batch["views"]`` (the image tower and the view head, sharing this model's
        parameters): the part a momentum teacher (CLIP + BYOL or DINO) copies, without the text tower."""
        if self.view_head is None:
            return self
        return ViewTower(self.clip.visual, self.view_head)

    def after_optimizer_step(self, step: int) -> None:
        """Keep the stored temperature inside [0, log(max)] as open_clip does."""
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, math.log(self.cfg.max_logit_scale))

    def fsdp_units(self) -> list[str]:
        """Class names of the blocks ``train.fsdp`` shards one by one (each gathered only for its own forward
        and backward): open_clip's transformer blocks (image and text towers), timm's ViT blocks, and a
        Hugging Face text tower's layers (its ``_no_split_modules``)."""
        present = {type(m).__name__ for m in self.modules()}
        names = present & {"ResidualAttentionBlock", "Block"}
        if isinstance(self.clip.text, HFTextTower):
            names |= present & set(getattr(self.clip.text.transformer, "_no_split_modules", None) or [])
        return sorted(names)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norms."""
        return {"clip.logit_scale", "clip.logit_bias"}

    # -------------------------------------------------------------------------- folder format
    def save_files(self, folder: Path, preprocess: dict[str, Any]) -> dict[str, Any]:
        """Write weights (and the HF text tower's config/tokenizer) into ``folder``; return the config.

        Models with open_clip towers store ``open_clip_config.json`` (``model_cfg`` +
        ``preprocess_cfg``) and ``open_clip_model.safetensors``, which
        ``open_clip.create_model_and_transforms('local-dir:...')`` and ``'hf-hub:org/name'`` load
        as is. (open_clip's own ``save_for_hf`` needs its tokenizer from the Hub, so the JSON is
        written here.) A Hugging Face text tower has no open_clip form: those models keep only
        the mmcl format, ``model.safetensors`` + ``text_tower/``.
        """
        from safetensors.torch import save_file

        state = {k: v.detach().cpu().contiguous() for k, v in self.clip.state_dict().items()}
        if "hf_text" in self.model_cfg:
            save_file(state, str(folder / "model.safetensors"))
            self.clip.text.transformer.config.save_pretrained(folder / "text_tower")
            self.tokenizer().tok.save_pretrained(folder / "text_tower")
        else:
            save_file(state, str(folder / "open_clip_model.safetensors"))
            oc = {"model_cfg": {**self.model_cfg, "custom_text": True},
                  "preprocess_cfg": {"size": preprocess["image_size"], "mean": preprocess["mean"],
                                     "std": preprocess["std"], "interpolation": "bicubic", "resize_mode": "shortest"}}
            (folder / "open_clip_config.json").write_text(json.dumps(oc, indent=2) + "\n")
        return {"model_cfg": self.model_cfg, "mmcl_model": _asdict(self.cfg)}

    @classmethod
    def load_files(cls, folder: Path, config: dict[str, Any]) -> ClipModel:
        """Rebuild a model written by :meth:`save_files` (no download, no code from the folder)."""
        from safetensors.torch import load_file

        from mmcl.config import from_dict

        cfg = from_dict(ClipModelConfig, config["mmcl_model"])
        cfg.pretrained = None
        cfg.view_projector = None  # a training-only head: the folder holds the towers
        model_cfg = config["model_cfg"]
        hf_text, tok_path = None, None
        if "hf_text" in model_cfg:
            from transformers import AutoConfig, AutoModel

            tok_path = str(folder / "text_tower")
            t = model_cfg["hf_text"]
            hf_text = HFTextTower(AutoModel.from_config(AutoConfig.from_pretrained(tok_path)),
                                  model_cfg["embed_dim"], t["pooling"], t["proj"], t["locked"])
            weights = folder / "model.safetensors"
        else:
            weights = folder / "open_clip_model.safetensors"
        model = cls(model_cfg, cfg, hf_text, tok_path)
        model.clip.load_state_dict(load_file(str(weights)), strict=True)
        return model


def _asdict(cfg: Any) -> dict[str, Any]:
    from mmcl.config import to_dict

    return to_dict(cfg)
