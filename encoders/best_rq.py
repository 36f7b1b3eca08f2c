"""BEST-RQ self-supervised pre-training of the speech encoder (Llama 3 §8.1.3; Chiu et al., 2022).

Shapes: b batch, f input feature frames (10 ms), f' encoder frames (40 ms), c feature channels,
d encoder width, q codebooks, K codebook entries, m masked encoder frames in the batch.

The recipe, as the Llama 3 paper sets it:

* **Targets** come from a frozen random-projection quantiser: 4 stacked feature frames (320 dims)
  are projected to 16 dims and matched, by cosine similarity, to the nearest of 8,192 random unit
  vectors, in each of 16 independent codebooks (each with its own projection). Nothing here
  learns; everything is generated from a seed, so the targets are the same in every process.
* **Masking**: each input frame (10 ms) starts a 32-frame span with probability 2.5% ("a mask of
  32-frame length with a probability of 2.5% to the input mel-spectrogram"). Spans are cut at the
  utterance's end, and an utterance where no frame drew a start gets one span at a random start,
  so every utterance contributes to the loss. The mask is then widened to whole 4-frame groups, so
  an encoder frame is either fully masked or fully visible, and masked input frames are replaced
  by N(0, 0.1²) noise (the features are per-utterance normalised, see ``mm.datasets.audio``).
* **Loss**: a linear classifier per codebook on the encoder output; cross entropy averaged over
  codebooks and over masked encoder frames only ("multi-softmax loss ... only on masked frames").

:func:`best_rq_loss` is the stage objective; its parts (:class:`BestRqQuantizer`,
:func:`span_mask`, :func:`mask_features`, :class:`BestRqHead`) are public for other recipes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from mm.encoders.conformer import ConformerEncoder, lengths_to_mask, stack_frames

__all__ = ["BestRqHead", "BestRqQuantizer", "best_rq_loss", "mask_features", "span_mask"]

IGNORE_INDEX = -100


class BestRqQuantizer(nn.Module):
    """Frozen random-projection quantiser giving BEST-RQ targets.

    The projections (Xavier-uniform) and the codebooks (standard normal, then unit length) are
    drawn from a private ``torch.Generator`` seeded with ``seed``, so they depend on nothing but the
    arguments. They are non-persistent buffers: they move with ``.to(device)``, never reach a
    checkpoint (the seed regenerates them), and are used in float32 whatever the module's dtype.

    Args:
        input_dim: feature channels per frame.
        stack: frames stacked per target (the encoder's stride).
        proj_dim: projected dimension.
        codebook_size: entries per codebook ``K``.
        num_codebooks: independent codebooks ``q``.
        seed: seed of the generator.
    """

    def __init__(
        self,
        *,
        input_dim: int = 80,
        stack: int = 4,
        proj_dim: int = 16,
        codebook_size: int = 8192,
        num_codebooks: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.input_dim = input_dim
        self.stack = stack
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.seed = seed
        gen = torch.Generator(device="cpu").manual_seed(seed)
        fan_in, fan_out = stack * input_dim, proj_dim
        bound = math.sqrt(6.0 / (fan_in + fan_out))  # Xavier-uniform
        projection = (torch.rand(num_codebooks, fan_in, fan_out, generator=gen) * 2 - 1) * bound
        codebooks = F.normalize(torch.randn(num_codebooks, codebook_size, proj_dim, generator=gen), dim=-1)
        self.register_buffer("projection", projection, persistent=False)  # [q, stack * c, 16]
        self.register_buffer("codebooks", codebooks, persistent=False)  # [q, K, 16]

    @torch.no_grad()
    def targets(self, features: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Codebook indices for each encoder frame.

        Args:
            features: ``[b, f, c]`` (clean, unmasked).
            lengths: ``[b]`` real input frames, or ``None`` for all ``f``.

        Returns:
            ``LongTensor [b, f // stack, q]``; ``-100`` (ignore) at padded encoder frames.
        """
        b, f, c = features.shape
        if c != self.input_dim:
            raise ValueError(f"BestRqQuantizer: features have {c} channels, expected {self.input_dim}")
        if lengths is None:
            lengths = torch.full((b,), f, dtype=torch.long)
        lengths = lengths.to(features.device)
        stacked, out_lengths = stack_frames(features.float(), lengths, self.stack)  # [b, f', stack * c]
        projection, codebooks = self.projection.float(), self.codebooks.float()
        out = []
        for i in range(self.num_codebooks):  # one codebook at a time keeps [b, f', K] small
            z = F.normalize(stacked @ projection[i], dim=-1)  # [b, f', 16]
            out.append((z @ codebooks[i].T).argmax(dim=-1))  # [b, f'] nearest by cosine
        ids = torch.stack(out, dim=-1)  # [b, f', q]
        valid = lengths_to_mask(out_lengths, ids.shape[1])
        return ids.masked_fill(~valid[..., None], IGNORE_INDEX)

    def extra_repr(self) -> str:
        return (
            f"input_dim={self.input_dim}, stack={self.stack}, proj_dim={self.projection.shape[-1]}, "
            f"codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, seed={self.seed}"
        )


def span_mask(
    lengths: torch.Tensor,
    *,
    max_len: int | None = None,
    prob: float = 0.025,
    span: int = 32,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random span mask: each real frame starts a ``span``-frame masked span with probability ``prob``.

    Spans are cut at each utterance's end; an utterance where no frame drew a start gets one span
    at a uniformly drawn start (in ``[0, length - span]`` when it is long enough), so each
    non-empty utterance has at least one masked frame.

    Args:
        lengths: ``[b]`` real frames per row.
        max_len: mask width; ``max(lengths)`` when not given.
        prob: probability that a frame starts a span.
        span: span length in frames.
        generator: random generator (its device is where the draws happen).

    Returns:
        ``BoolTensor [b, max_len]`` on ``lengths.device``, True = masked, False past each length.
    """
    max_len = int(lengths.max()) if max_len is None else max_len
    draw_device = generator.device if generator is not None else lengths.device
    b = lengths.shape[0]
    lengths_d = lengths.to(draw_device)
    valid = lengths_to_mask(lengths_d, max_len)  # [b, f]
    starts = (torch.rand(b, max_len, generator=generator, device=draw_device) < prob) & valid
    # Rows without any start get one, at a random position where a whole span fits if possible.
    room = (lengths_d - span).clamp(min=0) + 1
    fallback = (torch.rand(b, generator=generator, device=draw_device) * room).long().clamp(max=max_len - 1)
    needs = ~starts.any(dim=1) & (lengths_d > 0)
    starts[needs, fallback[needs]] = True
    # A frame is masked when a span started within the last `span` frames (inclusive).
    count = F.pad(starts.long().cumsum(dim=1), (span, 0))  # [b, span + f]
    covered = (count[:, span:] - count[:, :-span]) > 0
    return (covered & valid).to(lengths.device)


def mask_features(
    features: torch.Tensor,
    lengths: torch.Tensor,
    *,
    stack: int,
    prob: float = 0.025,
    span: int = 32,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask input spans as BEST-RQ does and replace them with noise.

    Spans are drawn on the input frames (:func:`span_mask`), then widened to whole ``stack``-frame
    groups, so every encoder frame is fully masked or fully visible.

    Args:
        features: ``[b, f, c]``.
        lengths: ``[b]`` real input frames.
        stack: the encoder's frame stacking.
        prob, span: see :func:`span_mask` (in input frames).
        noise_std: standard deviation of the N(0, σ²) noise masked frames get.
        generator: random generator.

    Returns:
        ``masked_features [b, f, c]`` and the encoder-frame mask ``BoolTensor [b, f // stack]``.
    """
    b, f, _ = features.shape
    fp = f // stack
    lengths = lengths.to(features.device)
    frame_mask = span_mask(lengths, max_len=f, prob=prob, span=span, generator=generator)  # [b, f]
    valid_enc = lengths_to_mask(torch.div(lengths, stack, rounding_mode="floor"), fp)  # [b, f']
    enc_mask = rearrange(frame_mask[:, : fp * stack], "b (g k) -> b g k", k=stack).any(-1) & valid_enc
    input_mask = F.pad(enc_mask.repeat_interleave(stack, dim=1), (0, f - fp * stack))  # [b, f]
    draw_device = generator.device if generator is not None else features.device
    noise = torch.randn(features.shape, generator=generator, device=draw_device).to(features) * noise_std
    return torch.where(input_mask[..., None], noise, features), enc_mask


class BestRqHead(nn.Module):
    """One linear classifier per codebook on the encoder output: ``[..., d] -> [..., q, K]``."""

    def __init__(self, dim: int, *, codebook_size: int = 8192, num_codebooks: int = 16) -> None:
        super().__init__()
        self.num_codebooks = num_codebooks
        self.proj = nn.Linear(dim, num_codebooks * codebook_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return rearrange(self.proj(hidden), "... (q k) -> ... q k", q=self.num_codebooks)  # [..., q, K]


def best_rq_loss(
    encoder: ConformerEncoder,
    quantizer: BestRqQuantizer,
    head: BestRqHead,
    features: torch.Tensor,
    lengths: torch.Tensor,
    *,
    generator: torch.Generator | None = None,
    prob: float = 0.025,
    span: int = 32,
    noise_std: float = 0.1,
) -> torch.Tensor:
    """BEST-RQ pre-training loss (Llama 3 §8.1.3): multi-softmax cross entropy on masked frames.

    Args:
        encoder: the speech encoder being pre-trained.
        quantizer: the frozen target quantiser (its ``stack`` must equal the encoder's).
        head: the per-codebook classifiers.
        features: ``[b, f, c]`` normalised log-mel features, zero-padded.
        lengths: ``[b]`` real input frames.
        generator: random generator for the mask and the noise.
        prob, span: span masking on input frames (paper: 2.5%, 32 frames).
        noise_std: noise standard deviation for masked frames (BEST-RQ: 0.1).

    Returns:
        Scalar loss: cross entropy averaged over codebooks and masked encoder frames.
    """
    stack = encoder.config.stack
    if quantizer.stack != stack:
        raise ValueError(f"best_rq_loss: quantizer stacks {quantizer.stack} frames, the encoder {stack}")
    targets = quantizer.targets(features, lengths)  # [b, f', q]
    masked, enc_mask = mask_features(
        features, lengths, stack=stack, prob=prob, span=span, noise_std=noise_std, generator=generator
    )
    hidden, _ = encoder(masked, lengths)  # [b, f', d]
    logits = head(hidden[enc_mask])  # [m, q, K]
    return F.cross_entropy(logits.flatten(0, 1).float(), targets[enc_mask].flatten())
