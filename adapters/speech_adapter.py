"""Speech adapter: Conformer output → embeddings that replace the ``<|audio|>`` span (Llama 3 §8.1.2).

Shapes: b batch, s text tokens, f' encoder frames (40 ms), f'' adapter frames (80 ms), d_enc encoder
width, w adapter width, d model (backbone) width, h heads, hd head dim.

Paper size (≈100M parameters with an 8B backbone): a convolution of kernel 3 and stride 2 (40 ms →
80 ms frames), one rotary Transformer layer of width 3072 with a feed-forward network of width
4096, and a linear layer to the backbone's width. Choices the paper leaves open:

* The Transformer layer is pre-norm, Llama style: RMSNorm, bias-free rotary self-attention
  (24 heads of 128), SwiGLU feed-forward; an RMSNorm closes the layer before the output linear
  (the usual end of a pre-norm stack). With SwiGLU the paper size comes to ≈102M parameters.
* The convolution pads by ``kernel // 2`` on both sides, so ``f'' = (f' + 2·(k // 2) − k) // stride
  + 1`` (``ceil(f' / 2)`` at paper size); padded frames are zeroed before it and attention ignores
  them, so a padded batch gives the same outputs as one utterance at a time.

The adapter's outputs are spliced into the token embeddings in place of a run of ``<|audio|>``
placeholder tokens (:func:`splice_audio`); :func:`num_audio_tokens` says how many placeholders
to emit for a waveform of a given length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mm._values import ConfigValueError, as_float, as_int, check_values
from mm.encoders.conformer import ConformerConfig, RotarySelfAttention, lengths_to_mask
from mm.text_backbone.layers import RMSNorm, SwiGLU
from mm.text_backbone.linear import Linear
from mm.text_backbone.rope import rope_cos_sin, rope_frequencies

if TYPE_CHECKING:  # decoding audio (torchaudio) is not needed to build or run the adapter
    from mm.datasets.audio import AudioConfig

__all__ = ["SpeechAdapter", "SpeechAdapterConfig", "num_audio_tokens", "splice_audio"]


@dataclass(frozen=True, kw_only=True)
class SpeechAdapterConfig:
    """Sizes of the speech adapter; the defaults are the Llama 3 paper's (§8.1.2) for an 8B backbone.

    Args:
        input_dim: encoder width ``d_enc``.
        width: adapter width ``w``.
        num_heads: attention heads of the Transformer layer.
        ffn_dim: hidden width of its SwiGLU feed-forward network.
        output_dim: backbone width ``d``.
        conv_kernel: convolution kernel.
        conv_stride: convolution stride (frame-rate reduction).
        norm_eps: RMSNorm epsilon.
        rope_theta: rotary base.
    """

    input_dim: int = 1536
    width: int = 3072
    num_heads: int = 24
    ffn_dim: int = 4096
    output_dim: int = 4096
    conv_kernel: int = 3
    conv_stride: int = 2
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        """Types and ranges of every field (:mod:`mm._values`): sizes are positive ints, ``norm_eps``
        and ``rope_theta`` positive numbers; ``width`` splits into heads of even size."""
        positive = as_int(minimum=1)
        check_values(
            self,
            {
                "input_dim": positive,
                "width": positive,
                "num_heads": positive,
                "ffn_dim": positive,
                "output_dim": positive,
                "conv_kernel": positive,
                "conv_stride": positive,
                "norm_eps": as_float(positive=True),
                "rope_theta": as_float(positive=True),
            },
        )
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ConfigValueError(f"width {self.width} must split into {self.num_heads} heads of even size")

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def output_length(self, num_frames: int | torch.Tensor) -> int | torch.Tensor:
        """Adapter frames for ``num_frames`` encoder frames (an int or a tensor of lengths)."""
        padded = num_frames + 2 * (self.conv_kernel // 2) - self.conv_kernel
        if isinstance(padded, torch.Tensor):
            return torch.div(padded, self.conv_stride, rounding_mode="floor") + 1
        return padded // self.conv_stride + 1


class _AdapterLayer(nn.Module):
    """Pre-norm rotary Transformer layer: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, eps: float) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.attn = RotarySelfAttention(dim, num_heads, bias=False)
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, ffn_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], key_mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, key_mask)
        return x + self.mlp(self.mlp_norm(x))


