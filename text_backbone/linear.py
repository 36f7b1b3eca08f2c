"""The linear layer of the backbone and its adapters, with decoding's few-row case spread over threads.

Shapes: r rows (tokens), k input features, n output features, p parts.

A decoded token multiplies one row (or one per batched request) by every weight matrix, and on
the CPU that product is bound by the speed at which the matrix is read from memory. PyTorch's fp32
``F.linear`` of so few rows runs on one thread however many threads torch has, and reads about
15 GB/s on the 2-core machine of the note below, where a plain read streams at over 40 GB/s.
:func:`linear` splits the matrix's rows into ``p`` equal parts (twice torch's thread count) and
multiplies them as one batched product, which PyTorch spreads across its threads: up to
:data:`AS_COLUMNS` rows as ``W @ x^T`` (the faster form for one to four rows), more as
``x @ W^T``. Each output is the same dot product over the same ``k`` inputs, summed in another
order, so it equals ``F.linear``'s up to fp32 rounding (as ``F.linear``'s own results do across
row counts: MKL picks its kernel by shape).

Used only where it helps: fp32 on the CPU, at most :data:`FEW_ROWS` rows, a matrix of at least
:data:`MIN_WEIGHT` elements (smaller ones stay in cache, where the split's few microseconds of
overhead outweigh it), no bias, no gradient wanted. Everything else (training, prefill, GPUs, bf16,
the ``tiny`` presets) is ``F.linear``.

Measured (torch 2.14, MKL, 2 threads of an AMD EPYC): one product with each of 70 matrices shaped
like the ``mm bench --size small`` backbone's (10 layers of q, k, v, o and the MLP's three; 136 MB,
so every read comes from memory), milliseconds for the 70, ``F.linear`` -> this: 1 row 8.9 -> 3.5,
2 rows 11.3 -> 4.0, 4 rows 12.0 -> 4.6, 8 rows 9.8 -> 8.2, 16 rows 12.5 -> 10.8.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AS_COLUMNS", "FEW_ROWS", "MIN_WEIGHT", "Linear", "linear"]

FEW_ROWS = 16  # up to this many rows the split product is faster (decoding up to 16 requests)
AS_COLUMNS = 4  # up to this many rows, W @ x^T
MIN_WEIGHT = 1 << 16  # elements (256 KB in fp32)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; ``x [..., k]``, ``weight [n, k]`` -> ``[..., n]``."""
    parts = 2 * torch.get_num_threads()
    n, k = weight.shape
    if (
        bias is None
        and parts > 2
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.is_contiguous()
        and n % parts == 0
        and n * k >= MIN_WEIGHT
        and x.numel() <= FEW_ROWS * k
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        split = weight.view(parts, n // parts, k)  # [p, n/p, k]
        rows = x.reshape(-1, k)  # [r, k]
        if rows.shape[0] <= AS_COLUMNS:
            out = torch.bmm(split, rows.t().expand(parts, k, -1))  # [p, n/p, r]
            return out.view(n, -1).t().reshape(*x.shape[:-1], n)
        out = torch.bmm(rows.expand(parts, -1, k), split.transpose(1, 2))  # [p, r, n/p]
        return out.transpose(0, 1).reshape(*x.shape[:-1], n)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
