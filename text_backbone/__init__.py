"""The frozen Llama 3 text backbone: decoder, configuration, checkpoints, tokenizers, generation.

Shape legend used throughout mm: b batch, s text tokens, n images, t tiles, p patches, f frames,
h heads, hd head dim, d model width, V vocabulary.
"""

from mm.text_backbone.chat_format import IGNORE_INDEX, ChatTokens, format_chat, labels_from
from mm.text_backbone.checkpoint import CheckpointError
from mm.text_backbone.config import RopeScaling, TextConfig
from mm.text_backbone.generation import sample_next, stream_tokens
from mm.text_backbone.kv_cache import KVCache
from mm.text_backbone.layers import AttentionContext, DecoderLayer, RMSNorm, SwiGLU
from mm.text_backbone.model import TextBackbone
from mm.text_backbone.presets import TEXT_PRESETS
from mm.text_backbone.tokenizer import (
    LLAMA3_SPECIAL_TOKENS,
    PLACEHOLDERS,
    ByteTokenizer,
    HFTokenizer,
    SpecialTokenError,
    StreamDecoder,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
)

__all__ = [
    "IGNORE_INDEX",
    "LLAMA3_SPECIAL_TOKENS",
    "PLACEHOLDERS",
    "AttentionContext",
    "ByteTokenizer",
    "ChatTokens",
    "HFTokenizer",
    "SpecialTokenError",
    "StreamDecoder",
    "TiktokenTokenizer",
    "Tokenizer",
    "format_chat",
    "labels_from",
    "load_tokenizer",
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
