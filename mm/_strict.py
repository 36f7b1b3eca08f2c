"""Strict reading of dictionaries into frozen dataclasses: the one place unknown keys are refused.

Configs, recipes, saved settings and preprocessing settings all come from JSON or YAML a person may
have written; a misspelt key must be an error naming it, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

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


def build(cls: type[T], data: Any, where: str, *, error: type[Exception] = ValueError) -> T:
    """``cls(**data)`` with :func:`check_fields` (unknown and missing keys), its own checks' errors
    raised as ``error`` naming ``where``."""
    fields = check_fields(cls, data, where, required=True, error=error)
    try:
        return cls(**fields)
    except (TypeError, ValueError) as e:
        if isinstance(e, error):
            raise
        raise error(f"{where}: {e}") from None
