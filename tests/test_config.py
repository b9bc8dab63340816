"""Recipe validation: unknown keys name the nearest valid key; types and ranges are checked."""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from mmcl.config import apply_overrides, from_dict, load, spec, to_dict
from mmcl.errors import ConfigError
from mmcl.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Optim:
    lr: float = spec(1e-3, gt=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup: int = spec(0, ge=0)


@dataclass
class Recipe:
    name: str = spec(help="required")
    optim: Optim = field(default_factory=Optim)
    resume: str | None = None
    amp: bool = False


def test_valid_recipe_loads_with_types_widened() -> None:
    r = from_dict(Recipe, {"name": "x", "optim": {"lr": 1, "warmup": 10}})
    assert r.optim.lr == 1.0 and isinstance(r.optim.lr, float)
    assert r.optim.warmup == 10 and r.optim.schedule == "cosine"
    assert to_dict(r)["optim"]["betas"] == [0.9, 0.98]


def test_unknown_key_names_the_nearest_valid_key() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optim.lrr'; did you mean 'lr'"):
        from_dict(Recipe, {"name": "x", "optim": {"lrr": 0.1}})
    with pytest.raises(ConfigError, match=r"unknown key 'optimm'; did you mean 'optim'"):
        from_dict(Recipe, {"name": "x", "optimm": {}})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "x", "optim": {"lr": "fast"}}, r"optim.lr: expected a number, got 'fast'"),
        ({"name": "x", "optim": {"lr": -1}}, r"optim.lr: got -1.0, allowed: > 0"),
        ({"name": "x", "optim": {"warmup": 1.5}}, r"optim.warmup: expected an integer"),
        ({"name": "x", "optim": {"schedule": "step"}}, r"optim.schedule: got 'step', allowed: one of 'cosine'"),
        ({"name": "x", "amp": "yes"}, r"amp: expected true or false"),
        ({"name": "x", "optim": [1]}, r"optim: expected a mapping"),
        ({}, r"missing required key 'name'"),
    ],
)
def test_bad_values_say_which_key_and_what_is_allowed(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Recipe, data)


