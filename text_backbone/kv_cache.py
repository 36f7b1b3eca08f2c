"""A preallocated key/value cache for incremental decoding.

Shapes: b batch, kvh key/value heads, L cache capacity, hd head dim, s new tokens.

The cache owns one ``[b, kvh, L, hd]`` buffer per layer for keys and for values, allocated once, and
a ``[b, L]`` validity mask for left-padded batches. :meth:`reserve` hands out the slots for the next
``s`` tokens; each layer then writes its keys/values there with :meth:`write` and reads everything
up to the end of those slots. Nothing is concatenated or reallocated while decoding.
"""

from __future__ import annotations

import torch

__all__ = ["KVCache"]


class KVCache:
    """Per-layer key/value buffers of fixed capacity.

    Args:
        num_layers: number of self-attention layers that store keys/values.
        batch_size: rows ``b``.
        num_kv_heads: key/value heads ``kvh``.
        head_dim: per-head width ``hd``.
        capacity: maximum number of tokens ``L`` (prompt + generated).
        dtype, device: of the buffers.
    """

    def __init__(
        self,
        *,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.valid = torch.ones(batch_size, capacity, dtype=torch.bool, device=device)  # [b, L]
        self.capacity = capacity
        self.length = 0
        self.has_padding = False

    @property
    def batch_size(self) -> int:
        return self.valid.shape[0]

    def reserve(self, num_tokens: int, valid: torch.Tensor | None = None) -> tuple[int, int]:
        """Claim slots ``[start, end)`` for ``num_tokens`` new tokens; ``valid [b, s]`` marks padding."""
        start, end = self.length, self.length + num_tokens
        if end > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} tokens; {end} were asked for")
        if valid is not None:
            self.valid[:, start:end] = valid.to(torch.bool)
            self.has_padding = self.has_padding or not bool(valid.all())
        self.length = end
        return start, end

    def write(
        self, layer: int, start: int, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``keys``/``values [b, kvh, s, hd]`` at ``start`` and return all keys/values so far."""
        end = start + keys.shape[2]
        self.keys[layer][:, :, start:end] = keys
        self.values[layer][:, :, start:end] = values
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (drop finished sequences, reorder for beam-like search)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]
