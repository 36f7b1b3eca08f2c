"""Configuration of a multimodal model: the backbone's sizes plus what is attached to it.

Every field is plain data (JSON round-trips through :meth:`ModelConfig.to_dict` /
:meth:`ModelConfig.from_dict`, strictly: unknown keys are errors), so a saved model, a recipe and
``mm info`` all speak the same language.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from mm.encoders.image_encoder import ImageEncoderConfig
from mm.text_backbone.config import TextConfig

__all__ = ["ModelConfig", "default_cross_attention_layers"]

#: Rows added after the text vocabulary for placeholder tokens (Llama 3.2 Vision adds 8).
NUM_EXTRA_TOKENS = 8


def default_cross_attention_layers(num_layers: int, interval: int = 4) -> tuple[int, ...]:
    """Backbone layers that get an image block in front of them: 3, 7, 11, … (Llama 3.2 Vision)."""
    return tuple(range(interval - 1, num_layers, interval))


def _strict(cls, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown keys in {where}: {unknown} (known: {sorted(known)})")
    return dict(data)


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
        num_extra_tokens: embedding rows after the text vocabulary for ``<|image|>`` and friends.
    """

    text: TextConfig
    image_encoder: ImageEncoderConfig | Mapping[str, Any] | None = None
    cross_attention_layers: tuple[int, ...] | None = None
    cross_attention_intermediate_dim: int | None = None
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
        """A named configuration (see ``mm.presets``): paper sizes, Llama 3.2 Vision, text models, ``tiny``."""
        from mm.presets import MODEL_PRESETS

        if name not in MODEL_PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(MODEL_PRESETS))}")
        return MODEL_PRESETS[name]()

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
            "num_extra_tokens": self.num_extra_tokens,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        data = _strict(cls, data, "model config")
        data["text"] = TextConfig.from_dict(data["text"])
        enc = data.get("image_encoder")
        if isinstance(enc, Mapping) and enc.get("type", "llama3") == "llama3":
            fields = {k: v for k, v in enc.items() if k != "type"}
            data["image_encoder"] = ImageEncoderConfig.from_dict(fields)
        if data.get("cross_attention_layers") is not None:
            data["cross_attention_layers"] = tuple(data["cross_attention_layers"])
        return cls(**data)
