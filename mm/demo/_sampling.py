"""What the generators of the demo's data share: seeded random streams, balanced answer plans,
question wordings, and writing samples as a folder for ``mm data pack``."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mm._io import atomic_dir
from mm.demo.scenes import CHOICES, QUESTIONS


def sample_rng(what: str, split: str, seed: int) -> random.Random:
    """The random stream of ``what`` (``"image"``, ``"video"``) in ``split``: train and eval never
    share one."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    # A str seed is hashed with SHA-512 by random.Random: stable across processes and platforms.
    return random.Random(f"mm.synthetic:{what}:{split}:{seed}")


def check_count(name: str, value: int) -> None:
    """Refuse a ``value`` of ``name`` that is not a count."""
    if not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_kinds(kinds: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    """``kinds`` as a tuple, refused unless they are distinct names from ``allowed``."""
    kinds = tuple(kinds)
    if not kinds or any(k not in allowed for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct names from {allowed}, got {kinds!r}")
    return kinds


def plan_answers(rng: random.Random, num_samples: int, kinds: tuple[str, ...]) -> list[tuple[str, str]]:
    """(kind, answer) per sample, in shuffled blocks that hold every pair once."""
    plan: list[tuple[str, str]] = []
    while len(plan) < num_samples:
        block = [(kind, answer) for kind in kinds for answer in CHOICES[kind]]
        rng.shuffle(block)
        plan.extend(block)
    return plan[:num_samples]


def pick_question(rng: random.Random, kind: str, heldout_phrasings: bool) -> str:
    """One wording of a ``kind`` question; held-out wordings are drawn only with ``heldout_phrasings``."""
    phrasings = QUESTIONS[kind]
    return rng.choice(phrasings.train + phrasings.heldout if heldout_phrasings else phrasings.train)


def write_folder(
    samples: Sequence[Any],
    out_dir: str | os.PathLike[str],
    ext: str,
    write: Callable[[Any, Path], Any],
    messages: Callable[[Any, str], list[dict[str, Any]]],
) -> list[str]:
    """Write each sample as ``KEY.ext`` (by ``write``) + ``KEY.json`` (its ``messages`` naming
    ``KEY.ext``, and its kind and choices) into the new folder ``out_dir``; returns the keys."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty folder; write samples into a new one")
    keys = [f"{i:06d}" for i in range(len(samples))]
    with atomic_dir(out) as tmp:  # a failure leaves no half-written folder behind
        for key, sample in zip(keys, samples):
            write(sample, tmp / f"{key}.{ext}")
            row = {
                "messages": messages(sample, f"{key}.{ext}"),
                "meta": {"kind": sample.kind, "choices": list(sample.choices)},
            }
            (tmp / f"{key}.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    return keys
