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
from mm._values import ConfigValueError, as_bool, as_int, as_int_tuple, check_values, optional
from mm.adapters.speech_adapter import SpeechAdapterConfig
from mm.encoders.conformer import ConformerConfig
from mm.encoders.image_encoder import ImageEncoderConfig
from mm.model.presets import MODEL_PRESETS
from mm.text_backbone.config import TextConfig
from mm.text_backbone.tokenizer import PLACEHOLDERS

__all__ = ["ModelConfig", "SpeechConfig", "VideoAdapterConfig", "default_cross_attention_layers"]

#: Rows added after the text vocabulary for placeholder tokens (Llama 3.2 Vision adds 8).
NUM_EXTRA_TOKENS = 8


def default_cross_attention_layers(num_layers: int, interval: int = 4) -> tuple[int, ...]:
    """Backbone layers that get an image block in front of them: 3, 7, 11, … (Llama 3.2 Vision)."""
    return tuple(range(interval - 1, num_layers, interval))


def _check_increasing(layers: tuple[int, ...], key: str, num_layers: int) -> None:
    if list(layers) != sorted(set(layers)):
        raise ConfigValueError(
            f"must be increasing backbone layer indices below {num_layers}, got {list(layers)}", key=key
        )


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

    def __post_init__(self) -> None:
        """Sizes are positive ints; the layers ints (their range is checked by :class:`ModelConfig`)."""
        positive = as_int(minimum=1)
        check_values(
            self,
            {
                "group_size": positive,
                "num_layers": positive,
                "num_heads": optional(positive),
                "ffn_dim": optional(positive),
                "cross_attention_layers": optional(as_int_tuple()),
            },
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["cross_attention_layers"] is not None:
            d["cross_attention_layers"] = list(d["cross_attention_layers"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VideoAdapterConfig:
        return cls(**check_fields(cls, data, "video config", error=ConfigValueError))


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

    def __post_init__(self) -> None:
        for key, kind in (("encoder", ConformerConfig), ("adapter", SpeechAdapterConfig)):
            if not isinstance(getattr(self, key), kind):
                raise ConfigValueError(f"must be a {kind.__name__}, got {getattr(self, key)!r}", key=key)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SpeechConfig:
        data = check_fields(cls, data, "speech config", error=ConfigValueError)
        parts = {}
        for key, kind, where in (
            ("encoder", ConformerConfig, "speech encoder config"),
            ("adapter", SpeechAdapterConfig, "speech adapter config"),
        ):
            try:
                parts[key] = kind(**check_fields(kind, data.get(key, {}), where, error=ConfigValueError))
            except ConfigValueError as e:
                raise e.within(key) from None
        return cls(**parts)


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
        reward_head: attach a scalar reward head (``Linear(d, 1)``) on the final hidden state of an
            answer's last token (Llama 3 section 7.5.2, the reward model; :mod:`mm.model.reward`).
            It never touches the logits.
    """

    text: TextConfig
    image_encoder: ImageEncoderConfig | Mapping[str, Any] | None = None
    cross_attention_layers: tuple[int, ...] | None = None
    cross_attention_intermediate_dim: int | None = None
    video: VideoAdapterConfig | None = None
    speech: SpeechConfig | None = None
    num_extra_tokens: int = NUM_EXTRA_TOKENS
    reward_head: bool = False

    def __post_init__(self) -> None:
        """Types and ranges of every field (:mod:`mm._values`; the nested configs check their own),
        then how the parts fit together: block layers are increasing indices of backbone layers,
        the speech adapter's widths are the encoder's and the backbone's, and there are embedding
        rows for the placeholders of every attached modality."""
        self._check_parts()
        text = self.text
        layer = as_int(minimum=0, below=text.num_layers)
        check_values(
            self,
            {
                "cross_attention_layers": optional(as_int_tuple(layer)),
                "cross_attention_intermediate_dim": optional(as_int(minimum=1)),
                "num_extra_tokens": as_int(minimum=0),
                "reward_head": as_bool(),
            },
        )
        if self.cross_attention_layers is None:
            layers = default_cross_attention_layers(text.num_layers) if self.image_encoder is not None else ()
            object.__setattr__(self, "cross_attention_layers", layers)
        layers = self.cross_attention_layers
        _check_increasing(layers, "cross_attention_layers", text.num_layers)
        if layers and self.image_encoder is None:
            raise ConfigValueError("cross_attention_layers given without an image_encoder")
        if self.cross_attention_intermediate_dim is None:
            object.__setattr__(self, "cross_attention_intermediate_dim", text.intermediate_dim)
        if self.video is not None:
            self._check_video(layers)
        if self.speech is not None:
            encoder, adapter = self.speech.encoder, self.speech.adapter
            if adapter.input_dim != encoder.width:
                raise ConfigValueError(
                    f"{adapter.input_dim} must equal speech.encoder.width {encoder.width}",
                    key="adapter.input_dim",
                    where=("speech",),
                )
            if adapter.output_dim != text.embed_dim:
                raise ConfigValueError(
                    f"{adapter.output_dim} must equal the backbone width text.embed_dim {text.embed_dim}",
                    key="adapter.output_dim",
                    where=("speech",),
                )
        # <|image|>, <|video|>, <|audio|> are rows 0, 1, 2 after the text vocabulary.
        needed = max(
            (
                k + 1
                for k, part in enumerate((self.image_encoder, self.video, self.speech))
                if part is not None
            ),
            default=0,
        )
        if self.num_extra_tokens < needed:
            raise ConfigValueError(
                f"must be at least {needed} (rows for {', '.join(PLACEHOLDERS[:needed])}), "
                f"got {self.num_extra_tokens}",
                key="num_extra_tokens",
            )

    def _check_parts(self) -> None:
        """Each part is a config of its kind (or a backend spec for the image encoder)."""
        kinds = {"text": TextConfig, "video": VideoAdapterConfig, "speech": SpeechConfig}
        for key, kind in kinds.items():
            value = getattr(self, key)
            if not isinstance(value, kind) and not (value is None and key != "text"):
                raise ConfigValueError(f"must be a {kind.__name__}, got {value!r}"[:200], key=key)
        enc = self.image_encoder
        if enc is not None and not isinstance(enc, ImageEncoderConfig | Mapping):
            raise ConfigValueError(
                f"must be an ImageEncoderConfig, a backend spec (a mapping) or None, got {enc!r}"[:200],
                key="image_encoder",
            )

    def _check_video(self, image_layers: tuple[int, ...]) -> None:
        text, video = self.text, self.video
        if self.image_encoder is None or not image_layers:
            raise ConfigValueError("a video adapter needs the image encoder and image cross-attention blocks")
        vlayers = video.cross_attention_layers
        if vlayers is None:
            vlayers = image_layers[::4]
        try:
            vlayers = as_int_tuple(as_int(minimum=0, below=text.num_layers))(
                "cross_attention_layers", vlayers
            )
            _check_increasing(vlayers, "cross_attention_layers", text.num_layers)
        except ConfigValueError as e:
            raise e.within("video") from None
        heads = video.num_heads or text.num_heads
        if text.embed_dim % heads:
            raise ConfigValueError(
                f"{heads} does not divide the backbone width text.embed_dim {text.embed_dim}",
                key="num_heads",
                where=("video",),
            )
        object.__setattr__(self, "video", dataclasses.replace(video, cross_attention_layers=vlayers))

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
        out = {
            "text": self.text.to_dict(),
            "image_encoder": enc,
            "cross_attention_layers": list(self.cross_attention_layers),
            "cross_attention_intermediate_dim": self.cross_attention_intermediate_dim,
            "video": None if self.video is None else self.video.to_dict(),
            "speech": None if self.speech is None else self.speech.to_dict(),
            "num_extra_tokens": self.num_extra_tokens,
        }
        if self.reward_head:  # only when present: folders without a head keep their recorded config
            out["reward_head"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Strict inverse of :meth:`to_dict`: unknown keys and bad values are errors naming the key
        (``text.vocab_size must be a positive int, got -1``)."""
        data = check_fields(cls, data, "model config", required=True, error=ConfigValueError)
        readers = {
            "text": TextConfig.from_dict,
            "video": VideoAdapterConfig.from_dict,
            "speech": SpeechConfig.from_dict,
        }
        enc = data.get("image_encoder")
        if isinstance(enc, Mapping) and enc.get("type", "llama3") == "llama3":
            data["image_encoder"] = {k: v for k, v in enc.items() if k != "type"}
            readers["image_encoder"] = ImageEncoderConfig.from_dict
        for key, read in readers.items():
            if data.get(key) is None and key != "text":
                continue
            try:
                data[key] = read(data[key])
            except ConfigValueError as e:
                raise e.within(key) from None
        return cls(**data)
