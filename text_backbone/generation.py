"""Token generation: greedy, temperature and nucleus (top-p) sampling, stop tokens, streaming.

Shapes: b batch, s prompt tokens, n new tokens, V vocabulary.

:func:`stream_tokens` is model-agnostic: it drives any ``step(ids [b, s], attention_mask [b, k])``
callable that returns the last position's logits ``[b, V]`` and keeps its own cache. The text
backbone and the multimodal model both generate through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

__all__ = ["Step", "sample_next", "stream_tokens"]

Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits [b, V]``: argmax at temperature 0, else nucleus sampling."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature} and {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [b, V]
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the top token).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)  # [b, 1]
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def stream_tokens(
    step: Step,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: Iterable[int] = (),
    pad_token_id: int = 0,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, ``[b]``, until all rows stopped or ``max_new_tokens``.

    A row that produced a stop token keeps yielding ``pad_token_id``. The stop token itself is
    yielded (as Hugging Face's ``generate`` returns it).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return
    b = input_ids.shape[0]
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)
    stops = torch.tensor(sorted(set(stop_token_ids)), dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    ones = torch.ones(b, 1, dtype=attention_mask.dtype, device=device)
    logits = step(input_ids, attention_mask)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature=temperature, top_p=top_p, generator=generator)
        token = token.masked_fill(finished, pad_token_id)
        yield token
        finished |= torch.isin(token, stops)
        if bool(finished.all()) or i == max_new_tokens - 1:
            return
        attention_mask = torch.cat([attention_mask, ones], dim=1)
        logits = step(token[:, None], attention_mask)
