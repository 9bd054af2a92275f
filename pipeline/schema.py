"""Strict conversion of YAML mappings into typed, frozen dataclasses.

Every key must be a field of the target dataclass (unknown keys are typos and fail), every value must have
the field's type, and each dataclass's own `__post_init__` checks ranges. Errors carry the dotted key.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

T = TypeVar("T")


class UsageError(ValueError):
    """Bad input to a command (exit status 2); the message starts with the setting that is wrong."""


class ParamsError(UsageError):
    """A params.yaml problem; the message starts with the dotted key that is wrong."""


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _yaml_number_hint(value: Any) -> str:
    """Why a number arrives as text: it was quoted in the file."""
    try:
        number = float(value) if isinstance(value, str) else math.nan
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        return ""
    return f" (quoted, so it is text; write {value} without quotes)"


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(value, option, key)
            except ParamsError as error:
                errors.append(str(error))
        raise ParamsError(errors[0] if len(errors) == 1 else f"{key}: {value!r} is not a {_describe(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ParamsError(f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, args))}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ParamsError(f"{key}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        return tuple(_convert(item, item_type, f"{key}[{i}]") for i, item in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise ParamsError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, key)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"{key}: expected an integer, got {value!r}{_yaml_number_hint(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ParamsError(f"{key}: expected a number, got {value!r}{_yaml_number_hint(value)}")
        if not math.isfinite(value):
            raise ParamsError(f"{key}: {value!r} must be a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported field type {tp!r} for {key}")


def from_mapping(cls: type[T], data: Any, key: str = "") -> T:
    """Build dataclass `cls` from `data`, rejecting unknown keys and wrong types; missing keys use defaults."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ParamsError(f"{key or 'params'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ParamsError(f"{where}{unknown[0]}: unknown key; allowed keys here: {', '.join(sorted(fields))}")
    values = {}
    for name in fields:
        if name in data:
            values[name] = _convert(data[name], hints[name], f"{key}.{name}" if key else name)
    try:
        return cls(**values)
    except ParamsError:
        raise
    except ValueError as error:
        raise ParamsError(f"{key + ': ' if key else ''}{error}") from error


def to_mapping(obj: Any) -> Any:
    """Dataclasses -> plain dicts/lists (for YAML, JSON and MLflow params)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_mapping(v) for v in obj]
    return obj


def flatten_keys(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted keys to their leaf values, {'a': {'b': 1}} -> {'a.b': 1} (an empty mapping has
    no leaves, as an overlay's empty mapping changes nothing)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_keys(value, full))
        else:
            out[full] = value
    return out
