"""Gated cross-attention blocks: how image and video tokens reach the frozen language model.

Llama 3 paper, section 7.2 ("Image adapter"); released as the cross-attention layers of
Llama 3.2 Vision. Shapes: b batch, s text tokens, m vision tokens (images x tiles x patches),
d model width, h query heads, kvh key/value heads, hd head dim.

A block is ``RMSNorm -> cross-attention (GQA, per-head q/k RMSNorm) -> tanh gate`` followed by
``RMSNorm -> SwiGLU MLP -> tanh gate``; both gates start at 0 so a fresh block is the identity.

Masking follows Meta's reference (llama-models): a text token attends to the vision tokens its
``mask`` allows, and a token that may see no vision token at all receives *exactly nothing* from
either branch. (Hugging Face's Mllama zeroes only the MLP branch for such tokens, so text before
its image still receives an attention output; see transformers#39379.) Cross-attention is never
causal: every allowed vision token is visible to a text token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mm.text_backbone.layers import RMSNorm, SwiGLU
from mm.text_backbone.linear import Linear, project

__all__ = ["CrossAttention", "GatedCrossAttentionBlock", "VisionKV"]

VisionKV = tuple[torch.Tensor, torch.Tensor]


class CrossAttention(nn.Module):
    """Grouped-query attention from text queries to vision keys/values, with q/k RMSNorm.

    Keys and values depend only on the vision tokens, so :meth:`project_kv` is separate: generation
    computes them once per request and reuses them for every decoded token.
    """

    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, head_dim: int, norm_eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_proj = Linear(dim, num_heads * head_dim, bias=False)
        self.k_proj = Linear(dim, num_kv_heads * head_dim, bias=False)
        self.v_proj = Linear(dim, num_kv_heads * head_dim, bias=False)
        self.o_proj = Linear(num_heads * head_dim, dim, bias=False)
        self.q_norm = RMSNorm(head_dim, norm_eps)
        self.k_norm = RMSNorm(head_dim, norm_eps)

    def project_kv(self, vision: torch.Tensor) -> VisionKV:
        """Keys and values ``[b, kvh, m, hd]`` of vision tokens ``[b, m, d]``."""
        b, m, _ = vision.shape
        k, v = (
            t.view(b, m, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [b, kvh, m, hd]
            for t in project(vision, self.k_proj, self.v_proj)
        )
        return self.k_norm(k), v

    def forward(
        self, x: torch.Tensor, kv: VisionKV, mask: torch.Tensor, spans: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Attend from ``x [b, s, d]`` to ``kv``; ``mask [b, 1, s, m]`` is boolean (True = may attend).

        With ``spans``, ``x`` is one packed row ``[1, s, d]`` of consecutive spans of those lengths,
        and span ``i`` attends to row ``i`` of ``kv``.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)  # [b, h, s, hd]
        q = self.q_norm(q)
        k, v = kv
        gqa = self.num_kv_heads != self.num_heads
        if spans is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # [b, h, s, hd]
        else:
            # split (not slicing): the backward of each piece is then one cat, not a full-size zero.
            parts = zip(q.split(spans, dim=2), k.split(1), v.split(1), mask.split(spans, dim=2), strict=True)
            out = torch.cat(
                [
                    F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ms, enable_gqa=gqa)
                    for qs, ks, vs, ms in parts
                ],
                dim=2,
            )  # [1, h, s, hd]
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class GatedCrossAttentionBlock(nn.Module):
    """One tanh-gated cross-attention + MLP block placed between two backbone layers.

    Args:
        dim: model width ``d`` (the backbone's).
        num_heads, num_kv_heads, head_dim: attention sizes (Llama 3.2 Vision uses the backbone's).
        intermediate_dim: SwiGLU hidden width.
        norm_eps: RMSNorm epsilon.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        intermediate_dim: int,
        norm_eps: float,
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads, num_kv_heads, head_dim, norm_eps)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, intermediate_dim)
        self.mlp_gate = nn.Parameter(torch.zeros(1))

    def project_kv(self, vision: torch.Tensor) -> VisionKV:
        return self.cross_attn.project_kv(vision)

    def forward(
        self, h: torch.Tensor, kv: VisionKV, mask: torch.Tensor, spans: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Update ``h [b, s, d]`` from vision ``kv`` under boolean ``mask [b, s, m]``.

        Text tokens whose mask row is all False get ``h`` back unchanged, bit for bit. With
        ``spans`` (a packed row, :meth:`CrossAttention.forward`) ``h`` is ``[1, s, d]`` and ``mask``
        ``[1, s, m]``.
        """
        visible = mask.any(dim=-1, keepdim=True)  # [b, s, 1]
        # A row that sees nothing attends everywhere (no empty softmax, no NaN) and is zeroed below.
        sdpa_mask = (mask | ~visible)[:, None]  # [b, 1, s, m]
        zero = torch.zeros((), dtype=h.dtype, device=h.device)
        attn = self.cross_attn(self.input_layernorm(h), kv, sdpa_mask, spans)
        h = h + self.attn_gate.tanh() * torch.where(visible, attn, zero)
        mlp = self.mlp(self.post_attention_layernorm(h))
        return h + self.mlp_gate.tanh() * torch.where(visible, mlp, zero)
