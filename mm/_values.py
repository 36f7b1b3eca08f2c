"""Type and range checks of config values, with messages that name the key.

Configs are frozen dataclasses that people write as JSON or YAML; :mod:`mm._strict` refuses unknown
keys, this module refuses wrong values of known ones. Each check returns the value in its canonical
form (an ``int`` given for a float field becomes a ``float``, a list a ``tuple``) and raises
:class:`ConfigValueError` naming the field::

    text.vocab_size must be a positive int, got -1
    text.embed_dim must be an int, got the string '128'

Bools are never ints or numbers here, and floats are never ints (``32.0`` is not a head size).
A config's ``__post_init__`` calls :func:`check_values` first, before any check that combines fields,
so that every path that builds one — a saved folder, a recipe, Python — gets the same messages.
A config nested inside another reports its errors with the outer key in front
(:meth:`ConfigValueError.within`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

__all__ = [
    "ConfigValueError",
    "Rule",
    "as_bool",
    "as_choice",
    "as_float",
    "as_int",
    "as_int_tuple",
    "check_values",
    "describe",
    "nested",
    "optional",
]

#: A check of one value: ``rule(key, value)`` returns the canonical value or raises.
Rule = Callable[[str, Any], Any]


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range.

    Args:
        detail: what is wrong (``"must be a positive int, got -1"``), or a whole sentence when
            ``key`` is ``None`` (a check that combines several fields).
        key: the field, dotted and indexed (``"cross_attention_layers[1]"``), or ``None``.
        where: the keys of the configs this one sits in, outermost first (``("text",)``).
    """

    def __init__(self, detail: str, *, key: str | None = None, where: tuple[str, ...] = ()) -> None:
        self.detail = detail
        self.key = key
        self.where = where
        super().__init__(self._message())

    def _message(self) -> str:
        path = ".".join((*self.where, self.key)) if self.key is not None else ".".join(self.where)
        if self.key is not None:
            return f"{path} {self.detail}"
        return f"{path}: {self.detail}" if path else self.detail

    def within(self, outer: str) -> ConfigValueError:
        """The same error, seen from the config that holds this one under key ``outer``."""
        return ConfigValueError(self.detail, key=self.key, where=(outer, *self.where))


def describe(value: Any) -> str:
    """``"the string '128'"``, ``"the float 32.0"``, ``"the bool True"``, ``"None"``, ``"-1"``."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return f"the bool {value}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, float):
        return f"the float {value!r}"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, Mapping):
        return f"a mapping {dict(value)!r}"[:80]
    if isinstance(value, list | tuple):
        return f"the list {list(value)!r}"[:80]
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def as_int(*, minimum: int | None = None, below: int | None = None) -> Rule:
    """An ``int`` (not a bool or float) of at least ``minimum`` and less than ``below``."""

    def rule(key: str, value: Any) -> int:
        if not _is_int(value):
            raise ConfigValueError(f"must be an int, got {describe(value)}", key=key)
        value = int(value)
        if (minimum is not None and value < minimum) or (below is not None and value >= below):
            if minimum == 1 and below is None:
                wanted = "a positive int"
            elif minimum == 0 and below is None:
                wanted = "a non-negative int"
            elif below is None:
                wanted = f"an int of at least {minimum}"
            else:
                wanted = f"an int in [{minimum if minimum is not None else '-inf'}, {below})"
            raise ConfigValueError(f"must be {wanted}, got {value}", key=key)
        return value

    return rule


def as_float(*, positive: bool = False, minimum: float | None = None, below: float | None = None) -> Rule:
    """A finite number (an int is taken as the same float; a bool or string is refused)."""

    def rule(key: str, value: Any) -> float:
        if not _is_number(value):
            raise ConfigValueError(f"must be a number, got {describe(value)}", key=key)
        number = float(value)
        if not math.isfinite(number):
            raise ConfigValueError(f"must be a finite number, got {value!r}", key=key)
        if positive and number <= 0:
            raise ConfigValueError(f"must be a positive number, got {value!r}", key=key)
        if (minimum is not None and number < minimum) or (below is not None and number >= below):
            low = "-inf" if minimum is None else f"{minimum:g}"
            high = "inf" if below is None else f"{below:g}"
            raise ConfigValueError(f"must be a number in [{low}, {high}), got {value!r}", key=key)
        return number

    return rule


def as_bool() -> Rule:
    """``True`` or ``False`` (not ``0``, ``1`` or ``"yes"``)."""

    def rule(key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            kind = f"the int {value}" if _is_int(value) else describe(value)
            raise ConfigValueError(f"must be a bool, got {kind}", key=key)
        return value

    return rule


def as_choice(choices: Collection[str]) -> Rule:
    """One of the strings ``choices``."""

    def rule(key: str, value: Any) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ConfigValueError(f"must be one of {list(choices)}, got {value!r}", key=key)
        return value

    return rule


def as_int_tuple(item: Rule | None = None, *, size: int | None = None) -> Rule:
    """A list or tuple of ints (each checked by ``item``), returned as a tuple; ``size`` fixes its length."""
    item = item or as_int()

    def rule(key: str, value: Any) -> tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigValueError(f"must be a list of ints, got {describe(value)}", key=key)
        if size is not None and len(value) != size:
            raise ConfigValueError(f"must hold {size} values, got {list(value)!r}", key=key)
        return tuple(item(f"{key}[{i}]", v) for i, v in enumerate(value))

    return rule


def nested(rule: Rule) -> Rule:
    """A list or tuple whose every entry passes ``rule`` (a list of pairs, say), returned as a tuple."""

    def check(key: str, value: Any) -> tuple:
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            raise ConfigValueError(f"must be a list, got {describe(value)}", key=key)
        return tuple(rule(f"{key}[{i}]", v) for i, v in enumerate(value))

    return check


def optional(rule: Rule) -> Rule:
    """``None``, or a value that passes ``rule``."""

    def check(key: str, value: Any) -> Any:
        return None if value is None else rule(key, value)

    return check


def check_values(config: Any, rules: Mapping[str, Rule]) -> None:
    """Check the fields of frozen dataclass instance ``config`` and store their canonical values."""
    names = {f.name for f in dataclasses.fields(config)}
    for name, rule in rules.items():
        if name not in names:  # a typo in a rules table must not pass silently
            raise KeyError(f"{type(config).__name__} has no field {name!r}")
        object.__setattr__(config, name, rule(name, getattr(config, name)))
