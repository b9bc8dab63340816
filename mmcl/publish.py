"""What a finished run publishes: the final model folder with what the run says about itself,
``summary.json`` beside it, and (``hub.push: true``) the upload to the Hugging Face Hub.

The trainer hands over facts (steps, processes, wall time, evaluation results, skip counts); this
module decides how they are written, so the model card (:mod:`mmcl.card`, reading the folder's
``mmcl_config.json``) and the Hub upload (:mod:`mmcl.hub`) have one source.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmcl.data import class_names, count_samples, expand_shards
from mmcl.data.shards import find_manifest
from mmcl.errors import MmclError
from mmcl.recipe import Recipe, merged_micro_batches, recipe_dict
from mmcl.registry import plugin_name


@dataclass
class RunFacts:
    """What only the finished run knows."""

    run_name: str
    steps: int
    processes: int
    wall_s: float
    mixed_precision: str
    bad_steps: int
    evals: list[dict[str, Any]]
    skipped: dict[str, int]


def run_info(recipe: Recipe, facts: RunFacts) -> dict[str, Any]:
    """The ``info`` of the saved model's config and card: recipe, training, data and evaluations."""
    r, f = recipe, facts
    urls = expand_shards(r.data.train_shards)
    return {
        "run_name": f.run_name,
        "license": r.hub.license,
        "objective": plugin_name("objective", r.objective),
        "recipe": recipe_dict(r),
        "train": {"steps": f.steps, "global_batch": r.data.batch_size * f.processes * r.optim.grad_accum,
                  "contrastive_batch": r.data.batch_size * f.processes * merged_micro_batches(r),
                  "processes": f.processes, "wall_s": round(f.wall_s, 1), "mixed_precision": f.mixed_precision,
                  "bad_steps": f.bad_steps, "lr": r.optim.lr, "weight_decay": r.optim.weight_decay,
                  "warmup_steps": r.optim.warmup_steps, "schedule": r.optim.schedule},
        "data": {"train_shards": r.data.train_shards, "train_samples": count_samples(urls),
                 "source": (find_manifest(urls) or {}).get("source"),
                 "class_names": class_names(urls), "skipped": f.skipped},
        "eval": f.evals,
    }


CURVES = "training_curves.png"  # the run's curves in the final folder, shown by the card


def write_final(model: nn.Module, run_dir: Path, recipe: Recipe, facts: RunFacts) -> Path:
    """Save ``RUN/final`` (atomically, see :func:`mmcl.hub.save_pretrained`) and ``RUN/summary.json``
    (the info without the recipe, which ``RUN/recipe.yaml`` already holds); returns the folder."""
    from mmcl.files import write_atomic
    from mmcl.hub import save_pretrained
    from mmcl.report import write_report

    info = run_info(recipe, facts)
    if hasattr(model, "starts_from"):
        info["starts_from"] = model.starts_from()
    files = {}
    try:  # RUN/report/, and its curves in the card
        write_report(run_dir, results=facts.evals)
        files[CURVES] = (run_dir / "report" / "curves.png").read_bytes()
        info["curves"] = CURVES
    except Exception as e:  # noqa: BLE001 (a report that cannot be drawn must not cost the model)
        print(f"mmcl: no training report ({type(e).__name__}: {e}); the model is written without curves")
    from mmcl.transformers_export import SUBFOLDER, export_files, form

    exported = export_files(model, recipe.data.preprocess())  # a transformers folder, when the towers map
    if exported:
        files.update(exported)
        info["transformers"], info["transformers_class"] = SUBFOLDER, form(model.model_cfg)
    final = save_pretrained(model, run_dir / "final", name=plugin_name("model", recipe.model),
                            preprocess=recipe.data.preprocess(), info=info, files=files)
    write_atomic(run_dir / "summary.json", json.dumps({k: v for k, v in info.items() if k != "recipe"}, indent=2)
                 + "\n")
    return final


def push_final(final: Path, recipe: Recipe, step: int, say: Callable[[str], Any] = print) -> str:
    """Upload the final model as ``recipe.hub`` says; the local folder is complete whatever happens,
    and a failure says how to push it later."""
    from mmcl.hub import push

    h = recipe.hub
    try:
        url = push(final, h.repo_id, private=h.private, revision=h.revision,
                   commit_message=f"mmcl: {recipe.run.name or Path(recipe.run.output_dir).name}, step {step}")
    except MmclError as e:
        raise MmclError(f"{e}\nThe trained model is saved in {final}; push it later with "
                        f"`mmcl push --model {final} --repo-id {h.repo_id}`") from None
    say(f"pushed to {url}")
    return url
