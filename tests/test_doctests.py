"""Every ``>>>`` example in mmcl's docstrings runs and shows what it says (the examples are the
API's documentation: docs/api.md)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import mmcl

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
