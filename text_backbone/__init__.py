"""The frozen Llama 3 text backbone: decoder, configuration, checkpoints, tokenizers, generation.

Shape legend used throughout mm: b batch, s text tokens, n images, t tiles, p patches, f frames,
h heads, hd head dim, d model width, V vocabulary.
"""

from mm.text_backbone.checkpoint import CheckpointError
from mm.text_backbone.config import RopeScaling, TextConfig
from mm.text_backbone.generation import sample_next, stream_tokens
from mm.text_backbone.kv_cache import KVCache
from mm.text_backbone.layers import AttentionContext, DecoderLayer, RMSNorm, SwiGLU
from mm.text_backbone.model import TextBackbone
from mm.text_backbone.presets import TEXT_PRESETS

__all__ = [
    "AttentionContext",
    "CheckpointError",
    "DecoderLayer",
    "KVCache",
    "RMSNorm",
    "RopeScaling",
    "SwiGLU",
    "TEXT_PRESETS",
    "TextBackbone",
    "TextConfig",
    "sample_next",
    "stream_tokens",
]
