"""The package's imports point one way, layer by layer, and form no circle (issue 14).

Every ``import`` in ``mmcl/`` and ``data_prep/`` is read from the source (module level and inside
functions alike: a lazy import is still a dependency), so a new upward import fails here, not in
a review. The layers are the ones ``docs/architecture.md`` draws.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. A module may import its own package's modules and anything in a lower layer.
LAYERS: list[tuple[str, ...]] = [
    ("mmcl", "mmcl.errors", "mmcl.dist", "mmcl.decode", "mmcl.prompts", "mmcl.argtypes", "mmcl.testing",
     "mmcl.files", "mmcl.tarfiles"),
    ("mmcl.registry",),  # plugins by name; imports no plugin
    ("mmcl.config",),  # the typed schema and YAML
    ("mmcl.data",),
    ("mmcl.models", "mmcl.evaluate"),  # evaluation reads data and models' encode_* only, never objectives
    ("mmcl.objectives",),
    ("mmcl.recipe", "mmcl.card", "mmcl.optim", "mmcl.gradcache", "mmcl.checkpoint", "mmcl.fsdp", "mmcl.report"),
    ("mmcl.hub", "mmcl.transformers_export"),
    ("mmcl.publish", "mmcl.merge"),
    ("mmcl.train",),
    ("mmcl.cli", "mmcl.api"),
    ("mmcl.__main__",),
    ("data_prep",),
]


def modules() -> dict[str, Path]:
    found = {}
    for top in ("mmcl", "data_prep"):
        for path in (ROOT / top).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = modules()


def owner(name: str) -> str | None:
    """The project module an imported name lives in (``mmcl.data.loader`` for ``mmcl.data.loader.X``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(name: str, path: Path) -> set[str]:
    """Project modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        out |= {m for t in targets if (m := owner(t)) and m != name}
    return out


GRAPH = {name: imports(name, path) for name, path in MODULES.items()}


def layer(name: str) -> tuple[int, str]:
    """(layer index, the layer entry that holds it): the longest entry that is ``name`` or a package
    of it (``mmcl`` itself only by name, so a new top-level module must be given its layer)."""
    return max(((i, e) for i, entries in enumerate(LAYERS) for e in entries
                if name == e or (e != "mmcl" and name.startswith(e + "."))), key=lambda ie: len(ie[1]))


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        layer(name)  # raises ValueError (max of nothing) for a module no layer names


def upward(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer, or of another entry of the same layer."""
    found = []
    for name, targets in graph.items():
        own, own_entry = layer(name)
        for t in targets:
            theirs, their_entry = layer(t)
            if theirs > own or (theirs == own and their_entry != own_entry):
                found.append(f"{name} imports {t}")
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Import circles between modules of different layer entries (a package's ``__init__``
    importing its own modules, which import the package, is not a circle of layers)."""
    def cycle_from(start: str) -> list[str] | None:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for t in graph.get(node, ()):
                if layer(t)[1] == layer(node)[1]:
                    continue
                if t == start:
                    return path + [t]
                if t not in seen:
                    seen.add(t)
                    stack.append((t, path + [t]))
        return None

    return [c for name in graph if (c := cycle_from(name))]


def test_imports_point_down_the_layers() -> None:
    assert not upward(GRAPH)


def test_no_import_circle() -> None:
    assert not circles(GRAPH)


def test_the_library_never_imports_data_prep() -> None:
    assert not [f"{n} imports {t}" for n, ts in GRAPH.items() if n.startswith("mmcl") for t in ts
                if t.startswith("data_prep")]


def test_the_checks_catch_an_upward_import_and_a_circle() -> None:
    """The graph sees function-level imports (the Hub's lazy import of the models), and evaluation
    reaching up into the objectives, or the registry importing a plugin back, is caught."""
    assert "mmcl.models" in GRAPH["mmcl.hub"]
    bad = GRAPH | {"mmcl.evaluate.features": GRAPH["mmcl.evaluate.features"] | {"mmcl.objectives.clip"}}
    assert upward(bad) == ["mmcl.evaluate.features imports mmcl.objectives.clip"]
    loop = GRAPH | {"mmcl.registry": GRAPH["mmcl.registry"] | {"mmcl.objectives.simclr"}}
    assert circles(loop) and all("mmcl.registry" in c for c in circles(loop))


def test_mmcl_prep_imports_neither_torch_nor_webdataset() -> None:
    """mmcl-prep runs where torch is not installed (an img2dataset or Spark environment): every
    data_prep module, imported in a fresh interpreter, leaves torch and webdataset unimported (the
    tar rules it shares with the loader live in the torch-free ``mmcl.tarfiles``)."""
    import subprocess
    import sys

    code = ("import importlib, pkgutil, sys, data_prep\n"
            "for m in pkgutil.iter_modules(data_prep.__path__):\n"
            "    m.name == '__main__' or importlib.import_module('data_prep.' + m.name)\n"
            "print(sorted(k for k in ('torch', 'torchvision', 'webdataset') if k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
