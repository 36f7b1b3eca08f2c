"""Named model configurations: published sizes and ``tiny`` for tests and the demo.

* Text models (backbone only): ``llama3.2-1b``, ``llama3.2-3b``, ``llama3.1-8b``, ``llama3.1-70b``,
  ``llama3.1-405b``.
* Llama 3.2 Vision as released: ``llama3.2-11b-vision`` and ``llama3.2-90b-vision`` (10.643B and
  88.566B parameters as transformers counts them).
* The Llama 3 paper's compositional models (sections 7-8): ``llama3-8b``, ``llama3-70b``,
  ``llama3-405b`` — the text model plus the image encoder (ViT-H/14 with 8 gated global layers,
  about 850M), image cross-attention blocks before every 4th layer (about 100B at 405B), the video
  adapter (aggregator and video blocks: about 0.6B at 8B, 4.6B at 70B), and the speech encoder
  (about 1B) and adapter (about 100M).
* ``tiny`` (tests), ``tiny-av`` (tests: with video and speech) and ``tiny-demo`` (``mm demo``):
  about a million parameters over the byte-level tokenizer.
"""

from __future__ import annotations

from typing import Any

from mm.adapters.speech_adapter import SpeechAdapterConfig
from mm.encoders.conformer import ConformerConfig
from mm.encoders.image_encoder import ImageEncoderConfig
from mm.text_backbone.config import TextConfig
from mm.text_backbone.presets import TEXT_PRESETS

__all__ = [
    "DEMO_IMAGE_ENCODER",
    "DEMO_SPEECH_ADAPTER",
    "DEMO_SPEECH_ENCODER",
    "DEMO_TEXT",
    "MODEL_PRESETS",
    "TINY_IMAGE_ENCODER",
    "TINY_SPEECH_ADAPTER",
    "TINY_SPEECH_ENCODER",
]

#: A Llama 3 image encoder small enough for tests: 28 px tiles of 2x2 patches.
TINY_IMAGE_ENCODER = ImageEncoderConfig(
    image_size=28,
    patch_size=14,
    width=32,
    num_layers=4,
    num_global_layers=2,
    num_heads=4,
    mlp_dim=64,
    max_num_tiles=4,
    intermediate_layers=(1, 2),
)


#: The demo's image encoder: one 56 px tile of 7x7 patches of 8 px.
DEMO_IMAGE_ENCODER = ImageEncoderConfig(
    image_size=56,
    patch_size=8,
    width=64,
    num_layers=4,
    num_global_layers=2,
    num_heads=4,
    mlp_dim=128,
    max_num_tiles=1,
    supported_aspect_ratios=((1, 1),),
    intermediate_layers=(1, 2),
)

#: The demo's text backbone: 4 layers over the byte-level tokenizer, image blocks before layers 1 and 3.
DEMO_TEXT = TEXT_PRESETS["tiny"]


#: A Conformer and speech adapter small enough for tests.
TINY_SPEECH_ENCODER = ConformerConfig(width=32, num_layers=2, num_heads=4, ffn_dim=64)
TINY_SPEECH_ADAPTER = SpeechAdapterConfig(input_dim=32, width=64, num_heads=4, ffn_dim=96, output_dim=128)


#: The demo's speech encoder and adapter (16 kHz log-mel in, the demo backbone's width out).
DEMO_SPEECH_ENCODER = ConformerConfig(width=64, num_layers=3, num_heads=4, ffn_dim=128)
DEMO_SPEECH_ADAPTER = SpeechAdapterConfig(input_dim=64, width=128, num_heads=4, ffn_dim=256, output_dim=128)


def _paper(text: TextConfig) -> dict[str, Any]:
    """The Llama 3 paper's compositional model: image encoder and adapter, the video adapter (a
    perceiver resampler merging 32 frames into 1, video blocks before every 4th image block) and the
    speech encoder (1B Conformer) and adapter (~100M) at the text model's width."""
    return {
        "text": text,
        "image_encoder": ImageEncoderConfig(),
        "video": {},
        "speech": {"encoder": ConformerConfig(), "adapter": SpeechAdapterConfig(output_dim=text.embed_dim)},
    }


def _llama32_vision(text: TextConfig) -> dict[str, Any]:
    # Llama 3.2 Vision's text side: Llama 3.1's, with the <|image|> row among 8 extra embeddings
    # and pad id 128004.
    return {"text": text.replace(pad_token_id=128004), "image_encoder": ImageEncoderConfig()}


#: Preset name -> the keyword arguments of its :class:`~mm.model.ModelConfig` (``video`` and ``speech``
#: as the keyword arguments of their configs). Read by ``ModelConfig.preset``; this module imports
#: no part of ``mm.model``.
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    **{name: {"text": config} for name, config in TEXT_PRESETS.items() if name != "tiny"},
    "llama3.2-11b-vision": _llama32_vision(TEXT_PRESETS["llama3.1-8b"]),
    "llama3.2-90b-vision": _llama32_vision(TEXT_PRESETS["llama3.1-70b"]),
    "llama3-8b": _paper(TEXT_PRESETS["llama3.1-8b"]),
    "llama3-70b": _paper(TEXT_PRESETS["llama3.1-70b"]),
    "llama3-405b": _paper(TEXT_PRESETS["llama3.1-405b"]),
    "tiny": {"text": TEXT_PRESETS["tiny"], "image_encoder": TINY_IMAGE_ENCODER},
    "tiny-av": {
        "text": TEXT_PRESETS["tiny"],
        "image_encoder": TINY_IMAGE_ENCODER,
        "video": {"group_size": 4, "cross_attention_layers": (1, 3)},
        "speech": {"encoder": TINY_SPEECH_ENCODER, "adapter": TINY_SPEECH_ADAPTER},
    },
    "tiny-demo": {
        "text": DEMO_TEXT,
        "image_encoder": DEMO_IMAGE_ENCODER,
        "cross_attention_layers": (1, 3),
        # 16 frames merged 4 -> 1 (4 merged frames, in order) and a video block before each image block.
        "video": {"group_size": 4, "cross_attention_layers": (1, 3)},
        "speech": {"encoder": DEMO_SPEECH_ENCODER, "adapter": DEMO_SPEECH_ADAPTER},
    },
}
