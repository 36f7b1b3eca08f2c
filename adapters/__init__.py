"""Adapters that connect encoders to the frozen backbone.

Gated cross-attention blocks (images, video), the temporal aggregator (video) and the speech
adapter. Shape legend: b batch, s text tokens, f frames, t tiles, p patches, d model width.
"""

from mm.adapters.cross_attention import CrossAttention, GatedCrossAttentionBlock, VisionKV
from mm.adapters.speech_adapter import SpeechAdapter, SpeechAdapterConfig, num_audio_tokens, splice_audio
from mm.adapters.temporal_aggregator import TemporalAggregator, default_aggregator_ffn_dim

__all__ = [
    "CrossAttention",
    "GatedCrossAttentionBlock",
    "SpeechAdapter",
    "SpeechAdapterConfig",
    "TemporalAggregator",
    "VisionKV",
    "default_aggregator_ffn_dim",
    "num_audio_tokens",
    "splice_audio",
]
