"""Typed, validated recipes: YAML in, nested dataclasses out.

A recipe is plain YAML. It is checked against dataclasses whose fields carry their type and
allowed range, so a typo or a wrong value fails at load time with a message naming the key
and what is allowed, instead of deep inside a training run. Parts that depend on a choice
(the ``model`` and the ``objective``) name a registered builder, whose own dataclass checks
the remaining keys, so a new objective brings its own schema without touching this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mmcl.errors import ConfigError
from mmcl.registry import plugin_name, registered

T = TypeVar("T")


def spec(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    length: int | None = None,
    ordered: bool = False,
    nonempty: bool = False,
    help: str = "",
    default_factory: Callable[[], Any] | None = None,
) -> Any:
    """A dataclass field with documented allowed values, checked by :func:`from_dict`.

    ``ge``/``gt``/``le``/``lt`` bound a number, or each number of a list; ``length`` fixes a
    list's length, ``ordered`` asks for a non-decreasing list (a ``[low, high]`` range) and
    ``nonempty`` rejects an empty string or list.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "length": length, "ordered": ordered,
            "nonempty": nonempty, "help": help}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------
def _suggest(key: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_YAML_BOOLS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against type ``tp`` and return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is Literal:
        if isinstance(value, bool):  # YAML 1.1 reads a bare no/off/yes/on as a boolean
            spelled = [a for a in typing.get_args(tp) if isinstance(a, str) and a.lower() in _YAML_BOOLS[value]]
            if len(spelled) == 1:
                return spelled[0]
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: got {value!r}, allowed: {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, where)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:  # X | None: X's own message (e.g. "expected a finite number")
            raise errors[0]
        raise ConfigError(f"{where}: got {value!r}, expected {_type_name(tp)}")
    if origin in (list, tuple):
        (item,) = typing.get_args(tp)[:1] or (Any,)
        if isinstance(value, (str, int, float)) and item is not Any and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")  # pragma: no cover - schema bug


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le), ("lt", "<", operator.lt))
CONSTRAINTS = ("ge", "gt", "le", "lt", "length", "ordered", "nonempty")


def allowed(many: bool = False, **rules: Any) -> str:
    """Human-readable allowed values for :func:`check`'s rules, e.g. '>= 0 and < 1'
    (``many``: the rules of a list, e.g. '2 numbers, each >= 0 and < 1')."""
    bounds = " and ".join(f"{sym} {rules[k]}" for k, sym, _ in _BOUNDS if rules.get(k) is not None)
    if not many:
        return bounds or "not empty"
    text = f"{rules['length']} values" if rules.get("length") is not None else "a list"
    text += f", each {bounds}" if bounds else ""
    if rules.get("ordered"):
        text += ", the first <= the second" if rules.get("length") == 2 else ", in increasing order"
    return text


def check(value: Any, where: str, **rules: Any) -> None:
    """Raise :class:`ConfigError` naming ``where`` unless ``value`` keeps ``rules`` (the
    constraints of :func:`spec`). ``None`` (an unset optional key) always passes."""
    if value is None:
        return
    many = isinstance(value, (list, tuple))
    if rules.get("nonempty") and isinstance(value, (str, list, tuple, dict)) and len(value) == 0:
        raise ConfigError(f"{where}: must not be empty")
    numbers = [v for v in (value if many else [value]) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    ok = all(rules.get(k) is None or op(v, rules[k]) for v in numbers for k, _, op in _BOUNDS)
    if many:
        ok = ok and (rules.get("length") is None or len(value) == rules["length"])
        ok = ok and not (rules.get("ordered") and any(a > b for a, b in zip(numbers, numbers[1:])))
    if not ok:
        raise ConfigError(f"{where}: got {value!r}, allowed: {allowed(many, **rules)}")


def checked(tp: Any, value: Any, where: str, **rules: Any) -> Any:
    """``value`` converted to type ``tp`` and checked against ``rules``: validation for values
    that do not come through a dataclass field (e.g. free-form ``transform_args``)."""
    value = _coerce(tp, value, where)
    check(value, where, **rules)
    return value


def _rules(f: dataclasses.Field) -> dict[str, Any]:
    return {k: f.metadata[k] for k in CONSTRAINTS if f.metadata.get(k) is not None and f.metadata[k] is not False}


def plugin_section(kind: str, raw: Any, where: str) -> Any:
    """A ``{name: ..., **keys}`` recipe section validated against the named plugin's dataclass."""
    if not isinstance(raw, dict) or "name" not in raw:
        choices = ", ".join(sorted(registered(kind)))
        raise ConfigError(f"{where}: expected a mapping with a 'name' key (one of: {choices})")
    table = registered(kind)
    name = raw["name"]
    if name not in table:
        raise ConfigError(f"{where}.name: unknown {kind} {name!r}{_suggest(str(name), table)}")
    config_cls, _ = table[name]
    rest = {k: v for k, v in raw.items() if k != "name"}
    return from_dict(config_cls, rest, where)


def from_dict(cls: type[T], data: dict[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"unknown key {_join(where, key)!r}{_suggest(key, fields)}")
    kwargs = {}
    for name, f in fields.items():
        path = _join(where, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key {path!r}")
            continue
        if f.metadata.get("plugin"):
            kwargs[name] = plugin_section(f.metadata["plugin"], data[name], path)
            continue
        value = _coerce(hints[name], data[name], path)
        check(value, path, **_rules(f))
        kwargs[name] = value
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Inverse of :func:`from_dict`: plain, YAML-able data (plugins keep their 'name')."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            out[f.name] = to_dict(value)
            if f.metadata.get("plugin"):
                out[f.name] = {"name": plugin_name(f.metadata["plugin"], value), **out[f.name]}
        return out
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ---------------------------------------------------------------------------------------------
# YAML loading and --set overrides
# ---------------------------------------------------------------------------------------------
def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides (values parsed as YAML) to a raw recipe mapping."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key.path=value, e.g. optim.lr=1e-3")
        path, _, text = item.partition("=")
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            hint = "quote strings that hold braces or brackets, e.g. eval.knn_shards=['data/test-{000000..000001}.tar']"
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({problem}); {hint}") from None
        node = raw
        parts = path.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a mapping")
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning file and syntax problems into :class:`ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw


def load(cls: type[T], path: str | Path, overrides: Iterable[str] = ()) -> T:
    """Load and validate a recipe file into ``cls``, after applying ``--set`` overrides."""
    raw = apply_overrides(read_yaml(path), overrides)
    try:
        return from_dict(cls, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
