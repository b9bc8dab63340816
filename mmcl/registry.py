"""The plugin registries: models and objectives by name, each with the config dataclass that
validates its recipe section and the builder that makes it, and what each model declares it reads
and produces (:func:`model_declaration`, checked against the objective when a recipe loads).

This module imports no plugin: a plugin module registers itself when it is imported
(``@register("objective", "simclr", SimCLRConfig)``), and the recipe layer (:mod:`mmcl.recipe`)
imports the built-in plugin packages. Nothing here imports the rest of mmcl, so every layer can
use it without an import circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mmcl.errors import ConfigError

_REGISTRIES: dict[str, dict[str, tuple[type, Callable[..., Any]]]] = {"model": {}, "objective": {}}


def register(kind: str, name: str, config_cls: type) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering a class for ``kind`` ('model' or 'objective') under ``name``;
    ``config_cls`` is the dataclass of its recipe section. :func:`build` makes it with its
    ``from_config(cfg)`` classmethod if it has one (a model whose constructor takes more than its
    config, such as CLIP), else with ``cls(cfg)``. A plain function is accepted too."""

    def wrap(builder: Callable[..., Any]) -> Callable[..., Any]:
        _REGISTRIES[kind][name] = (config_cls, builder)
        return builder

    return wrap


def registered(kind: str) -> dict[str, tuple[type, Callable[..., Any]]]:
    """The registered (config class, builder) pairs of one kind, by name."""
    return _REGISTRIES[kind]


def build(kind: str, cfg: Any, *args: Any, **kwargs: Any) -> Any:
    """Build the registered ``kind`` whose config dataclass instance is ``cfg``."""
    for config_cls, builder in registered(kind).values():
        if type(cfg) is config_cls:
            return getattr(builder, "from_config", builder)(cfg, *args, **kwargs)
    raise ConfigError(f"no {kind} is registered for config type {type(cfg).__name__}")


def plugin_name(kind: str, cfg: Any) -> str:
    """The registry name of a validated plugin config (e.g. 'clip')."""
    for name, (config_cls, _) in registered(kind).items():
        if type(cfg) is config_cls:
            return name
    raise ConfigError(f"no {kind} is registered for config type {type(cfg).__name__}")


def model_declaration(name: str) -> tuple[frozenset[str], tuple[str, ...]] | None:
    """``(data kinds, outputs)`` the registered model ``name`` declares, or ``None`` if it declares
    neither (a plugin model without the class attributes ``data_kinds`` and ``outputs``)."""
    _, builder = registered("model")[name]
    kinds, outputs = getattr(builder, "data_kinds", None), getattr(builder, "outputs", None)
    if kinds is None or outputs is None:
        return None
    return frozenset(kinds), tuple(outputs)
