"""How a model generates when the caller does not say: stop tokens, temperature, top-p, length.

A Hugging Face folder states these in ``generation_config.json`` (Llama 3.2 Vision Instruct: stop at
``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``, sample at temperature 0.6 with top-p 0.9);
Meta's folder only implies the stop tokens (its tokenizer's ``stop_tokens``). They travel with the
model (``config.json``'s ``"generation"`` entry of an mm folder), and ``model.chat`` / ``mm ask``
use them for every option the caller leaves out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["GenerationDefaults"]


@dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """Generation settings saved with a model.

    Args:
        stop_token_ids: ids that end an answer (``None``: the text config's ``eos_token_ids``, else
            the tokenizer's stop tokens).
        temperature: 0 decodes greedily.
        top_p: nucleus sampling mass, in ``(0, 1]``.
        max_new_tokens: answer length limit (``None``: the caller's default).
    """

    stop_token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", ids)
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["stop_token_ids"] is not None:
            d["stop_token_ids"] = list(d["stop_token_ids"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationDefaults:
        """Strict inverse of :meth:`to_dict`: unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown generation settings {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GenerationDefaults:
        """Read a Hugging Face ``generation_config.json`` (as a dict).

        ``do_sample: false`` (or absent, transformers' default) means greedy whatever the
        temperature says, as ``generate`` does.
        """
        eos = config.get("eos_token_id")
        stops = None if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
        sample = bool(config.get("do_sample", False))
        max_new = config.get("max_new_tokens")
        return cls(
            stop_token_ids=stops,
            temperature=float(config.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(config.get("top_p", 1.0)) if sample else 1.0,
            max_new_tokens=None if max_new is None else int(max_new),
        )

    def to_hf(self) -> dict[str, Any]:
        """``generation_config.json`` content transformers reads the same way."""
        out: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            out.update(temperature=self.temperature, top_p=self.top_p)
        if self.stop_token_ids is not None:
            out["eos_token_id"] = list(self.stop_token_ids)
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        return out
