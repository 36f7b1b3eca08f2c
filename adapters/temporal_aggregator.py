"""Temporal aggregator of the video adapter: a perceiver resampler over consecutive frames.

Llama 3 (section 7.2, "Video adapter") encodes every sampled frame with the image encoder and then
merges each run of consecutive frames into one with a perceiver resampler (Jaegle et al., 2021;
Alayrac et al., 2022): 32 frames into 1 in the paper's description, 16 frames into 1 during video
pre-training and 64 frames into 2 during SFT. The merged frames are what the video cross-attention
blocks attend to.

This module merges *along time only*: every spatial token position (tile ``t``, patch ``p``) is
resampled separately, so the output of a group has exactly the layout of one frame and the cost
is linear in the number of tokens. For each group of ``g`` frames and each position, a learned
latent query attends over the ``g`` frames at that position, as in Flamingo's resampler where the
keys and values are the frames (plus a learned embedding of their place in the group) together
with the latent itself; a SwiGLU feed-forward follows, ``num_layers`` times, then a final RMSNorm.

Order, which the paper leaves unsaid, is kept at both scales. Inside a group, the temporal
embedding (started as a unit-RMS sinusoid) is added *after* each layer's frame RMSNorm, so the
norm cannot shrink it next to the frame features. Across groups (64 frames merged into 2 in SFT),
merged frame ``i`` gets a fixed, parameter-free sinusoidal embedding of ``i`` (:func:`order_embedding`):
cross-attention over the concatenated merged frames is otherwise blind to which came first. With
both, 16 frames merged in groups of 4 and a video block before each image block, the demo's
held-out video QA went from 0.24 to 0.61 (chance 0.25; ``mm demo --quick``).

No zero-initialisation is needed here: the video cross-attention blocks that consume the output
start with their tanh gates at zero, so a fresh aggregator changes nothing downstream.

Shapes: b batch, f frames, t tiles, p patches, d model width, g frames per group, h heads,
hd head dim, n rows (``b * (f // g) * t * p`` folded together), l latents (1 per group).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mm.text_backbone.layers import RMSNorm, SwiGLU
from mm.text_backbone.linear import Linear

__all__ = ["PerceiverLayer", "TemporalAggregator", "default_aggregator_ffn_dim", "order_embedding"]

# CUDA's fused attention kernels launch one grid row per batch entry and allow at most 2**16 - 1
# of them (pytorch/pytorch#146704); folded (group, tile, patch) rows are split to stay below it.
_MAX_SDPA_ROWS = 2**15


def default_aggregator_ffn_dim(dim: int) -> int:
    """Feed-forward width used when none is given: ``4 * dim / 3`` rounded up to a multiple of 256.

    With one layer this puts the aggregator plus the video cross-attention blocks near the sizes
    Llama 3 reports for its video adapters (0.6B at 8B, 4.6B at 70B; section 7.2).
    """
    return 256 * -(-4 * dim // (3 * 256))


def order_embedding(n: int, dim: int, *, base: float = 100.0) -> torch.Tensor:
    """Sinusoidal embeddings ``[n, dim]`` of the places ``0 .. n-1``, each scaled to unit RMS."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    freq = torch.exp(-torch.log(torch.tensor(base)) * torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    emb = torch.zeros(n, dim)
    emb[:, 0::2] = torch.sin(pos * freq)
    emb[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return emb / emb.pow(2).mean(-1, keepdim=True).sqrt()


class PerceiverLayer(nn.Module):
    """One resampler layer: latents attend over ``concat(frames, latents)``, then a feed-forward."""

    def __init__(self, *, dim: int, num_heads: int, ffn_dim: int, norm_eps: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.frame_norm = RMSNorm(dim, norm_eps)
        self.latent_norm = RMSNorm(dim, norm_eps)
        self.q_proj = Linear(dim, dim, bias=False)
        self.k_proj = Linear(dim, dim, bias=False)
        self.v_proj = Linear(dim, dim, bias=False)
        self.o_proj = Linear(dim, dim, bias=False)
        self.mlp_norm = RMSNorm(dim, norm_eps)
        self.mlp = SwiGLU(dim, ffn_dim)

    def forward(
        self, latents: torch.Tensor, frames: torch.Tensor, time: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Update ``latents [n, l, d]`` from ``frames [n, g, d]``; returns ``[n, l, d]``.

        ``time [g, d]``, when given, is added to the normalised frames: each frame's place in its
        group, at a scale the frame norm cannot shrink.
        """
        query = self.latent_norm(latents)
        frames = self.frame_norm(frames)
        if time is not None:
            frames = frames + time
        context = torch.cat([frames, query], dim=1)  # [n, g + l, d]
        q = rearrange(self.q_proj(query), "n l (h hd) -> n h l hd", h=self.num_heads)
        k = rearrange(self.k_proj(context), "n k (h hd) -> n h k hd", h=self.num_heads)
        v = rearrange(self.v_proj(context), "n k (h hd) -> n h k hd", h=self.num_heads)
        out = torch.cat(
            [
                F.scaled_dot_product_attention(q_rows, k_rows, v_rows)
                for q_rows, k_rows, v_rows in zip(
                    q.split(_MAX_SDPA_ROWS), k.split(_MAX_SDPA_ROWS), v.split(_MAX_SDPA_ROWS)
                )
            ]
        )  # [n, h, l, hd]
        latents = latents + self.o_proj(rearrange(out, "n h l hd -> n l (h hd)"))
        return latents + self.mlp(self.mlp_norm(latents))


class TemporalAggregator(nn.Module):
    """Perceiver resampler that merges each group of consecutive frames into one (Llama 3, 7.2).

    Args:
        dim: model width ``d`` of the per-frame visual tokens (after the image projector).
        num_heads: attention heads; ``dim`` must be divisible by it.
        group_size: frames merged into one by default, and the most a group may hold (the length
            of the learned temporal embedding table). 32 in the paper.
        num_layers: resampler layers.
        ffn_dim: hidden width of each layer's SwiGLU feed-forward; ``None`` uses
            ``default_aggregator_ffn_dim(dim)``.
        norm_eps: epsilon of the RMSNorms.
    """

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        group_size: int = 32,
        num_layers: int = 1,
        ffn_dim: int | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if group_size < 1 or num_layers < 1:
            raise ValueError(f"group_size and num_layers must be positive, got {group_size}, {num_layers}")
        self.dim = dim
        self.group_size = group_size
        self.latents = nn.Parameter(torch.randn(1, dim) * 0.02)  # [l, d], one output per group
        self.time_embed = nn.Parameter(order_embedding(group_size, dim))  # [g, d], learned from here
        ffn_dim = default_aggregator_ffn_dim(dim) if ffn_dim is None else ffn_dim
        self.layers = nn.ModuleList(
            PerceiverLayer(dim=dim, num_heads=num_heads, ffn_dim=ffn_dim, norm_eps=norm_eps)
            for _ in range(num_layers)
        )
        self.norm = RMSNorm(dim, norm_eps)

    def forward(self, frames: torch.Tensor, *, group_size: int | None = None) -> torch.Tensor:
        """Merge every ``group_size`` consecutive frames into one.

        Args:
            frames: per-frame visual tokens ``[b, f, t, p, d]``, frames in time order.
            group_size: frames per group, at most the constructor's ``group_size`` (which is the
                default); a group of ``g`` frames uses the first ``g`` temporal embeddings. For
                example 16 frames with ``group_size=16`` give 1 frame, 64 frames with 32 give 2.

        Returns:
            Merged tokens ``[b, f // group_size, t, p, d]``.
        """
        group = self.group_size if group_size is None else group_size
        if frames.dim() != 5 or frames.shape[-1] != self.dim:
            raise ValueError(f"expected frames [b, f, t, p, {self.dim}], got {tuple(frames.shape)}")
        if not 1 <= group <= self.group_size:
            raise ValueError(f"group_size must be in 1..{self.group_size}, got {group}")
        b, f, t, p, _ = frames.shape
        if f % group:
            raise ValueError(f"{f} frames cannot be split into groups of {group} consecutive frames")
        x = rearrange(frames, "b (n g) t p d -> (b n t p) g d", g=group)  # [b·(f/g)·t·p, g, d]
        time = self.time_embed[:group].to(x.dtype)  # [g, d]
        latents = self.latents.to(x.dtype).expand(x.shape[0], -1, -1)  # [n, l, d]
        for layer in self.layers:
            latents = layer(latents, x, time)
        out = self.norm(latents)  # [n, 1, d]
        out = rearrange(out, "(b n t p) 1 d -> b n t p d", b=b, t=t, p=p)  # [b, f/g, t, p, d]
        order = order_embedding(f // group, self.dim).to(out)  # [f/g, d]
        return out + order[None, :, None, None]
