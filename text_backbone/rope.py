"""Rotary position embeddings with the Llama 3.1 frequency scaling.

Shapes: b batch, s tokens, hd head dim, h heads.

Pairs of channels are rotated in the "rotate half" layout (channel ``i`` with ``i + hd/2``), which is
the layout of Hugging Face checkpoints; Meta's interleaved layout is converted when its weights are
read (see ``mm.text_backbone.key_maps``).
"""

from __future__ import annotations

import math

import torch

from mm.text_backbone.config import RopeScaling

__all__ = ["apply_rope", "rope_frequencies", "rope_cos_sin"]


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """Inverse frequencies ``[hd / 2]`` in float32, scaled as Llama 3.1 does when ``scaling`` is set."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim)
    )
    if scaling is None:
        return inv_freq
    low_freq_wavelen = scaling.original_max_seq_len / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_seq_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`; short ones are kept.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    # In between, interpolate smoothly between the stretched and the original frequency.
    smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables ``[b, s, hd]`` for integer positions ``[b, s]``, computed in float32."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [b, s, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [b, s, hd]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [b, h, s, hd]`` by the angles in ``cos``/``sin [b, s, hd]``."""
    cos, sin = cos[:, None], sin[:, None]  # [b, 1, s, hd]
    return x * cos + _rotate_half(x) * sin
