"""The run a checkpoint belongs to, so that a resume never continues another run.

A stage's checkpoints (and its ``summary.json``) record a :class:`RunIdentity`:

* ``settings`` — the stage as resolved: every setting that changes what is trained (objective,
  trainable set, data sources, optimiser, schedule, steps, batch, accumulation, clipping,
  precision, resolution, frames, sequence length, workers, where it starts, the effective seed and,
  for a first stage, the recipe's model), but not how often it logs or saves, how many checkpoints
  it keeps, activation checkpointing (the same numbers, less memory) or where it writes;
* ``recipe_hash`` — a SHA-256 of those settings (the short form a person compares);
* ``seed`` — the stage's effective seed;
* ``start`` — where the stage started: ``kind`` and ``path`` as the recipe says, and the digest of
  the starting model's adapters (every weight that is not the backbone's; the backbone has its own
  digest check).

:func:`differences` says, in words, how the identity of a checkpoint and the identity of the run
that would resume from it differ (``seed 1 there, 2 now``; ``the recipe's stage changed:
optimizer.lr 0.002 there, 0.003 now``; ``the stage now starts from another model``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from mm.training.recipe import Recipe, Stage

__all__ = ["RunIdentity", "differences", "stage_settings"]

#: Stage keys that change how a run is watched, not what it learns.
_NOT_TRAINING = ("log_every", "save_every", "keep_last", "activation_checkpointing")


def stage_settings(recipe: Recipe, stage: Stage, *, in_memory: bool = False) -> dict[str, Any]:
    """``stage`` as resolved, as plain JSON values: what changes what it trains (module docstring).

    ``in_memory``: the stage reads conversations given in Python instead of its shards.
    """
    settings = json.loads(json.dumps(dataclasses.asdict(stage)))
    for key in _NOT_TRAINING:
        settings.pop(key, None)
    settings["seed"] = recipe.seed if stage.seed is None else stage.seed
    first = bool(recipe.stages) and recipe.stages[0].name == stage.name
    if first and stage.start.kind == "previous":
        settings["model"] = json.loads(json.dumps(dataclasses.asdict(recipe.model)))
    if in_memory:
        settings["data"] = "in memory"
    return settings


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint records of the run it belongs to (see the module docstring)."""

    settings: dict[str, Any]
    start: dict[str, Any]

    @property
    def seed(self) -> int:
        return int(self.settings["seed"])

    @property
    def recipe_hash(self) -> str:
        text = json.dumps(self.settings, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @classmethod
    def of(
        cls, recipe: Recipe, stage: Stage, *, adapter_digest: str | None, in_memory: bool = False
    ) -> RunIdentity:
        start = {"kind": stage.start.kind, "path": stage.start.path, "adapter_digest": adapter_digest}
        return cls(stage_settings(recipe, stage, in_memory=in_memory), start)

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipe_hash": self.recipe_hash,
            "seed": self.seed,
            "start": dict(self.start),
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: Any) -> RunIdentity | None:
        """The identity a checkpoint recorded, or None where it recorded none (or an unreadable one)."""
        if not isinstance(data, dict):
            return None
        settings, start = data.get("settings"), data.get("start")
        if not isinstance(settings, dict) or "seed" not in settings or not isinstance(start, dict):
            return None
        return cls(settings, start)


def _flatten(value: Any, key: str = "") -> dict[str, Any]:
    """Nested settings as ``{"optimizer.lr": 0.002, "data[0].shards": "..."}``; lists of plain
    values (``trainable``, ``betas``) stay whole."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{key}.{k}" if key else str(k)))
        return out
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        out = {f"{key}.length": len(value)} if key else {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{key}[{i}]"))
        return out
    return {key: value}


def _show(value: Any) -> str:
    return "absent" if value is _ABSENT else json.dumps(value)


_ABSENT = object()


def differences(recorded: RunIdentity, current: RunIdentity, *, compare_start: bool = True) -> list[str]:
    """How ``current`` (the run that would resume) differs from ``recorded`` (the checkpoint's), in
    words; empty when they are the same run. ``compare_start=False`` leaves out the starting model's
    digest (not known before the model is loaded)."""
    out = []
    if recorded.seed != current.seed:
        out.append(f"seed {recorded.seed} there, {current.seed} now")
    old, new = _flatten(recorded.settings), _flatten(current.settings)
    changed = [
        f"{key} {_show(old.get(key, _ABSENT))} there, {_show(new.get(key, _ABSENT))} now"
        for key in sorted(set(old) | set(new), key=lambda k: (k not in old, k))
        if key != "seed" and old.get(key, _ABSENT) != new.get(key, _ABSENT)
    ]
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        out.append(f"the recipe's stage changed: {'; '.join(changed[:4])}{more}")
    if compare_start:
        was, now = recorded.start.get("adapter_digest"), current.start.get("adapter_digest")
        if was != now and was is not None and now is not None:
            out.append(
                f"the stage now starts from another model (adapter digest {str(was)[:12]}… there, "
                f"{str(now)[:12]}… now)"
            )
    return out
