"""Decoding steps of fixed shapes, and on a GPU one CUDA graph launch per decoded token.

Shapes: b rows, L cache slots (prompt + new tokens), V vocabulary.

An eager decoding step launches every kernel of every layer from Python, one by one; at batch 1 on
a GPU that launch overhead, not the weights' bytes, bounds a token. A CUDA graph replays a recorded
step as one launch, but only a step whose every shape and every buffer address is the same each
time and that never waits for the host. :class:`StaticDecoder` is that step:

* the token's id and position and the cache slot it writes live in tensors that the step itself
  advances (``pos += 1``, ``slot += 1``), not in Python ints;
* each layer writes its keys/values at ``slot`` (``index_copy_``) and attends to all ``L`` slots
  of the preallocated cache, with a boolean mask of the slots that hold this row's real tokens up to
  ``slot`` (what the eager step attends to, which reads the first ``slot + 1`` slots);
* vision and video keys/values, their rows and the cross-attention mask of decoded tokens were fixed
  at prefill;
* nothing reads a tensor's value on the host.

On CUDA (``graph=True``) the first decoding step runs eagerly on a side stream (the warm-up CUDA
graphs need) and the next ones replay a graph captured right after it. Elsewhere the same step runs
eagerly: same tokens, fixed shapes, no graph (this is how the tests check the captured code on a
machine without a GPU). Sampling stays outside the step (its generator and top-p sort are the
caller's), so any temperature can use it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mm.text_backbone.layers import AttentionContext
from mm.text_backbone.rope import rope_cos_sin

__all__ = ["StaticDecoder"]


class _SlotCache:
    """The KV cache's buffers written at a slot held in a tensor; every layer reads all its slots."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor) -> None:
        self.keys, self.values, self.slot = keys, values, slot

    def write(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values [b, kvh, 1, hd]`` at ``slot`` (``start`` is not used) and return
        the whole ``[b, kvh, L, hd]`` buffers."""
        k, v = self.keys[layer], self.values[layer]
        k.index_copy_(2, self.slot, keys)
        v.index_copy_(2, self.slot, values)
        return k, v


class StaticDecoder:
    """The decoding steps after a prefill, with fixed shapes (module docstring).

    Args:
        model: a :class:`~mm.MultimodalModel`.
        state: the prefilled :class:`~mm.model.generation.GenerationState`; its cache must have room
            for every token still to decode.
        attention_mask: ``[b, s]`` of the prompt (1 real, 0 left padding).
        head: last hidden states ``[b, d]`` to logits ``[b, V]``.
        graph: capture a CUDA graph (the cache must be on a CUDA device).
    """

    def __init__(
        self,
        model,
        state,
        attention_mask: torch.Tensor,
        head: Callable[[torch.Tensor], torch.Tensor],
        *,
        graph: bool,
    ) -> None:
        cache = state.cache
        device = cache.valid.device
        if graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs the model on a CUDA device, not {device}")
        self.model, self.state, self.head = model, state, head
        b, capacity = cache.valid.shape
        self.ids = torch.zeros(b, 1, dtype=torch.long, device=device)
        # the next token's position: its row's real tokens so far (positions count from 0)
        self.pos = attention_mask.to(device=device, dtype=torch.long).sum(dim=1, keepdim=True)  # [b, 1]
        self.slot = torch.tensor([cache.length], dtype=torch.long, device=device)
        self.k_pos = torch.arange(capacity, device=device)  # [L]
        self.valid = cache.valid  # [b, L]
        self.cache = _SlotCache(cache.keys, cache.values, self.slot)
        self.remaining = capacity - cache.length
        self.graph = graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._logits: torch.Tensor | None = None

    def _step(self) -> torch.Tensor:
        """One token of every row: logits ``[b, V]``; advances ``pos`` and ``slot``."""
        model, state = self.model, self.state
        backbone = model.backbone
        h = backbone.embed_tokens(self.ids)  # decoded ids are text tokens (the head's rows)
        self.valid.index_fill_(1, self.slot, True)
        mask = (self.valid & (self.k_pos <= self.slot))[:, None, None, :]  # [b, 1, 1, L]
        cos, sin = rope_cos_sin(backbone._inv_freq, self.pos, h.dtype)
        ctx = AttentionContext(cos=cos, sin=sin, mask=mask, is_causal=False, cache=self.cache, start=0)
        h = model.run_layers(
            h,
            ctx,
            vision=state.vision,
            cross_attention_mask=state.last_mask_row,
            video=state.video,
            video_cross_attention_mask=state.last_video_row,
        )
        logits = self.head(h[:, -1])
        self.pos.add_(1)
        self.slot.add_(1)
        return logits

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, V]`` after feeding ``ids [b, 1]`` (the tokens just sampled)."""
        if self.remaining <= 0:
            raise ValueError("the KV cache is full: no slot is left for another token")
        self.remaining -= 1
        self.ids.copy_(ids)
        if not self.graph:
            return self._step()
        if self._graph is None:
            side = torch.cuda.Stream(device=self.ids.device)
            side.wait_stream(torch.cuda.current_stream(self.ids.device))
            with torch.cuda.stream(side):  # warm-up, as CUDA graphs need: this token, computed eagerly
                logits = self._step()
            torch.cuda.current_stream(self.ids.device).wait_stream(side)
            self._graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self._graph):  # recorded, not run: pos and slot stay where they are
                self._logits = self._step()
            return logits
        self._graph.replay()
        return self._logits
