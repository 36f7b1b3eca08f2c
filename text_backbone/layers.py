"""Building blocks of the Llama 3 decoder: RMSNorm, SwiGLU MLP, grouped-query self-attention.

Shapes: b batch, s new tokens, k keys (past + new), d model width, h query heads, kvh key/value
heads, hd head dim.

Module and parameter names (``self_attn.q_proj``, ``mlp.gate_proj``, ``input_layernorm``, …) are
those of Hugging Face Llama checkpoints, so a backbone's state-dict keys stay those of the file it
was read from (``model.`` prefix aside).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mm.text_backbone.kv_cache import KVCache
from mm.text_backbone.linear import Linear, project
from mm.text_backbone.rope import apply_rope

__all__ = ["AttentionContext", "DecoderLayer", "RMSNorm", "SelfAttention", "SwiGLU"]


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and cast back (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.gate_proj = Linear(dim, hidden_dim, bias=False)
        self.up_proj = Linear(dim, hidden_dim, bias=False)
        self.down_proj = Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return self.down_proj(F.silu(gate) * up)


@dataclass
class AttentionContext:
    """What every self-attention layer of one forward pass shares.

    Attributes:
        cos, sin: rotary tables ``[b, s, hd]``.
        mask: boolean ``[b, 1, s, k]`` (True = may attend), or ``None`` when ``is_causal`` or
            "attend to everything" expresses it, so SDPA can pick its fast kernels.
        is_causal: pass ``is_causal=True`` to SDPA (no past keys, no padding).
        cache: the KV cache, or ``None`` for a plain forward.
        start: first cache slot of the new tokens.
        segments: packed rows: per row, the ``(start, end)`` token spans of its samples; each span
            attends causally to itself only (``mask`` is then ``None``), at the cost of its own
            length squared rather than the row's.
    """

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None
    is_causal: bool
    cache: KVCache | None = None
    start: int = 0
    segments: tuple[tuple[tuple[int, int], ...], ...] | None = None


class SelfAttention(nn.Module):
    """Causal grouped-query self-attention with RoPE, through ``scaled_dot_product_attention``."""

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.layer_idx = layer_idx
        self.q_proj = Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = Linear(num_heads * head_dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [b, s, d]`` -> ``[b, s, d]``; with ``last_only`` the keys and values of every position
        (all of them go to the cache) but the query and output of the last one only: ``[b, 1, d]``.
        With ``rows`` (ascending positions of a single row, ``b = 1``), likewise the queries and
        outputs of those positions only: ``[1, len(rows), d]``."""
        b, s, _ = x.shape
        if last_only and ctx.segments is not None:
            raise ValueError("last_only needs one sequence per row, not packed rows")
        if rows is not None and b != 1:
            raise ValueError(f"rows needs a single row, got a batch of {b}")
        kept = _kept(last_only, rows)
        xq, cos, sin = (
            (x, ctx.cos, ctx.sin) if kept is None else (x[:, kept], ctx.cos[:, kept], ctx.sin[:, kept])
        )
        sq = xq.shape[1]
        if kept is None:
            q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        else:
            q, (k, v) = self.q_proj(xq), project(x, self.k_proj, self.v_proj)
        q = q.view(b, sq, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, sq, hd]
        k = k.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kvh, s, hd]
        v = v.view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kvh, s, hd]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            k, v = ctx.cache.write(self.layer_idx, ctx.start, k, v)  # [b, kvh, k, hd]
        gqa = self.num_kv_heads != self.num_heads
        if ctx.segments is not None:
            out = _segmented_attention(q, k, v, ctx.segments, gqa, rows)
        else:
            mask, causal = ctx.mask, ctx.is_causal
            if kept is not None:  # the kept queries' rows of the mask; the last one sees every key
                if mask is not None:
                    mask = mask[:, :, kept]
                elif causal and rows is not None:
                    mask = _causal_rows(rows, 0, k.shape[2])
                causal = False
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa
            )  # [b, h, sq, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, sq, self.num_heads * self.head_dim))


def _kept(last_only: bool, rows: torch.Tensor | None) -> slice | torch.Tensor | None:
    """The positions whose queries and outputs a layer computes (``None``: all of them)."""
    return slice(-1, None) if last_only else rows


def _causal_rows(rows: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """Boolean ``[1, 1, len(rows), end - start]``: the query at position ``rows[i]`` may attend to
    key positions ``start .. rows[i]``."""
    keys = torch.arange(start, end, device=rows.device)
    return (keys[None, :] <= rows[:, None])[None, None]


def _segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segments: tuple[tuple[tuple[int, int], ...], ...],
    gqa: bool,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention within each ``(start, end)`` span of each row: ``[b, h, s, hd]`` out, or
    with ``rows`` (one row) the queries of those positions only, ``[1, h, len(rows), hd]``."""
    if rows is not None:
        return _segmented_rows(q, k, v, segments[0], gqa, rows)
    # split (not slicing): its backward is one cat, where each slice's would fill a full-size zero
    # gradient.
    out = []
    for spans, qr, kr, vr in zip(segments, q.split(1), k.split(1), v.split(1)):
        sizes = [b - a for a, b in spans]
        parts = [
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=qs.shape[2] > 1, enable_gqa=gqa)
            for qs, ks, vs in zip(qr.split(sizes, dim=2), kr.split(sizes, dim=2), vr.split(sizes, dim=2))
        ]  # [1, h, span, hd] each
        out.append(torch.cat(parts, dim=2))
    return torch.cat(out, dim=0)


def _segmented_rows(
    q, k, v, spans: tuple[tuple[int, int], ...], gqa: bool, rows: torch.Tensor
) -> torch.Tensor:
    """The kept queries ``q [1, h, len(rows), hd]`` of one packed row, each attending causally
    within its own span of ``k``/``v [1, kvh, s, hd]``."""
    positions = rows.tolist()
    counts = [bisect.bisect_left(positions, b) - bisect.bisect_left(positions, a) for a, b in spans]
    keys = [b - a for a, b in spans]
    parts = []
    for (a, b), qs, ks, vs, rs in zip(
        spans, q.split(counts, dim=2), k.split(keys, dim=2), v.split(keys, dim=2), rows.split(counts)
    ):
        if qs.shape[2] == 0:
            continue
        if qs.shape[2] == b - a:  # every position of the span: the plain causal pass
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=b - a > 1, enable_gqa=gqa))
        else:
            mask = _causal_rows(rs, a, b)
            parts.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(parts, dim=2)


class DecoderLayer(nn.Module):
    """Pre-norm Llama block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_dim: int,
        norm_eps: float,
        layer_idx: int,
    ) -> None:
        super().__init__()
        self.self_attn = SelfAttention(dim, num_heads, num_kv_heads, head_dim, layer_idx)
        self.mlp = SwiGLU(dim, intermediate_dim)
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        ctx: AttentionContext,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [b, s, d]`` -> ``[b, s, d]``, or with ``last_only`` the last position's ``[b, 1, d]``
        (every position's keys and values still reach the cache): a prefill's last layer, whose
        other positions' outputs nothing reads. With ``rows`` (ascending positions of a single row),
        those positions' ``[1, len(rows), d]``: a training step's last layer, whose outputs the loss
        reads at the labelled positions only."""
        kept = _kept(last_only, rows)
        x = (x if kept is None else x[:, kept]) + self.self_attn(
            self.input_layernorm(x), ctx, last_only, rows
        )
        return x + self.mlp(self.post_attention_layernorm(x))
