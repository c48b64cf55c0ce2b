"""Check a JSON value against the TypedDicts of :mod:`sdserve.drill.schema`."""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints


def check(value: Any, tp: Any, path: str = "$") -> list[str]:
    """Every place where ``value`` does not fit ``tp`` (empty when it fits)."""
    origin = get_origin(tp)
    if typing.is_typeddict(tp):
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        hints = get_type_hints(tp)
        errors = []
        if set(value) != set(hints):
            errors.append(f"{path}: keys {sorted(set(value) ^ set(hints))} differ")
        for key, sub in hints.items():
            if key in value:
                errors += check(value[key], sub, f"{path}.{key}")
        return errors
    if origin in (Union, types.UnionType):
        options = [check(value, a, path) for a in get_args(tp)]
        return [] if any(not o for o in options) else options[0]
    if origin is Literal:
        return [] if value in get_args(tp) else [f"{path}: {value!r} not in {get_args(tp)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        (item,) = get_args(tp)
        return [e for i, v in enumerate(value) for e in check(v, item, f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        _, item = get_args(tp)
        return [e for k, v in value.items() for e in check(v, item, f"{path}.{k}")]
    if tp is type(None):
        return [] if value is None else [f"{path}: expected null"]
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected a number"]
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: expected an integer"]
    return [] if isinstance(value, tp) else [f"{path}: expected {tp.__name__}"]
