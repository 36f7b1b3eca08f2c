"""The Llama 3 speech encoder: frame stacking, then a stack of rotary Conformer layers (§8.1.2).

Shapes: b batch, f input feature frames (10 ms), f' encoder frames (40 ms), c feature channels
(80 mel bins), d encoder width, h heads, hd head dim.

Paper size: 80-dimensional log-mel input, stride-4 stacking and a linear projection (40 ms frames),
24 Conformer layers of width 1536, macaron feed-forward modules of width 4096, a depthwise
convolution of kernel 7, 24 rotary attention heads: about 1B parameters.

A Conformer layer (Gulati et al., 2020) is ``x + ½·FFN(x)`` → ``x + MHSA(x)`` → ``x + Conv(x)`` →
``x + ½·FFN(x)`` → LayerNorm, every sub-module pre-normed. Choices the paper leaves open:

* **Frame stacking** keeps ``f' = f // 4`` frames: a trailing partial group of fewer than 4 frames
  is dropped, so encoder frame ``j`` sees exactly input frames ``4j … 4j+3``.
* **Normalisation in the convolution module** is a per-frame LayerNorm over channels
  (``conv_norm="layer"``), not BatchNorm: it does not depend on the other utterances of a batch or
  on padding, so a padded batch gives the same outputs as one utterance at a time.
  ``conv_norm="group"`` is GroupNorm with one group (torchaudio's ``use_group_norm``), with its
  statistics taken over each utterance's real frames only.
* **Padding** never leaks: attention ignores padded keys, padded frames are zeroed before the
  depthwise convolution (so the convolution sees the same zeros as at the end of a lone
  utterance), and the encoder's outputs at padded frames are zero.
* ``rotary=False`` drops the rotary embedding, which makes a layer the same function as a
  ``torchaudio.models.conformer.ConformerLayer`` (checked by a parity test).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mm._values import ConfigValueError, as_bool, as_choice, as_float, as_int, check_values
from mm.text_backbone.linear import Linear
from mm.text_backbone.rope import apply_rope, rope_cos_sin, rope_frequencies

__all__ = [
    "ConformerConfig",
    "ConformerEncoder",
    "ConformerLayer",
    "RotarySelfAttention",
    "lengths_to_mask",
    "stack_frames",
]


@dataclass(frozen=True, kw_only=True)
class ConformerConfig:
    """Sizes of the speech encoder; the defaults are the Llama 3 paper's (§8.1.2, ≈1B parameters).

    Args:
        input_dim: feature channels per input frame (mel bins).
        stack: consecutive input frames stacked into one encoder frame (4 × 10 ms = 40 ms).
        width: encoder width ``d``.
        num_layers: Conformer layers.
        num_heads: attention heads; ``width`` must divide by it, into an even head dim.
        ffn_dim: hidden width of each macaron feed-forward module.
        conv_kernel: depthwise convolution kernel (odd).
        dropout: dropout probability (feed-forward, attention, convolution module).
        norm_eps: epsilon of every LayerNorm / GroupNorm.
        rotary: rotary position embedding on queries and keys.
        rope_theta: rotary base.
        conv_norm: ``"layer"`` (per-frame LayerNorm) or ``"group"`` (one-group GroupNorm over each
            utterance's real frames) after the depthwise convolution.
    """

    input_dim: int = 80
    stack: int = 4
    width: int = 1536
    num_layers: int = 24
    num_heads: int = 24
    ffn_dim: int = 4096
    conv_kernel: int = 7
    dropout: float = 0.0
    norm_eps: float = 1e-5
    rotary: bool = True
    rope_theta: float = 10000.0
    conv_norm: Literal["layer", "group"] = "layer"

    def __post_init__(self) -> None:
        """Types and ranges of every field (:mod:`mm._values`), then the checks that combine them.

        Sizes are positive ints, ``conv_kernel`` odd, ``dropout`` in ``[0, 1)``, ``norm_eps`` and
        ``rope_theta`` positive numbers, ``rotary`` a bool.
        """
        positive = as_int(minimum=1)
        check_values(
            self,
            {
                "input_dim": positive,
                "stack": positive,
                "width": positive,
                "num_layers": positive,
                "num_heads": positive,
                "ffn_dim": positive,
                "conv_kernel": positive,
                "dropout": as_float(minimum=0.0, below=1.0),
                "norm_eps": as_float(positive=True),
                "rotary": as_bool(),
                "rope_theta": as_float(positive=True),
                "conv_norm": as_choice(("layer", "group")),
            },
        )
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ConfigValueError(f"width {self.width} must split into {self.num_heads} heads of even size")
        if self.conv_kernel % 2 == 0:
            raise ConfigValueError(f"must be odd, got {self.conv_kernel}", key="conv_kernel")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


def lengths_to_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean ``[b, max_len]``: True at each row's first ``lengths[i]`` positions (the real frames)."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def stack_frames(
    features: torch.Tensor, lengths: torch.Tensor, stack: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate ``stack`` consecutive frames: ``[b, f, c] -> [b, f // stack, stack * c]``.

    A trailing group of fewer than ``stack`` frames is dropped, and a group is real only when all
    its frames are, so the new lengths are ``lengths // stack``.
    """
    b, f, c = features.shape
    keep = (f // stack) * stack
    stacked = rearrange(features[:, :keep], "b (g k) c -> b g (k c)", k=stack)  # [b, f', stack * c]
    return stacked, torch.div(lengths, stack, rounding_mode="floor")


class RotarySelfAttention(nn.Module):
    """Bidirectional multi-head self-attention with optional rotary embedding and a key padding mask.

    Args:
        dim: input and output width.
        num_heads: heads; ``dim // num_heads`` is the head dim.
        bias: biases on the four projections.
        dropout: attention-weight dropout in training.
    """

    def __init__(self, dim: int, num_heads: int, *, bias: bool, dropout: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.q_proj = Linear(dim, dim, bias=bias)
        self.k_proj = Linear(dim, dim, bias=bias)
        self.v_proj = Linear(dim, dim, bias=bias)
        self.o_proj = Linear(dim, dim, bias=bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x [b, f, d]``; ``rope`` the ``cos, sin`` tables ``[1, f, hd]`` or ``None``; ``key_mask``
        boolean ``[b, 1, 1, f]`` (True = real frame) or ``None`` when nothing is padded."""
        q, k, v = (
            rearrange(proj(x), "b f (h hd) -> b h f hd", h=self.num_heads)  # [b, h, f, hd]
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=key_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [b, h, f, hd]
        return self.o_proj(rearrange(out, "b h f hd -> b f (h hd)"))


class _FeedForward(nn.Module):
    """Pre-normed ``Linear → SiLU → Linear`` (the Conformer's "Swish" feed-forward module)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.fc1 = Linear(dim, hidden_dim)
        self.fc2 = Linear(hidden_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.silu(self.fc1(self.norm(x))))))


class _ConvModule(nn.Module):
    """Pre-normed pointwise conv + GLU → depthwise conv → norm → SiLU → pointwise conv.

    Pointwise (kernel 1) convolutions are written as ``nn.Linear`` on ``[b, f, d]``.
    """

    def __init__(self, dim: int, kernel: int, dropout: float, eps: float, norm: str) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.pointwise_in = Linear(dim, 2 * dim)
        self.depthwise = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=dim)
        self.conv_norm_kind = norm
        self.depthwise_norm = nn.LayerNorm(dim, eps=eps) if norm == "layer" else nn.GroupNorm(1, dim, eps=eps)
        self.pointwise_out = Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        """``x [b, f, d]``; ``frame_mask [b, f]`` (True = real frame) or ``None``."""
        x = F.glu(self.pointwise_in(self.norm(x)), dim=-1)
        if frame_mask is not None:
            x = x * frame_mask[..., None]  # padding must reach the depthwise conv as zeros
        x = self.depthwise(x.transpose(1, 2)).transpose(1, 2)  # [b, f, d]
        x = self._normalize(x, frame_mask)
        return self.dropout(self.pointwise_out(F.silu(x)))

    def _normalize(self, x: torch.Tensor, frame_mask: torch.Tensor | None) -> torch.Tensor:
        if self.conv_norm_kind == "layer":
            return self.depthwise_norm(x)
        norm: nn.GroupNorm = self.depthwise_norm
        if frame_mask is None:
            return norm(x.transpose(1, 2)).transpose(1, 2)
        # One-group GroupNorm over each utterance's real frames only (the padding is excluded).
        weight = frame_mask[..., None].to(x.dtype)  # [b, f, 1]
        count = weight.sum(dim=(1, 2), keepdim=True) * x.shape[-1]
        mean = (x * weight).sum(dim=(1, 2), keepdim=True) / count
        var = ((x - mean).pow(2) * weight).sum(dim=(1, 2), keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + norm.eps) * norm.weight + norm.bias


class ConformerLayer(nn.Module):
    """One macaron Conformer layer: ½FFN → rotary MHSA → convolution module → ½FFN → LayerNorm."""

    def __init__(
        self,
        *,
        dim: int,
        num_heads: int,
        ffn_dim: int,
        conv_kernel: int,
        dropout: float,
        norm_eps: float,
        conv_norm: str,
    ) -> None:
        super().__init__()
        self.ffn1 = _FeedForward(dim, ffn_dim, dropout, norm_eps)
        self.attn_norm = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = RotarySelfAttention(dim, num_heads, bias=True, dropout=dropout)
        self.attn_dropout = nn.Dropout(dropout)
        self.conv = _ConvModule(dim, conv_kernel, dropout, norm_eps, conv_norm)
        self.ffn2 = _FeedForward(dim, ffn_dim, dropout, norm_eps)
        self.final_norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        frame_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """``x [b, f', d]``; ``frame_mask [b, f']`` (True = real frame) or ``None`` (no padding)."""
        key_mask = None if frame_mask is None else frame_mask[:, None, None, :]  # [b, 1, 1, f']
        x = x + 0.5 * self.ffn1(x)
        x = x + self.attn_dropout(self.attn(self.attn_norm(x), rope, key_mask))
        x = x + self.conv(x, frame_mask)
        x = x + 0.5 * self.ffn2(x)
        return self.final_norm(x)


class ConformerEncoder(nn.Module):
    """Speech encoder of Llama 3 (§8.1.2): stack 4 frames, project, Conformer layers.

    Args:
        config: sizes (see :class:`ConformerConfig`).
    """

    def __init__(self, config: ConformerConfig) -> None:
        super().__init__()
        self.config = config
        self.input_proj = Linear(config.stack * config.input_dim, config.width)
        self.layers = nn.ModuleList(
            ConformerLayer(
                dim=config.width,
                num_heads=config.num_heads,
                ffn_dim=config.ffn_dim,
                conv_kernel=config.conv_kernel,
                dropout=config.dropout,
                norm_eps=config.norm_eps,
                conv_norm=config.conv_norm,
            )
            for _ in range(config.num_layers)
        )
        # Not a buffer: `.to(bfloat16)` must never round the frequencies (they stay float32).
        self._inv_freq = rope_frequencies(config.head_dim, config.rope_theta, None) if config.rotary else None

    def embed(
        self, features: torch.Tensor, lengths: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack and project: ``features [b, f, c] -> ([b, f', d], lengths' [b])``, validated."""
        cfg = self.config
        if features.ndim != 3 or features.shape[-1] != cfg.input_dim:
            raise ValueError(
                f"ConformerEncoder: features must be [b, f, {cfg.input_dim}], got {tuple(features.shape)}"
            )
        b, f, _ = features.shape
        if lengths is None:
            lengths = torch.full((b,), f, dtype=torch.long, device=features.device)
        if lengths.shape != (b,):
            raise ValueError(f"ConformerEncoder: lengths must be [{b}], got {tuple(lengths.shape)}")
        if int(lengths.max()) > f:
            raise ValueError(
                f"ConformerEncoder: a length ({int(lengths.max())}) exceeds the {f} frames given"
            )
        if int(lengths.min()) < cfg.stack:
            raise ValueError(
                f"ConformerEncoder: every utterance needs at least {cfg.stack} frames "
                f"({cfg.stack * 10} ms of features), got a length of {int(lengths.min())}"
            )
        stacked, out_lengths = stack_frames(features, lengths.to(features.device), cfg.stack)
        return self.input_proj(stacked), out_lengths

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode log-mel features.

        Args:
            features: ``[b, f, c]``, zero-padded past each utterance's length.
            lengths: ``[b]`` real frames per utterance (each at least ``stack``); ``None`` = all ``f``.

        Returns:
            ``hidden [b, f', d]`` with ``f' = f // stack`` (zero at padded frames) and
            ``out_lengths [b] = lengths // stack``.
        """
        x, out_lengths = self.embed(features, lengths)
        b, fp, _ = x.shape
        frame_mask = None if bool((out_lengths == fp).all()) else lengths_to_mask(out_lengths, fp)
        rope = None
        if self._inv_freq is not None:
            positions = torch.arange(fp, device=x.device)[None]  # [1, f']
            rope = rope_cos_sin(self._inv_freq, positions, x.dtype)  # [1, f', hd] each
        for layer in self.layers:
            x = layer(x, rope, frame_mask)
        if frame_mask is not None:
            x = x * frame_mask[..., None]
        return x, out_lengths
