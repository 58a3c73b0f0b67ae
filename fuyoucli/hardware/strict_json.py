"""Hardware profile stage, JSON reading: build frozen dataclasses from parsed JSON, strictly.

Knows dataclasses, tuple[X, ...], Literal, X | None, bool, int, float and str, which is all the
profile schema uses. Imports no torch and nothing of fuyou's.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Literal, Union


class FieldError(Exception):
    """Bad input at a location, e.g. 'disks[0].read[1].gbps: expected a finite number'."""


def decode(tp: object, value: object, where: str = "") -> object:
    """Build `tp` from JSON data, strictly: unknown or missing keys and wrong types are errors, and a
    dataclass's own ValueError (from __post_init__) is reported at its location."""
    name = where or "profile"
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise FieldError(f"{name}: expected an object")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = sorted(set(value) - set(fields))
        if unknown:
            raise FieldError(f"{name}: unknown field {unknown[0]!r}")
        kwargs = {}
        for fname, field in fields.items():
            sub = f"{where}.{fname}" if where else fname
            if fname not in value:
                if field.default is dataclasses.MISSING:
                    raise FieldError(f"{sub}: missing")
                continue
            kwargs[fname] = decode(hints[fname], value[fname], sub)
        try:
            return tp(**kwargs)
        except ValueError as exc:
            raise FieldError(f"{name}: {exc}") from None
    if origin is tuple:
        if not isinstance(value, list):
            raise FieldError(f"{name}: expected a list")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(decode(item_tp, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise FieldError(f"{name}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return decode(inner, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise FieldError(f"{name}: expected true or false")
        return value
    if tp is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(f"{name}: expected an integer")
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise FieldError(f"{name}: expected a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise FieldError(f"{name}: expected a string")
        return value
    raise TypeError(f"profile schema has an unsupported type {tp!r} at {name}")  # a bug, not bad input
