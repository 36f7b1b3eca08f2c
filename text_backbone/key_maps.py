"""Explicit tables between mm's backbone parameter names and checkpoint names.

mm's names are Hugging Face's without the ``model.`` prefix, so that map is a prefix rule. Meta's
original layout (llama-models ``consolidated.*.pth``) has its own names, splits tensors across
model-parallel shards, and stores the query/key projections with RoPE channel pairs interleaved;
all three are handled here and tested in both directions.
"""

from __future__ import annotations

import re

import torch

__all__ = [
    "META_SHARD_DIM",
    "hf_to_mm",
    "meta_shard_dim",
    "meta_to_mm",
    "mm_to_hf",
    "mm_to_meta",
    "permute_from_meta",
    "permute_to_meta",
]

# ------------------------------------------------------------------ Hugging Face
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def hf_to_mm(name: str) -> str | None:
    """mm name for a Hugging Face Llama tensor name; ``None`` for tensors that carry no weights."""
    if _HF_IGNORED.match(name):
        return None
    if name == "lm_head.weight":
        return name
    if name.startswith("model."):
        return name[len("model.") :]
    raise KeyError(name)


def mm_to_hf(name: str) -> str:
    return name if name == "lm_head.weight" else "model." + name


# ------------------------------------------------------------------ Meta (llama-models)
_META_LAYER = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_META_TOP = {
    "tok_embeddings.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_MM_LAYER = {v: k for k, v in _META_LAYER.items()}
_MM_TOP = {v: k for k, v in _META_TOP.items()}
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")

# Dimension along which Meta's model-parallel shards split each tensor (None: replicated): fairscale's
# ColumnParallelLinear splits the output rows (0), RowParallelLinear the input columns (1), and
# Llama 3's VocabParallelEmbedding the vocabulary rows (0; Llama 2's ParallelEmbedding split the
# width instead).
META_SHARD_DIM = {
    "attention.wq.weight": 0,
    "attention.wk.weight": 0,
    "attention.wv.weight": 0,
    "attention.wo.weight": 1,
    "feed_forward.w1.weight": 0,
    "feed_forward.w3.weight": 0,
    "feed_forward.w2.weight": 1,
    "attention_norm.weight": None,
    "ffn_norm.weight": None,
    "tok_embeddings.weight": 0,
    "output.weight": 0,
    "norm.weight": None,
}


def meta_to_mm(name: str) -> str:
    if name in _META_TOP:
        return _META_TOP[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _META_LAYER:
        return f"layers.{m.group(1)}.{_META_LAYER[m.group(2)]}"
    raise KeyError(name)


def mm_to_meta(name: str) -> str:
    if name in _MM_TOP:
        return _MM_TOP[name]
    m = _LAYER.match(name)
    if m and m.group(2) in _MM_LAYER:
        return f"layers.{m.group(1)}.{_MM_LAYER[m.group(2)]}"
    raise KeyError(name)


def meta_shard_dim(name: str) -> int | None:
    m = _LAYER.match(name)
    return META_SHARD_DIM[m.group(2) if m else name]


def permute_from_meta(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Meta's interleaved RoPE pairs ``(0,1),(2,3),…`` to the rotate-half layout ``(0,hd/2),…``."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // num_heads
    return w.view(num_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_to_meta(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`permute_from_meta`."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // num_heads
    return w.view(num_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)
