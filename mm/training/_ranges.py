"""Range rules of recipe values (:mod:`mm._values` rules for what the shared ones do not say).

Each rule is ``rule(key, value) -> value``, raising :class:`~mm._values.ConfigValueError` naming
the key; the recipe's dataclasses run them in ``__post_init__`` (:func:`mm._values.check_values`),
so a recipe read from YAML and one built in Python are held to the same ranges.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping, Sequence
from typing import Any

from mm._values import ConfigValueError, Rule, describe

__all__ = ["fraction", "nullable", "number", "pair", "scales", "text", "texts"]


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    if low is None:
        return f"{'<' if high_open else '<='} {high:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def number(
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    why: str = "",
) -> Rule:
    """A finite number (not a bool) within the bounds; ``why`` is added to the message in brackets."""
    interval = _interval(low, high, low_open, high_open)
    reason = f" ({why})" if why else ""

    def rule(key: str, value: Any) -> float:
        if not isinstance(value, numbers.Real) or isinstance(value, bool):
            raise ConfigValueError(f"must be a number, got {describe(value)}", key=key)
        x = float(value)
        inside = math.isfinite(x) and not (
            (low is not None and (x < low or (low_open and x == low)))
            or (high is not None and (x > high or (high_open and x == high)))
        )
        if not inside:
            raise ConfigValueError(f"must be a number {interval}, got {value!r}{reason}", key=key)
        return x

    return rule


def fraction() -> Rule:
    """A number in [0, 1]."""
    return number(low=0, high=1)


def nullable(rule: Rule, meaning: str) -> Rule:
    """``None`` (which means ``meaning``), or a value that passes ``rule``."""

    def check(key: str, value: Any) -> Any:
        if value is None:
            return None
        try:
            return rule(key, value)
        except ConfigValueError as e:
            raise ConfigValueError(f"{e.detail} (or null: {meaning})", key=e.key) from None

    return check


def text(pattern: str | None = None, what: str = "") -> Rule:
    """A non-empty string, matching ``pattern`` (described as ``what``) when given."""

    def rule(key: str, value: Any) -> str:
        if not isinstance(value, str):
            raise ConfigValueError(f"must be a string, got {describe(value)}", key=key)
        if not value.strip():
            raise ConfigValueError("must not be empty", key=key)
        if pattern is not None and not re.fullmatch(pattern, value):
            raise ConfigValueError(f"must be {what}, got {value!r}", key=key)
        return value

    return rule


def _sequence(key: str, value: Any) -> Sequence:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise ConfigValueError(f"must be a list, got {describe(value)}", key=key)
    return value


def texts() -> Rule:
    """A list of non-empty strings, returned as a tuple."""
    item = text()

    def rule(key: str, value: Any) -> tuple[str, ...]:
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(_sequence(key, value)))

    return rule


def pair(item: Rule) -> Rule:
    """Two values, each passing ``item``, returned as a tuple."""

    def rule(key: str, value: Any) -> tuple:
        value = _sequence(key, value)
        if len(value) != 2:
            raise ConfigValueError(f"must hold 2 values, got {describe(list(value))}", key=key)
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))

    return rule


def scales(item: Rule) -> Rule:
    """A mapping of non-empty strings (glob patterns) to values passing ``item``, returned as a dict."""
    pattern = text()

    def rule(key: str, value: Any) -> dict:
        if not isinstance(value, Mapping):
            raise ConfigValueError(f"must be a mapping, got {describe(value)}", key=key)
        return {pattern(key, k): item(f"{key}[{k!r}]", v) for k, v in value.items()}

    return rule
