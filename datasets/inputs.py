"""How videos and audio travel from the preprocessor to the model: two small typed structures.

Shapes: b batch, s text tokens, v videos per sample, f frames, t tiles, p tokens per tile, d model
width, a audio clips in the batch (reading order), F log-mel frames.

Images keep Hugging Face Mllama's keyword arguments (``pixel_values``, ``aspect_ratio_ids``,
``aspect_ratio_mask``, ``cross_attention_mask``: a public contract); videos and speech go as one
argument each, ``video=VideoInputs(...)`` and ``audio=AudioInputs(...)``, so a new modality adds a
structure, not ten keyword arguments in every signature.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

__all__ = ["AudioInputs", "VideoInputs"]


def _to(value, device):
    return value.to(device) if torch.is_tensor(value) else value


@dataclass(frozen=True)
class VideoInputs:
    """The videos of a batch.

    Attributes:
        cross_attention_mask: ``[b, s, v]``, 1 where a text token may see a video.
        pixel_values: ``[b, v, f, t, 3, H, W]`` frames, or ``None`` when ``features`` are given.
        aspect_ratio_ids: ``[b, v]`` tile-grid id of each video (its frames share it).
        aspect_ratio_mask: ``[b, v, t]``, 1 for real tiles.
        features: ``[b, v, f, t, p, d]`` frame tokens cached on disk (``mm data cache-features``),
            instead of the pixels: the image encoder then does not run.
        group_size: frames the temporal aggregator merges into one (default: the model's; the
            paper's video SFT merges 32 of 64).
    """

    cross_attention_mask: torch.Tensor
    pixel_values: torch.Tensor | None = None
    aspect_ratio_ids: torch.Tensor | None = None
    aspect_ratio_mask: torch.Tensor | None = None
    features: torch.Tensor | None = None
    group_size: int | None = None

    def __post_init__(self) -> None:
        if (self.pixel_values is None) == (self.features is None):
            raise ValueError("videos need either pixel_values or cached features, not both or neither")
        if self.pixel_values is not None and self.aspect_ratio_ids is None:
            raise ValueError("video pixel_values need aspect_ratio_ids")

    def to(self, device: torch.device | str) -> VideoInputs:
        """The same inputs on ``device``."""
        return dataclasses.replace(
            self, **{f.name: _to(getattr(self, f.name), device) for f in dataclasses.fields(self)}
        )

    def replace(self, **changes) -> VideoInputs:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AudioInputs:
    """The speech of a batch: one log-mel clip per ``<|audio|>`` run, in reading order.

    Attributes:
        features: ``[a, F, 80]`` log-mel features, padded to the longest clip.
        lengths: ``[a]`` real frames of each clip (``None``: all ``F``).
    """

    features: torch.Tensor
    lengths: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> AudioInputs:
        """The same inputs on ``device``."""
        return AudioInputs(self.features.to(device), _to(self.lengths, device))

    def frame_lengths(self) -> torch.Tensor:
        """``[a]`` real frames of each clip."""
        if self.lengths is not None:
            return self.lengths
        a, frames = self.features.shape[:2]
        return torch.full((a,), frames, dtype=torch.long, device=self.features.device)
