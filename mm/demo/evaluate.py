"""How ``mm demo`` measures its model: greedy answers to held-out turns, and what they score.

Every phase evaluates the same way: the held-out samples become user turns, the model answers
them greedily in batches through its own preprocessor (the path ``model.chat`` uses), and each
answer is read up to the first stop token. :func:`generate_answers` is that path, for images,
videos and speech alike; :func:`exact_match` scores short answers against a sample's ``answer``,
overall and per question kind. :func:`perplexity` measures the frozen text model on held-out text,
before the adapters and after them.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["exact_match", "generate_answers", "perplexity"]


@torch.no_grad()
def generate_answers(
    model,
    turns: Sequence[list[dict[str, Any]]],
    *,
    max_new_tokens: int = 12,
    batch: int = 32,
    end_at: str | None = None,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> list[str]:
    """Greedy answers of ``model`` to each conversation of ``turns`` (each ending with a user turn).

    Args:
        model: a :class:`~mm.MultimodalModel` with its preprocessor.
        turns: the conversations, answered ``batch`` at a time (left-padded together).
        max_new_tokens: the longest answer.
        batch: conversations decoded together.
        end_at: one token's text (``"."``) that also ends an answer and is kept in it: answers are
            then read to the end of their first sentence, like ``--stop .`` in ``mm ask``, so a
            model that has not learned where to end does not run on into the next one. Without
            it, decoding stops at the model's own stop tokens.
        prepare: applied to each batch's model inputs before decoding (e.g. a video phase's group
            size).

    Returns:
        One answer per conversation: its text up to the first of the tokenizer's stop tokens (or
        ``end_at``), special tokens left out, stripped.
    """
    pre = model.preprocessor
    tok = pre.tokenizer
    ends, kept, stop_token_ids = tuple(tok.stop_ids), (), None  # None: the model's own stop tokens
    if end_at is not None:
        (end_token,) = tok.encode(end_at)
        ends = stop_token_ids = (*ends, end_token)
        kept = (end_token,)
    answers = []
    for i in range(0, len(turns), batch):
        inputs = pre.prompts(list(turns[i : i + batch]))
        if prepare is not None:
            inputs = prepare(inputs)
        new = model.generate(**inputs, max_new_tokens=max_new_tokens, stop_token_ids=stop_token_ids)
        for ids in new.tolist():
            end = next((k for k, t in enumerate(ids) if t in ends), len(ids))
            answer = ids[: end + 1] if end < len(ids) and ids[end] in kept else ids[:end]
            answers.append(tok.decode(answer, skip_special=True).strip())
    return answers


def exact_match(samples: Sequence[Any], answers: Sequence[str]) -> dict[str, Any]:
    """Exact-match accuracy of ``answers`` to ``samples`` (each with ``.answer`` and ``.kind``).

    Returns:
        ``accuracy`` (over all samples) and ``per_kind`` (by kind, in sorted order).
    """
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    for sample, answer in zip(samples, answers, strict=True):
        seen[sample.kind] += 1
        right[sample.kind] += answer == sample.answer
    return {
        "accuracy": sum(right.values()) / max(1, sum(seen.values())),
        "per_kind": {k: right[k] / seen[k] for k in sorted(seen)},
    }


@torch.no_grad()
def perplexity(forward, docs: list[str], tokenizer, seq_len: int = 256) -> float:
    """Token-level perplexity of ``docs`` under ``forward(ids) -> logits`` (documents cut at ``seq_len``)."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tokenizer.encode(doc, bos=True, eos=True)[: seq_len + 1]])
        logits = forward(ids[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)