def test_set_overrides_parse_yaml_values(tmp_path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: x\noptim:\n  lr: 0.1\n")
    r = load(Recipe, path, ["optim.lr=1e-3", "amp=true", "resume=null", "optim.betas=[0.8, 0.9]"])
    assert r.optim.lr == pytest.approx(1e-3) and r.amp is True and r.resume is None
    assert r.optim.betas == [0.8, 0.9]
    with pytest.raises(ConfigError, match="did you mean 'lr'"):
        load(Recipe, path, ["optim.lrate=1"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match=r"not valid YAML .*quote strings"):  # unquoted braces in a list
        apply_overrides({}, ["eval.knn_shards=[data/test-{000000..000001}.tar]"])
    quoted = apply_overrides({}, ["eval.knn_shards=['data/test-{000000..000001}.tar']"])
    assert quoted == {"eval": {"knn_shards": ["data/test-{000000..000001}.tar"]}}


def test_missing_file_and_bad_yaml_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load(Recipe, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(Recipe, bad)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_builds(path: Path) -> None:
    """Each recipe in configs/ loads, its transforms and objective build, and its model builds
    (except the multi-GB CLIP/ImageNet towers, whose configs are still validated)."""
    from mmcl.data.loader import view_transforms
    from mmcl.data.transforms import build_transform
    from mmcl.recipe import load_recipe
    from mmcl.registry import build

    r = load_recipe(path)
    d = r.data
    if d.kind == "multi_view":
        assert len(view_transforms(d, train=True)) >= 1
    else:
        build_transform(d.transform, d.image_size, tuple(d.mean), tuple(d.std), d.colour, **d.transform_args)
    build("objective", r.objective)
    if "digits" in path.stem:
        model = build("model", r.model)
        assert sum(p.numel() for p in model.parameters()) > 0


# ---------------------------------------------------------------------------------------------
# The real schema (mmcl.recipe and every registered model and objective): out-of-range values
# ---------------------------------------------------------------------------------------------
# multi-view data: what the encoder and SimCLR read (the recipe is checked for that pair when it loads)
MINIMAL = {"data": {"train_shards": "x", "kind": "multi_view"}, "model": {"name": "encoder"},
           "objective": {"name": "simclr"}}

# Numeric keys without a range, and why that is right (or who closes the gap).
UNBOUNDED = {
    "DataConfig.mean": "any finite number",
    "HeadConfig.dims": "HeadConfig.validate: positive integers",
    "MultiViewModelConfig.channels": "MultiViewModelConfig.validate: distinct indices >= 0",
}
# Required keys of config classes, so one key at a time can be tried out of range.
REQUIRED = {"DataConfig": {"train_shards": "x"}, "HFTextConfig": {"path": "x"}, "InstDiscConfig": {"bank_size": 8}}


def _schema_fields() -> list[tuple[str, type, dataclasses.Field, Any]]:
    """(path, owning class, field, type without None) for every field of the recipe schema."""
    from mmcl.recipe import Recipe as RealRecipe
    from mmcl.registry import registered

    todo: list[tuple[str, type]] = [("", RealRecipe)] + [
        (f"{kind}({name})", cls) for kind in ("model", "objective") for name, (cls, _) in registered(kind).items()
        if cls.__module__.startswith("mmcl.")]  # not the plugins other tests register
    out = []
    while todo:
        prefix, cls = todo.pop()
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if typing.get_origin(tp) in (typing.Union, types.UnionType):
                args = [a for a in typing.get_args(tp) if a is not type(None)]
                tp = args[0] if len(args) == 1 else tp
            path = f"{prefix}.{f.name}" if prefix else f.name
            if dataclasses.is_dataclass(tp):
                todo.append((path, tp))
            out.append((path, cls, f, tp))
    return out


def _numeric(tp: Any) -> bool:
    return tp in (int, float) or any(_numeric(a) for a in typing.get_args(tp))


def _bounded(rules: typing.Mapping[str, Any]) -> bool:
    return any(rules.get(k) is not None for k in ("ge", "gt", "le", "lt"))


def test_every_numeric_key_of_the_schema_has_a_range() -> None:
    """A new numeric key must say what is allowed (spec(ge=..., ...)), or be listed here with why not."""
    from mmcl.recipe import DATA_RULES

    unbounded = {f"{cls.__name__}.{f.name}" for path, cls, f, tp in _schema_fields()
                 if _numeric(tp) and not _bounded(f.metadata)
                 and not _bounded(DATA_RULES.get(path.removeprefix("data."), (None, {}))[1])}
    assert unbounded == set(UNBOUNDED)


def _outside(f: dataclasses.Field, tp: Any) -> Any:
    """A value just outside ``f``'s range, of type ``tp`` (a list for list fields)."""
    m = f.metadata
    item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else tp
    step = 1 if item is int else 0.5
    if m.get("ge") is not None:
        bad = m["ge"] - step
    elif m.get("gt") is not None:
        bad = m["gt"]
    elif m.get("le") is not None:
        bad = m["le"] + step
    else:
        bad = m["lt"]
    return [bad] * (m.get("length") or 1) if item is not tp else bad


BOUNDED = [(path, cls, f, tp) for path, cls, f, tp in _schema_fields() if _bounded(f.metadata)]


@pytest.mark.parametrize(("path", "cls", "f", "tp"), BOUNDED, ids=[b[0] for b in BOUNDED])
def test_every_range_in_the_schema_is_enforced(path: str, cls: type, f: dataclasses.Field, tp: Any) -> None:
    """Each key just outside its range is a ConfigError naming the key and what is allowed."""
    with pytest.raises(ConfigError, match=rf"^{f.name}: got .*, allowed: "):
        from_dict(cls, {**REQUIRED.get(cls.__name__, {}), f.name: _outside(f, tp)})


RECIPE_CASES = [
    # numbers must be finite (YAML .inf/.nan, or "inf" from --set)
    ("optim.lr=.inf", r"optim.lr: expected a finite number, got inf"),
    ("optim.lr=inf", r"optim.lr: expected a finite number, got inf"),
    ("optim.weight_decay=.nan", r"optim.weight_decay: expected a finite number"),
    ("optim.grad_clip=.inf", r"optim.grad_clip: expected a finite number"),
    ("objective.temperature=.inf", r"objective.temperature: expected a finite number"),
    # optimizer
    ("optim.betas=[1.5, 0.9]", r"optim.betas: got \[1.5, 0.9\], allowed: 2 values, each >= 0 and < 1"),
    ("optim.betas=[0.9]", r"optim.betas: got \[0.9\], allowed: 2 values"),
    ("optim.lr=-1", r"optim.lr: got -1.0, allowed: > 0"),
    ("optim.momentum=1", r"optim.momentum: got 1.0, allowed: >= 0 and < 1"),
    ("optim.grad_accum=0", r"optim.grad_accum: got 0, allowed: >= 1"),
    ("optim.schedule=step", r"optim.schedule: got 'step', allowed: one of 'cosine', 'constant'"),
    # run, train
    ("run.seed=4294967296", r"run.seed: got 4294967296, allowed: >= 0 and <= 4294967295"),
    ("run.output_dir=''", r"run.output_dir: must not be empty"),
    ("train.steps=0", r"train.steps: got 0, allowed: >= 1"),
    ("train.keep_checkpoints=0", r"train.keep_checkpoints: got 0, allowed: >= 1"),
    # data
    ("data.batch_size=0", r"data.batch_size: got 0, allowed: >= 1"),
    ("data.train_shards=''", r"data.train_shards: must not be empty"),
    ("data.std=[0.5, 0, 0.5]", r"data.std: got \[0.5, 0.0, 0.5\], allowed: a list, each > 0"),
    ("data.mean=[0.5, 0.5]", r"data.mean and data.std need one value per channel each, got 2 and 3"),
    ("data.image_keys=[]", r"data.image_keys: must not be empty"),
    ("data.timeout=5", r"unknown key 'data.timeout'; did you mean 'timeout_s'"),
    ("data.shard_deadline_s=0", r"data.shard_deadline_s: got 0.0, allowed: > 0"),
    ("data.text_key=''", r"data.text_key: must not be empty"),
    ("data.multi_crop={global_scale: [0.9, 0.2]}", r"data.multi_crop.global_scale: got \[0.9, 0.2\], allowed: "
                                                   r"2 values, each > 0 and <= 1, the first <= the second"),
    ("data.multi_crop={local_scale: [0, 0.4]}", r"data.multi_crop.local_scale: got \[0.0, 0.4\]"),
    ("data.multi_crop={local_scale: [0.5]}", r"data.multi_crop.local_scale: got \[0.5\]"),
    ("data.transform_args={flip: 1.5}", r"data.transform_args.flip: got 1.5, allowed: >= 0 and <= 1"),
    ("data.transform_args={blur: -0.1}", r"data.transform_args.blur: got -0.1, allowed: >= 0 and <= 1"),
    ("data.transform_args={crop_scale: [0.9, 0.1]}", r"data.transform_args.crop_scale: got \[0.9, 0.1\]"),
    ("data.transform_args={scale: [1.1]}", r"data.transform_args.scale: got \[1.1\], allowed: 2 values"),
    ("data.transform_args={degrees: -5}", r"data.transform_args.degrees: got -5.0, allowed: >= 0 and <= 180"),
    ("data.transform_args={translate: 2}", r"data.transform_args.translate: got 2.0, allowed: >= 0 and <= 1"),
    ("data.transform_args={strength: -1}", r"data.transform_args.strength: got -1.0, allowed: >= 0"),
    ("data.transform_args={jitter: high}", r"data.transform_args.jitter: expected a number, got 'high'"),
    # eval
    ("eval.class_names=[]", r"eval.class_names: must not be empty"),
    ("eval.templates=[]", r"eval.templates: must not be empty"),
    ("eval.templates=3", r"eval.templates: got 3, expected str or a list of str"),
    ("eval={zeroshot_shards: x, templates: nope}", r"eval.templates: unknown set 'nope'"),
    ("eval={zeroshot_shards: x, templates: [a photo]}", r"eval.templates: each custom template needs a '\{\}'"),
]


@pytest.mark.parametrize(("override", "message"), RECIPE_CASES, ids=[o for o, _ in RECIPE_CASES])
def test_recipe_values_that_cannot_be_right_name_the_key(override: str, message: str) -> None:
    from mmcl.recipe import Recipe as RealRecipe

    with pytest.raises(ConfigError, match=f"^{message}"):
        from_dict(RealRecipe, apply_overrides(copy.deepcopy(MINIMAL), [override]))


def test_values_at_the_edge_of_their_range_are_accepted() -> None:
    from mmcl.recipe import Recipe as RealRecipe

    edges = ["optim.betas=[0, 0.999]", "optim.weight_decay=0", "optim.warmup_steps=2000", "train.steps=1",
             "run.seed=4294967295", "data.transform_args={flip: 0, blur: 1, crop_scale: [1, 1], scale: [0.8, 1.1]}",
             "data.multi_crop={global_scale: [0.14, 1.0], local_scale: [0.05, 0.14]}", "data.num_workers=0",
             "data.retries=0", "data.shard_deadline_s=null"]
    r = from_dict(RealRecipe, apply_overrides(copy.deepcopy(MINIMAL), edges))
    assert r.optim.betas == [0.0, 0.999] and r.optim.warmup_steps > r.train.steps  # an all-warmup smoke run


@pytest.mark.parametrize("config, overrides, message", [
    ("dino_digits", ["objective.global_crops=3"], "objective.global_crops is 3 but the data makes 2 global views"),
    ("swav_digits", ["objective.assignment_crops=4"], "objective.assignment_crops is 4 but the data makes 2 global"),
    ("clip_digits", ["model.init_logit_scale=200"], r"model.init_logit_scale \(200.0\) is above model.max_logit_scale"),
    ("cpc_digits", ["model.patch_size=40"], "model.patch_size 40 with patch_stride .* gives fewer than 2 x 2 patches"),
    ("cpc_digits", ["objective.steps=6"], "objective.steps 6 must be below the grid height 6"),
    ("cmc_digits", ["model.views=3"], "model.views is 3 but data.view_fields names 2 fields"),
])
def test_plugin_keys_that_disagree_with_the_rest_of_the_recipe_are_errors(config, overrides, message) -> None:
    """Checked when the recipe loads (a plugin config's ``check_recipe``), not at the first step or never
    (DINO took a local crop as a teacher crop without a word)."""
    with pytest.raises(ConfigError, match=message):
        load_recipe(ROOT / "configs" / f"{config}.yaml", overrides)


def test_a_bare_yaml_no_is_the_choice_no_where_the_key_offers_it() -> None:
    """YAML 1.1 reads ``mixed_precision: no`` as false; the choice spelled so is meant (Accelerate's 'no')."""
    root = Path(__file__).resolve().parents[1] / "configs"
    r = load_recipe(root / "clip_digits.yaml", ["train.mixed_precision=no"])
    assert r.train.mixed_precision == "no"
    assert load_recipe(root / "clip_digits.yaml", ["train.mixed_precision='no'"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="data.kind: got True, allowed: one of 'image_text', 'multi_view'"):
        load_recipe(root / "clip_digits.yaml", ["data.kind=yes"])  # no choice spelled yes: still an error
