"""A preallocated key/value cache for incremental decoding.

Shapes: b batch, kvh key/value heads, L cache capacity, hd head dim, s new tokens.

The cache owns one ``[b, kvh, L, hd]`` buffer per layer for keys and for values, allocated once, and
a ``[b, L]`` validity mask for left-padded batches. :meth:`reserve` hands out the slots for the next
``s`` tokens; each layer then writes its keys/values there with :meth:`write` and reads everything
up to the end of those slots. Nothing is concatenated or reallocated while a fixed batch decodes.

Continuous batching (:mod:`mm.model.batching`) changes the batch between steps: :meth:`join` adds
the rows of another cache, right-aligned to this cache's length (a row's keys keep the positions
they were rotated with; the slots before them are padding), :meth:`select_rows` drops rows,
:meth:`compact` drops leading slots no row uses, and :meth:`ensure_capacity` grows the buffers.
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
        s = keys.shape[2]
        # narrow + copy_: the same copy as slice assignment, in fewer dispatched ops per decoded token.
        k, v = self.keys[layer], self.values[layer]
        k.narrow(2, start, s).copy_(keys)
        v.narrow(2, start, s).copy_(values)
        return k.narrow(2, 0, start + s), v.narrow(2, 0, start + s)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` (drop finished sequences, reorder for beam-like search)."""
        self.keys = [k[rows] for k in self.keys]
        self.values = [v[rows] for v in self.values]
        self.valid = self.valid[rows]

    # ------------------------------------------------------------------ continuous batching
    def _resized(self, capacity: int, shift: int) -> None:
        """Reallocate to ``capacity`` slots with the current tokens moved ``shift`` slots right (or
        left when negative: the first ``-shift`` slots are dropped)."""
        b, kvh, _, hd = self.keys[0].shape if self.keys else (self.batch_size, 0, 0, 0)
        keep = self.length if shift >= 0 else self.length + shift
        src = slice(0, keep) if shift >= 0 else slice(-shift, self.length)
        dst = slice(shift, shift + keep) if shift >= 0 else slice(0, keep)

        def move(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros(b, kvh, capacity, hd)
            out[:, :, dst] = t[:, :, src]
            return out

        self.keys = [move(k) for k in self.keys]
        self.values = [move(v) for v in self.values]
        valid = torch.zeros(b, capacity, dtype=torch.bool, device=self.valid.device)
        valid[:, dst] = self.valid[:, src]
        self.valid = valid
        self.capacity = capacity
        self.length = keep + max(shift, 0)
        self.has_padding = self.has_padding or shift > 0

    def ensure_capacity(self, capacity: int) -> None:
        """Hold at least ``capacity`` slots (doubling, so growing one token at a time stays cheap)."""
        if capacity > self.capacity:
            self._resized(max(capacity, 2 * self.capacity), 0)

    def join(self, other: KVCache) -> None:
        """Append ``other``'s rows. Their tokens end where this cache's do (this cache's tokens move
        right first when ``other`` holds more); the slots before a row's tokens are padding."""
        if self.batch_size == 0:
            self.__dict__.update(other.__dict__)
            return
        if other.length > self.length:
            self._resized(max(self.capacity, other.length), other.length - self.length)
        start = self.length - other.length
        self.ensure_capacity(self.length)
        n, cap = other.length, self.capacity
        self.keys = [torch.cat([k, _placed(o, start, n, cap)]) for k, o in zip(self.keys, other.keys)]
        self.values = [torch.cat([v, _placed(o, start, n, cap)]) for v, o in zip(self.values, other.values)]
        valid = torch.zeros(other.batch_size, self.capacity, dtype=torch.bool, device=self.valid.device)
        valid[:, start : self.length] = other.valid[:, : other.length]
        self.valid = torch.cat([self.valid, valid])
        self.has_padding = self.has_padding or start > 0 or other.has_padding

    def compact(self) -> None:
        """Drop leading slots that no row uses (after rows left)."""
        used = self.valid[:, : self.length].any(dim=0).nonzero()
        first = int(used[0]) if used.numel() else self.length
        if first > 0:
            self._resized(self.capacity, -first)


def _placed(t: torch.Tensor, start: int, n: int, capacity: int) -> torch.Tensor:
    """The first ``n`` slots of ``t [b, kvh, L, hd]`` moved to slot ``start`` of a ``capacity``-slot buffer."""
    b, kvh, _, hd = t.shape
    out = t.new_zeros(b, kvh, capacity, hd)
    out[:, :, start : start + n] = t[:, :, :n]
    return out
