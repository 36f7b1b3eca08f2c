"""Data for mm: image tiling, the cross-attention mask, video and audio decoding, webdataset shards.

Shape legend: b batch, s text tokens, n images, t tiles, f frames.
"""

from mm.datasets.cross_attention_mask import (
    MASK_MODES,
    batch_cross_attention_mask,
    cross_attention_mask,
    visible_spans,
)
from mm.datasets.image_processing import (
    CLIP_MEAN,
    CLIP_STD,
    ImageProcessor,
    ProcessedImages,
    supported_aspect_ratios,
)
from mm.datasets.images import DEFAULT_MAX_IMAGE_PIXELS, ImageError, ImageLike, load_image
from mm.datasets.shards import (
    DEFAULT_CAPTION_PROMPTS,
    MEDIA_KINDS,
    PackError,
    PackResult,
    SampleError,
    pack,
    parse_size,
)
from mm.datasets.webdata import (
    DataCounters,
    DataError,
    ShardStream,
    expand_shards,
    normalize_sample,
    stream_samples,
)

__all__ = [
    "DEFAULT_CAPTION_PROMPTS",
    "MEDIA_KINDS",
    "DataCounters",
    "DataError",
    "PackError",
    "PackResult",
    "SampleError",
    "ShardStream",
    "expand_shards",
    "normalize_sample",
    "pack",
    "parse_size",
    "stream_samples",
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageError",
    "ImageLike",
    "ImageProcessor",
    "MASK_MODES",
    "ProcessedImages",
    "batch_cross_attention_mask",
    "cross_attention_mask",
    "load_image",
    "supported_aspect_ratios",
    "visible_spans",
]
