"""Configuration of a multimodal model: the backbone's sizes plus what is attached to it.

Every field is plain data (JSON round-trips through :meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`, strictly: unknown keys are errors), so a saved model, a recipe and
``mm info`` all speak the same language.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mm._strict import check_fields
from mm.adapters.speech_adapter import SpeechAdapterConfig
from mm.encoders.conformer import ConformerConfig
from mm.encoders.image_encoder import ImageEncoderConfig
from mm.model.presets import MODEL_PRESETS
from mm.text_backbone.config import TextConfig

__all__ = ["ModelConfig", "SpeechConfig", "VideoAdapterConfig", "default_cross_attention_layers"]

#: Rows added after the text vocabulary for placeholder tokens (Llama 3.2 Vision adds 8).
NUM_EXTRA_TOKENS = 8


def default_cross_attention_layers(num_layers: int, interval: int = 4) -> tuple[int, ...]:
    """Backbone layers that get an image block in front of them: 3, 7, 11, … (Llama 3.2 Vision)."""
    return tuple(range(interval - 1, num_layers, interval))


@dataclass(frozen=True, kw_only=True)
class VideoAdapterConfig:
    """The video adapter (Llama 3 paper, section 7.2): a temporal aggregator and video cross-attention.

    Args:
        group_size: consecutive frames the aggregator (a perceiver resampler) merges into one
            (paper: 32; its pre-training merges 16 frames, its SFT 64 frames into 2).
        num_layers: resampler layers.
        num_heads: resampler heads (default: the backbone's).
        ffn_dim: resampler feed-forward width (default: about ``4 d / 3``).
        cross_attention_layers: backbone layers with a video block in front of them (default: the
            layer of every 4th image block, so video blocks sit before every 4th image block).
    """

    group_size: int = 32
    num_layers: int = 1
    num_heads: int | None = None
    ffn_dim: int | None = None
    cross_attention_layers: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["cross_attention_layers"] is not None:
            d["cross_attention_layers"] = list(d["cross_attention_layers"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VideoAdapterConfig:
        data = check_fields(cls, data, "video config")
        if data.get("cross_attention_layers") is not None:
            data["cross_attention_layers"] = tuple(data["cross_attention_layers"])
        return cls(**data)


@dataclass(frozen=True, kw_only=True)
class SpeechConfig:
    """The speech side (Llama 3 paper, section 8): a Conformer encoder and the speech adapter.

    The adapter's input width is the encoder's and its output width the backbone's; ``from_dict``
    and :class:`ModelConfig` check both.
    """

    encoder: ConformerConfig = field(default_factory=ConformerConfig)
    adapter: SpeechAdapterConfig = field(default_factory=SpeechAdapterConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"encoder": dataclasses.asdict(self.encoder), "adapter": dataclasses.asdict(self.adapter)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpeechConfig:
        data = check_fields(cls, data, "speech config")
        return cls(
            encoder=ConformerConfig(
                **check_fields(ConformerConfig, data.get("encoder", {}), "speech encoder config")
            ),
            adapter=SpeechAdapterConfig(
                **check_fields(SpeechAdapterConfig, data.get("adapter", {}), "speech adapter config")
            ),
        )


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A frozen text backbone plus encoders and adapters.

    Args:
        text: sizes of the backbone.
        image_encoder: the Llama 3 image encoder's sizes, or a backend spec such as
            ``{"type": "open_clip", "model_name": "ViT-H-14", ...}`` (see ``mm.encoders``), or ``None``.
        cross_attention_layers: backbone layer indices with an image cross-attention block *before*
            them. Defaults to every 4th layer starting at 3 when there is an image encoder.
        cross_attention_intermediate_dim: SwiGLU width of those blocks (default: the backbone's).
        video: the video adapter (needs the image encoder: every frame goes through it), or ``None``.
        speech: the speech encoder and adapter, or ``None``.
        num_extra_tokens: embedding rows after the text vocabulary for ``<|image|>`` and friends.
    """

    text: TextConfig
    image_encoder: ImageEncoderConfig | Mapping[str, Any] | None = None
    cross_attention_layers: tuple[int, ...] | None = None
    cross_attention_intermediate_dim: int | None = None
    video: VideoAdapterConfig | None = None
    speech: SpeechConfig | None = None
    num_extra_tokens: int = NUM_EXTRA_TOKENS

    def __post_init__(self) -> None:
        if self.cross_attention_layers is None:
            layers = (
                default_cross_attention_layers(self.text.num_layers) if self.image_encoder is not None else ()
            )
            object.__setattr__(self, "cross_attention_layers", layers)
        layers = tuple(int(i) for i in self.cross_attention_layers)
        object.__setattr__(self, "cross_attention_layers", layers)
        if list(layers) != sorted(set(layers)) or any(not 0 <= i < self.text.num_layers for i in layers):
            raise ValueError(
                f"cross_attention_layers must be increasing backbone layer indices below "
                f"{self.text.num_layers}, got {list(layers)}"
            )
        if layers and self.image_encoder is None:
            raise ValueError("cross_attention_layers given without an image_encoder")
        if self.cross_attention_intermediate_dim is None:
            object.__setattr__(self, "cross_attention_intermediate_dim", self.text.intermediate_dim)
        if self.video is not None:
            if self.image_encoder is None or not layers:
                raise ValueError("a video adapter needs the image encoder and image cross-attention blocks")
            vlayers = self.video.cross_attention_layers
            if vlayers is None:
                vlayers = layers[::4]
            vlayers = tuple(int(i) for i in vlayers)
            if list(vlayers) != sorted(set(vlayers)) or any(
                not 0 <= i < self.text.num_layers for i in vlayers
            ):
                raise ValueError(
                    f"video cross_attention_layers must be increasing backbone layers, got {vlayers}"
                )
            object.__setattr__(self, "video", dataclasses.replace(self.video, cross_attention_layers=vlayers))
        if self.speech is not None:
            if self.speech.adapter.input_dim != self.speech.encoder.width:
                raise ValueError(
                    f"speech adapter input_dim {self.speech.adapter.input_dim} != encoder width {self.speech.encoder.width}"
                )
            if self.speech.adapter.output_dim != self.text.embed_dim:
                raise ValueError(
                    f"speech adapter output_dim {self.speech.adapter.output_dim} != backbone width {self.text.embed_dim}"
                )

    @property
    def has_media(self) -> bool:
        """Any encoder attached (then placeholder embedding rows exist)."""
        return self.image_encoder is not None or self.speech is not None

    @property
    def image_token_id(self) -> int:
        return self.text.vocab_size

    @property
    def video_token_id(self) -> int:
        return self.text.vocab_size + 1

    @property
    def audio_token_id(self) -> int:
        return self.text.vocab_size + 2

    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A named configuration (see ``mm.model.presets``): paper sizes, Llama 3.2 Vision, text models, ``tiny``."""
        if name not in MODEL_PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
        entry = dict(MODEL_PRESETS[name])
        if "video" in entry:
            entry["video"] = VideoAdapterConfig(**entry["video"])
        if "speech" in entry:
            entry["speech"] = SpeechConfig(**entry["speech"])
        return cls(**entry)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        enc = self.image_encoder
        if isinstance(enc, ImageEncoderConfig):
            enc = {"type": "llama3", **enc.to_dict()}
        elif enc is not None:
            enc = dict(enc)
        return {
            "text": self.text.to_dict(),
            "image_encoder": enc,
            "cross_attention_layers": list(self.cross_attention_layers),
            "cross_attention_intermediate_dim": self.cross_attention_intermediate_dim,
            "video": None if self.video is None else self.video.to_dict(),
            "speech": None if self.speech is None else self.speech.to_dict(),
            "num_extra_tokens": self.num_extra_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        data = check_fields(cls, data, "model config")
        data["text"] = TextConfig.from_dict(data["text"])
        enc = data.get("image_encoder")
        if isinstance(enc, Mapping) and enc.get("type", "llama3") == "llama3":
            fields = {k: v for k, v in enc.items() if k != "type"}
            data["image_encoder"] = ImageEncoderConfig.from_dict(fields)
        if data.get("cross_attention_layers") is not None:
            data["cross_attention_layers"] = tuple(data["cross_attention_layers"])
        if data.get("video") is not None:
            data["video"] = VideoAdapterConfig.from_dict(data["video"])
        if data.get("speech") is not None:
            data["speech"] = SpeechConfig.from_dict(data["speech"])
        return cls(**data)
