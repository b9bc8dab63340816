"""Objective settings checked when a recipe loads, with messages that name the key to change."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mmcl.errors import ConfigError
from mmcl.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_cmc_bank_negatives_need_a_bank_size() -> None:
    """``negatives: bank`` without ``bank_size`` is refused at load; with it, or with batch negatives, it loads."""
    message = "objective.bank_size is required with negatives: bank"
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        load_recipe(CONFIGS / "cmc_digits.yaml", ["objective.negatives=bank"])
    bank = load_recipe(CONFIGS / "cmc_digits.yaml", ["objective.negatives=bank", "objective.bank_size=60000"])
    assert bank.objective.bank_size == 60000
    assert load_recipe(CONFIGS / "cmc_digits.yaml").objective.bank_size is None


def test_cpc_grid_check_applies_to_models_with_a_grid_only() -> None:
    """The steps-below-grid check needs the model's patch grid; another model loads (the objective refuses it
    when built, naming ``model: {name: cpc}``), and steps one below the grid height load."""
    other = load_recipe(CONFIGS / "cpc_digits.yaml", ["model={name: encoder}"])
    assert other.objective.steps == 3 and not hasattr(other.model, "grid")
    edge = load_recipe(CONFIGS / "cpc_digits.yaml", ["objective.steps=5"])
    assert edge.model.grid(edge.data.image_size) == 6
