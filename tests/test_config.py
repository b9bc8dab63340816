"""Recipe validation: unknown keys name the nearest valid key; types and ranges are checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from mmcl.config import apply_overrides, from_dict, load, spec, to_dict
from mmcl.errors import ConfigError


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
    from mmcl.config import build
    from mmcl.data.loader import view_transforms
    from mmcl.data.transforms import build_transform
    from mmcl.recipe import load_recipe

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
