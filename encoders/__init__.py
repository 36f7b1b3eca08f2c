"""Encoders: the Llama 3 image encoder (and open_clip / timm backends) and the speech encoder.

Shape legend: b batch, n images, t tiles, p tokens per tile, f frames, d width.
"""

from mm.encoders.best_rq import BestRqHead, BestRqQuantizer, best_rq_loss, mask_features, span_mask
from mm.encoders.conformer import ConformerConfig, ConformerEncoder
from mm.encoders.image_encoder import (
    ImageEncoder,
    ImageEncoderConfig,
    resize_image_encoder,
    resize_patch_grid,
)
from mm.encoders.vision_backends import (
    OpenClipVisionBackend,
    TimmVisionBackend,
    VisionBackend,
    build_image_encoder,
)

__all__ = [
    "BestRqHead",
    "BestRqQuantizer",
    "ConformerConfig",
    "ConformerEncoder",
    "best_rq_loss",
    "mask_features",
    "span_mask",
    "ImageEncoder",
    "ImageEncoderConfig",
    "OpenClipVisionBackend",
    "TimmVisionBackend",
    "VisionBackend",
    "build_image_encoder",
    "resize_image_encoder",
    "resize_patch_grid",
]