class SpeechAdapter(nn.Module):
    """Conv (k3, s2) → one rotary Transformer layer → norm → linear to the backbone width (§8.1.2).

    Args:
        config: sizes (see :class:`SpeechAdapterConfig`).
    """

    def __init__(self, config: SpeechAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv1d(
            config.input_dim,
            config.width,
            config.conv_kernel,
            stride=config.conv_stride,
            padding=config.conv_kernel // 2,
        )
        self.layer = _AdapterLayer(config.width, config.num_heads, config.ffn_dim, config.norm_eps)
        self.norm = RMSNorm(config.width, config.norm_eps)
        self.out_proj = Linear(config.width, config.output_dim, bias=False)
        # Not a buffer: `.to(bfloat16)` must never round the frequencies (they stay float32).
        self._inv_freq = rope_frequencies(config.head_dim, config.rope_theta, None)

    def forward(
        self, hidden: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map encoder frames to backbone embeddings.

        Args:
            hidden: encoder output ``[b, f', d_enc]``.
            lengths: ``[b]`` real encoder frames (at least 1), or ``None`` for all ``f'``.

        Returns:
            ``embeds [b, f'', d]`` (zero at padded frames) and ``out_lengths [b]``.
        """
        cfg = self.config
        if hidden.ndim != 3 or hidden.shape[-1] != cfg.input_dim:
            raise ValueError(
                f"SpeechAdapter: hidden must be [b, f, {cfg.input_dim}], got {tuple(hidden.shape)}"
            )
        b, f, _ = hidden.shape
        if lengths is None:
            lengths = torch.full((b,), f, dtype=torch.long, device=hidden.device)
        if lengths.shape != (b,) or int(lengths.min()) < 1 or int(lengths.max()) > f:
            raise ValueError(f"SpeechAdapter: lengths must be [{b}] values in 1..{f}, got {lengths.tolist()}")
        lengths = lengths.to(hidden.device)
        x = hidden * lengths_to_mask(lengths, f)[..., None]  # padding reaches the conv as zeros
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)  # [b, f'', w]
        out_lengths = cfg.output_length(lengths)
        fpp = x.shape[1]
        frame_mask = lengths_to_mask(out_lengths, fpp)  # [b, f'']
        key_mask = None if bool(frame_mask.all()) else frame_mask[:, None, None, :]  # [b, 1, 1, f'']
        positions = torch.arange(fpp, device=x.device)[None]  # [1, f'']
        rope = rope_cos_sin(self._inv_freq, positions, x.dtype)  # [1, f'', hd] each
        x = self.layer(x, rope, key_mask)
        x = self.out_proj(self.norm(x))  # [b, f'', d]
        return x * frame_mask[..., None], out_lengths


def num_audio_tokens(
    num_samples: int,
    audio_config: AudioConfig | None = None,
    conformer_config: ConformerConfig | None = None,
    adapter_config: SpeechAdapterConfig | None = None,
) -> int:
    """How many ``<|audio|>`` placeholders a waveform of ``num_samples`` samples (at the model's
    sample rate) becomes: log-mel frames → ``// stack`` encoder frames → adapter frames.

    Configs left as ``None`` are the defaults (the paper's sizes).
    """
    from mm.datasets.audio import AudioConfig, num_frames

    audio_config = audio_config or AudioConfig()
    conformer_config = conformer_config or ConformerConfig()
    adapter_config = adapter_config or SpeechAdapterConfig()
    frames = num_frames(num_samples, audio_config)
    encoder_frames = frames // conformer_config.stack
    if encoder_frames < 1:
        raise ValueError(
            f"audio of {num_samples} samples gives {frames} feature frames, fewer than the "
            f"{conformer_config.stack} one encoder frame needs"
        )
    return adapter_config.output_length(encoder_frames)


def splice_audio(
    inputs_embeds: torch.Tensor,
    input_ids: torch.Tensor,
    audio_id: int,
    audio_embeds: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Replace each run of ``audio_id`` placeholders with one clip's adapter outputs (§8.1.2).

    Runs are matched to clips in reading order (row by row, left to right). Two clips must not
    touch: a run is a maximal stretch of consecutive placeholders, so put any other token between
    clips.

    Args:
        inputs_embeds: token embeddings ``[b, s, d]``.
        input_ids: ``[b, s]``.
        audio_id: the ``<|audio|>`` placeholder id.
        audio_embeds: one ``[m_i, d]`` tensor per run; ``m_i`` must equal the run's length.

    Returns:
        ``[b, s, d]``: ``inputs_embeds`` with the placeholder positions replaced (a new tensor;
        gradients flow into ``audio_embeds``).
    """
    if input_ids.shape != inputs_embeds.shape[:2]:
        raise ValueError(
            f"splice_audio: input_ids {tuple(input_ids.shape)} and inputs_embeds "
            f"{tuple(inputs_embeds.shape)} disagree on [b, s]"
        )
    d = inputs_embeds.shape[-1]
    placeholder = input_ids == audio_id  # [b, s]
    starts = placeholder & ~F.pad(placeholder[:, :-1], (1, 0), value=False)  # [b, s]
    run_index = starts.flatten().long().cumsum(0) - 1  # [b * s], run of each position
    run_lengths = torch.bincount(run_index[placeholder.flatten()], minlength=int(starts.sum())).tolist()
    if len(run_lengths) != len(audio_embeds):
        raise ValueError(
            f"splice_audio: found {len(run_lengths)} runs of the audio token {audio_id} in input_ids, "
            f"but {len(audio_embeds)} audio clips were given"
        )
    for i, (run, clip) in enumerate(zip(run_lengths, audio_embeds)):
        if clip.ndim != 2 or clip.shape[0] != run or clip.shape[1] != d:
            raise ValueError(
                f"splice_audio: audio clip {i} has shape {tuple(clip.shape)}, but its placeholder run "
                f"needs [{run}, {d}]"
            )
    if not run_lengths:
        return inputs_embeds
    source = torch.cat(list(audio_embeds)).to(inputs_embeds.dtype)  # [sum m_i, d], in reading order
    return inputs_embeds.masked_scatter(placeholder[..., None], source)
