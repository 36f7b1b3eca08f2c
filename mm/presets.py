"""Named model configurations: published sizes and ``tiny`` for tests and the demo.

* Text models (backbone only): ``llama3.2-1b``, ``llama3.2-3b``, ``llama3.1-8b``, ``llama3.1-70b``,
  ``llama3.1-405b``.
* Llama 3.2 Vision as released: ``llama3.2-11b-vision`` and ``llama3.2-90b-vision`` (10.643B and
  88.566B parameters as transformers counts them).
* The Llama 3 paper's compositional models (sections 7-8): ``llama3-8b``, ``llama3-70b``,
  ``llama3-405b`` — the text model plus the image encoder (ViT-H/14 with 8 gated global layers,
  about 850M) and image cross-attention blocks before every 4th layer (about 100B at 405B).
* ``tiny`` (tests) and ``tiny-demo`` (``mm demo``): about a million parameters over the byte-level
  tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable

from mm.config import ModelConfig
from mm.encoders.image_encoder import ImageEncoderConfig
from mm.text_backbone.config import TextConfig
from mm.text_backbone.presets import TEXT_PRESETS

__all__ = ["DEMO_IMAGE_ENCODER", "DEMO_TEXT", "MODEL_PRESETS", "TINY_IMAGE_ENCODER"]

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


def _text_only(name: str) -> Callable[[], ModelConfig]:
    return lambda: ModelConfig(text=TEXT_PRESETS[name])


def _with_vision(text: str) -> Callable[[], ModelConfig]:
    return lambda: ModelConfig(text=TEXT_PRESETS[text], image_encoder=ImageEncoderConfig())


def _llama32_vision(text: TextConfig) -> Callable[[], ModelConfig]:
    # Llama 3.2 Vision's text side: Llama 3.1's, with the <|image|> row among 8 extra embeddings
    # and pad id 128004.
    return lambda: ModelConfig(text=text.replace(pad_token_id=128004), image_encoder=ImageEncoderConfig())


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    **{name: _text_only(name) for name in TEXT_PRESETS if name != "tiny"},
    "llama3.2-11b-vision": _llama32_vision(TEXT_PRESETS["llama3.1-8b"]),
    "llama3.2-90b-vision": _llama32_vision(TEXT_PRESETS["llama3.1-70b"]),
    "llama3-8b": _with_vision("llama3.1-8b"),
    "llama3-70b": _with_vision("llama3.1-70b"),
    "llama3-405b": _with_vision("llama3.1-405b"),
    "tiny": lambda: ModelConfig(text=TEXT_PRESETS["tiny"], image_encoder=TINY_IMAGE_ENCODER),
    "tiny-demo": lambda: ModelConfig(
        text=DEMO_TEXT, image_encoder=DEMO_IMAGE_ENCODER, cross_attention_layers=(1, 3)
    ),
}
