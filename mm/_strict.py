"""Strict reading of dictionaries into frozen dataclasses: the one place unknown keys are refused.

Configs, recipes, saved settings and preprocessing settings all come from JSON or YAML a person may
have written; a misspelt key must be an error naming it, never silently dropped.

:func:`build` goes further: it checks every value given against its field's annotation before the
dataclass is made, so a wrong type is one message naming the key path instead of a traceback deep
inside whatever first uses the value::

    stages[0].batch_size: expected an int, got the string '4' (a number in quotes is text; remove the quotes)
    stages[0].optimizer.lr: expected a number, got the string '5e-3' (YAML reads 5e-3 as text; write 5.0e-3)

Ranges are the dataclasses' own business (their ``__post_init__``, with :mod:`mm._values` rules);
:func:`build` reports those errors under the same key path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from mm._values import ConfigValueError, describe

__all__ = ["build", "check_fields"]

T = TypeVar("T")


def check_fields(
    cls: type, data: Any, where: str, *, required: bool = False, error: type[Exception] = ValueError
) -> dict[str, Any]:
    """``data`` as a new dict, after refusing what is not a field of dataclass ``cls``.

    Args:
        cls: the dataclass.
        data: what was read (must be a mapping).
        where: names the place in messages (``"model config"``, ``"stages[1].optimizer"``).
        required: also refuse a missing field that has no default.
        error: the exception raised.
    """
    if not isinstance(data, Mapping):
        raise error(f"{where} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise error(f"unknown keys in {where}: {unknown} (allowed: {sorted(fields)})")
    if required:
        missing = [
            n
            for n, f in fields.items()
            if n not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise error(f"{where} is missing {missing}")
    return dict(data)


def build(
    cls: type[T],
    data: Any,
    where: str,
    *,
    error: type[Exception] = ValueError,
    path: str | None = None,
) -> T:
    """``cls(**data)``, every value checked against its field's annotation first.

    Unknown and missing keys are refused (:func:`check_fields`). Values must be of their annotated
    type: ``int`` (not a bool or a float), ``float`` (an int is taken as the same float; not a bool,
    not a string, finite), ``str``, ``bool``, ``X | None``, ``tuple[X, ...]`` and ``list[X]`` (from a
    list), fixed-length ``tuple[X, Y]``, ``dict[K, V]``, and nested dataclasses (from a mapping,
    built the same way; an instance is taken as it is). The dataclass's own checks
    (``__post_init__``) then run; their errors are raised as ``error`` under the key path, a
    :class:`~mm._values.ConfigValueError` naming its field.

    Args:
        cls: the dataclass.
        data: the mapping read from JSON or YAML.
        where: names the mapping in messages about its keys (``"recipe"``, ``"stages[1].optimizer"``).
        error: the exception raised.
        path: the key path field names are appended to (default ``where``; ``""`` for the top level,
            whose fields are then named alone: ``seed``).
    """
    path = where if path is None else path
    if not isinstance(data, Mapping):
        raise error(f"{where}: expected a mapping, got {describe(data)}")
    fields = check_fields(cls, data, where, required=True, error=error)
    hints = _hints(cls)
    values = {name: _convert(hints[name], value, _join(path, name), error) for name, value in fields.items()}
    try:
        return cls(**values)
    except ConfigValueError as e:
        key = ".".join(part for part in (*e.where, e.key or "") if part)
        raise error(f"{_join(path, key) or where}: {e.detail}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, error):
            raise
        raise error(f"{path or where}: {e}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _join(path: str, name: str) -> str:
    if not name:
        return path
    if not path or name.startswith("["):
        return f"{path}{name}"
    return f"{path}.{name}"


_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false"}


def _what(tp: Any) -> str:
    """How a message names what type ``tp`` wants (``"an int or null"``)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        kinds = [_what(a) for a in args if a is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    if origin in (tuple, list):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} values"
        return f"a list of {_plural(args[0]) if args else 'values'}"
    if origin is dict or (isinstance(tp, type) and dataclasses.is_dataclass(tp)):
        return "a mapping"
    return _NAMES.get(tp, f"a {getattr(tp, '__name__', tp)}")


def _plural(tp: Any) -> str:
    return {int: "ints", float: "numbers", str: "strings", bool: "bools"}.get(tp, "values")


def _hint(tp: Any, value: Any) -> str:
    """Why a string was read where a number was wanted, and what to write instead."""
    if not isinstance(value, str) or not ({int, float} & _leaves(tp)):
        return ""
    text = value.strip()
    m = re.fullmatch(r"([-+]?)(\d+)(?:\.(\d*))?[eE]([-+]?)(\d+)", text)
    if m:  # YAML 1.1 (PyYAML) reads a float only with a dot and a signed exponent
        sign, whole, frac, exp_sign, exp = m.groups()
        return f" (YAML reads {text} as text; write {sign}{whole}.{frac or '0'}e{exp_sign or '+'}{exp})"
    try:
        float(text)
    except ValueError:
        return ""
    return " (a number in quotes is text; remove the quotes)"


def _leaves(tp: Any) -> set:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_leaves(a) for a in typing.get_args(tp)))
    return {tp}


def _convert(tp: Any, value: Any, key: str, error: type[Exception]) -> Any:
    """``value`` checked against annotation ``tp`` and in its canonical form; ``error`` names ``key``."""

    def refuse(detail: str | None = None) -> typing.NoReturn:
        got = detail or f"got {describe(value)}{_hint(tp, value)}"
        raise error(f"{key}: expected {_what(tp)}, {got}")

    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            refuse()
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            try:
                return _convert(options[0], value, key, error)
            except error:
                if _is_scalar(options[0]):
                    refuse()  # "an int or null", not just "an int"
                raise
        for option in options:
            try:
                return _convert(option, value, key, error)
            except error:
                continue
        refuse()
    if tp is bool:
        if not isinstance(value, bool):
            refuse()
        return value
    if tp is int:
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            refuse()
        return int(value)
    if tp is float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            refuse()
        if not math.isfinite(float(value)):
            raise error(f"{key}: expected a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            refuse()
        return value
    if origin in (tuple, list):
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, list | tuple):
            refuse()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                refuse(f"got {describe(list(value))}")
            items = [_convert(a, v, f"{key}[{i}]", error) for i, (a, v) in enumerate(zip(args, value))]
        else:
            item = args[0] if args else Any
            items = [_convert(item, v, f"{key}[{i}]", error) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            refuse()
        key_type, value_type = args or (Any, Any)
        out = {}
        for k, v in value.items():
            k = _convert(key_type, k, f"{key} key {k!r}", error)
            out[k] = _convert(value_type, v, f"{key}[{k!r}]", error)
        return out
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return build(tp, value, key, error=error)
    if isinstance(tp, type) and not isinstance(value, tp):
        refuse()
    return value


def _is_scalar(tp: Any) -> bool:
    return tp in _NAMES
