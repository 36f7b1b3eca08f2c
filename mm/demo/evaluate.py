"""How ``mm demo`` measures its frozen text model: :func:`perplexity` on held-out text, before
the adapters and after them. Answers to held-out questions are scored by ``mm eval``
(:mod:`mm.demo.eval_sets`).
"""

from __future__ import annotations

import math

import torch

__all__ = ["perplexity"]


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
