"""Build frozen dataclass configs from plain dicts (parsed YAML).

One generic builder for every config in the project: unknown keys, missing
keys and wrong types fail with the dotted key path named; range checks live in
each dataclass's ``__post_init__`` and are re-raised with the path too.
"""
from __future__ import annotations

import dataclasses
import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


class ParamsError(ValueError):
    """A params.yaml value is unknown, missing, mistyped or out of range."""


def build(cls: type, data: Any, where: str = "params"):
    """Return ``cls(**data)`` with nested dataclasses, tuples and literals checked.

    ``where`` is the dotted path used in error messages (e.g. ``pack.shard_rows``).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ParamsError(
            f"{where}.{unknown[0]}: unknown key; allowed keys: {', '.join(sorted(fields))}"
        )
    hints = get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        key = f"{where}.{name}"
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ParamsError(f"{key}: missing required key")
            continue
        kwargs[name] = coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except ParamsError:
        raise
    except (ValueError, TypeError) as err:
        raise ParamsError(f"{where}: {err}") from err


def coerce(tp: Any, value: Any, where: str):
    """Check ``value`` against the type annotation ``tp``; convert lists to tuples."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None:
            if type(None) in options:
                return None
            raise ParamsError(f"{where}: must not be null")
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(option, value, where)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ParamsError(f"{where}: {value!r} is not allowed; choose one of {list(allowed)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{where}: expected a list, got {type(value).__name__}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(args[0], v, f"{where}[{i}]") for i, v in enumerate(value))
        if args and len(args) != len(value):
            raise ParamsError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{where}: expected a mapping, got {type(value).__name__}")
        _, vt = get_args(tp) or (str, Any)
        return {str(k): coerce(vt, v, f"{where}.{k}") for k, v in value.items()}
    return _scalar(tp, value, where)


def _scalar(tp: Any, value: Any, where: str):
    if value is None:
        raise ParamsError(f"{where}: must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{where}: expected a string, got {value!r}")
        return value
    raise ParamsError(f"{where}: unsupported config type {tp!r}")


def to_dict(config) -> dict:
    """Plain-dict view of a config (tuples as lists), e.g. for JSON sidecars."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return {k: plain(v) for k, v in dataclasses.asdict(config).items()}


def check(condition: bool, message: str) -> None:
    """Range check for ``__post_init__``: raise ParamsError(message) unless condition."""
    if not condition:
        raise ParamsError(message)


__all__ = ["ParamsError", "build", "coerce", "to_dict", "check"]
