"""Every ``>>>`` example in mmcl's docstrings runs and shows what it says (the examples are the
API's documentation: docs/api.md)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil
from pathlib import Path

import pytest

import mmcl

ROOT = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(mmcl.__path__, "mmcl.") if not m.name.endswith("__main__"))


def with_examples() -> list[str]:
    finder = doctest.DocTestFinder()
    return [name for name in MODULES if any(t.examples for t in finder.find(importlib.import_module(name)))]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", with_examples())
def test_docstring_examples_run(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed (output above)"


def test_the_public_api_is_reachable_from_the_package() -> None:
    assert set(mmcl.__all__) >= {"create_model", "fit", "Trainer", "load_recipe", "from_pretrained", "make_loader"}
    importlib.import_module("mmcl.merge")  # a submodule once imported is an attribute of the package:
    importlib.import_module("mmcl.train")  # no public name may be one

    for name in mmcl.__all__:
        assert callable(getattr(mmcl, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mmcl.nope  # noqa: B018


# what a user reaches for beyond ``mmcl.__all__`` and the registered models and objectives: the
# functional losses, evaluation, data, export and sharing (docs/api.md lists them)
PUBLIC = [
    "mmcl.objectives.clip.clip_loss", "mmcl.objectives.siglip.sigmoid_terms", "mmcl.objectives.simclr.nt_xent",
    "mmcl.objectives.infonce.info_nce", "mmcl.objectives.infonce.symmetric_info_nce",
    "mmcl.objectives.moco.moco_logits", "mmcl.objectives.byol.byol_loss", "mmcl.objectives.simsiam.simsiam_loss",
    "mmcl.objectives.swav.sinkhorn", "mmcl.objectives.dino.dino_loss", "mmcl.objectives.cpc.cpc_step_logits",
    "mmcl.objectives.dcl.dcl_loss", "mmcl.objectives.nnclr.nearest_neighbours",
    "mmcl.objectives.barlow.barlow_twins_loss", "mmcl.objectives.vicreg.variance_term",
    "mmcl.objectives.vicreg.covariance_term",
    "mmcl.evaluate.run.zeroshot", "mmcl.evaluate.run.retrieval_eval", "mmcl.evaluate.run.frozen_feature_evals",
    "mmcl.evaluate.knn.knn_classify", "mmcl.evaluate.knn.linear_probe", "mmcl.data.expand_shards",
    "mmcl.transformers_export.export", "mmcl.hub.push",
]


def public_names() -> list[str]:
    import mmcl.models  # noqa: F401  (registers the built-in models and objectives)
    import mmcl.objectives  # noqa: F401
    from mmcl.registry import registered

    classes = [f"{b.__module__}.{b.__qualname__}" for kind in ("model", "objective")
               for _, b in registered(kind).values() if b.__module__.startswith("mmcl.")]  # not tests' plugins
    return sorted({*(f"mmcl.{n}" for n in mmcl.__all__), *classes, *PUBLIC})


def resolve(dotted: str) -> object:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_every_public_name_has_an_example() -> None:
    """Each name of the public API shows its use in a ``>>>`` example (run by the test above);
    a new model or objective registers without one and this fails."""
    missing = [name for name in public_names() if ">>>" not in (resolve(name).__doc__ or "")]
    assert not missing, f"public names without a >>> example in their docstring: {missing}"


def test_the_walkthrough_runs(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """docs/walkthrough.md, from an empty folder: shards, a hand-written loop, the trainer,
    evaluation, the report, transformers, fine-tuning and WiSE-FT, as a newcomer would run it."""
    monkeypatch.chdir(tmp_path)
    result = doctest.testfile(str(ROOT / "docs" / "walkthrough.md"), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of docs/walkthrough.md failed"
