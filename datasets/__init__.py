"""Data for mm: image tiling, the cross-attention mask, video and audio decoding, webdataset shards,
the preprocessor (conversation -> model inputs, saved with a model) and the media parts of messages.

Shape legend: b batch, s text tokens, n images, t tiles, f frames.

Names are imported on first use: decoding images, video and audio pulls in torchvision,
torchaudio and PyAV, which code that only needs a model should not pay for.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AudioConfig": "mm.datasets.audio",
    "AudioError": "mm.datasets.audio",
    "AudioInputs": "mm.datasets.inputs",
    "AudioTokens": "mm.datasets.preprocessing",
    "EncodedSample": "mm.datasets.preprocessing",
    "Preprocessor": "mm.datasets.preprocessing",
    "SampleTooLong": "mm.datasets.preprocessing",
    "VideoInputs": "mm.datasets.inputs",
    "CLIP_MEAN": "mm.datasets.image_processing",
    "CLIP_STD": "mm.datasets.image_processing",
    "DEFAULT_CAPTION_PROMPTS": "mm.datasets.shards",
    "DEFAULT_MAX_IMAGE_PIXELS": "mm.datasets.images",
    "DataCounters": "mm.datasets.webdata",
    "DataError": "mm.datasets.webdata",
    "ImageError": "mm.datasets.images",
    "ImageLike": "mm.datasets.images",
    "ImageProcessor": "mm.datasets.image_processing",
    "MASK_MODES": "mm.datasets.cross_attention_mask",
    "MEDIA_KINDS": "mm.datasets.shards",
    "PackError": "mm.datasets.shards",
    "PackResult": "mm.datasets.shards",
    "ProcessedImages": "mm.datasets.image_processing",
    "SampleError": "mm.datasets.shards",
    "ShardStream": "mm.datasets.webdata",
    "VideoClip": "mm.datasets.video",
    "VideoConfig": "mm.datasets.video",
    "VideoError": "mm.datasets.video",
    "batch_cross_attention_mask": "mm.datasets.cross_attention_mask",
    "cross_attention_mask": "mm.datasets.cross_attention_mask",
    "expand_shards": "mm.datasets.webdata",
    "frames_to_tensor": "mm.datasets.video",
    "load_audio": "mm.datasets.audio",
    "load_image": "mm.datasets.images",
    "load_video": "mm.datasets.video",
    "log_mel": "mm.datasets.audio",
    "normalize_sample": "mm.datasets.webdata",
    "num_frames": "mm.datasets.audio",
    "pack": "mm.datasets.shards",
    "pad_features": "mm.datasets.audio",
    "parse_size": "mm.datasets.shards",
    "stream_samples": "mm.datasets.webdata",
    "supported_aspect_ratios": "mm.datasets.image_processing",
    "visible_spans": "mm.datasets.cross_attention_mask",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mm.datasets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
