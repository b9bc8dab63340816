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


def test_cpc_needs_a_grid_model_and_steps_below_its_height() -> None:
    """Another model is refused at load, naming ``model: {name: cpc}``; steps one below the grid height load."""
    message = "objective cpc needs model: {name: cpc} (a patch grid with a context network)"
    with pytest.raises(ConfigError, match=re.escape(message) + "$"):
        load_recipe(CONFIGS / "cpc_digits.yaml", ["model={name: encoder}"])
    edge = load_recipe(CONFIGS / "cpc_digits.yaml", ["objective.steps=5"])
    assert edge.model.grid(edge.data.image_size) == 6


@pytest.mark.parametrize("config, overrides, message", [
    ("swav_digits", ["data.views=1", "data.multi_crop=null", "objective.assignment_crops=1"],
     "objective swav predicts each crop's code from another crop: the data makes 1 crop"),
    ("dino_digits", ["data.views=1", "data.multi_crop=null", "objective.global_crops=1"],
     "objective dino compares the teacher on one crop with the student on another: the data makes 1 crop"),
    ("swav_digits", ["objective.queue_length=100"], "objective.queue_length 100 is below data.batch_size 256 (the "
     "queue holds whole batches of this process); use 0 (no queue) or more"),
    ("swav_digits", ["objective.queue_length=1"], "objective.queue_length 1 is below data.batch_size 256"),
])
def test_recipes_that_would_crash_at_the_first_step_are_refused_at_load(config, overrides, message) -> None:
    """These loaded and then crashed at step 1 (no loss terms; a queue shorter than a batch)."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_recipe(CONFIGS / f"{config}.yaml", overrides)
    # one crop plus local crops, exactly 2 crops, or a queue of exactly one batch are fine
    ok = {"swav_digits": [["data.views=1", "objective.assignment_crops=1", "objective.queue_length=256"],
                          ["data.multi_crop=null", "objective.queue_length=0"]],
          "dino_digits": [["data.views=1", "objective.global_crops=1"], ["data.multi_crop=null"]]}[config]
    for overrides_ok in ok:
        load_recipe(CONFIGS / f"{config}.yaml", overrides_ok)
