"""The video path of the multimodal model (Llama 3 paper, section 7.2).

Shapes: b batch, r rows that carry a visible video, v videos per sample, f frames, f' = f / g
aggregated frames, g frames merged into one, t tiles, p tokens per tile, d model width, s tokens.

Every frame goes through the image encoder and its projector (frozen in the video stage, so they
run without building a graph); the temporal aggregator — a perceiver resampler — merges each group
of ``g`` consecutive frames into one; the video cross-attention blocks, zero-gated like the image
ones, attend from text tokens to the aggregated tokens of the videos their ``<|video|>``
placeholder lets them see. Frame features can also come from disk (``mm data cache-features``):
then the encoder does not run at all.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from mm.adapters.cross_attention import GatedCrossAttentionBlock
from mm.adapters.temporal_aggregator import TemporalAggregator, default_aggregator_ffn_dim
from mm.datasets.inputs import VideoInputs
from mm.model.config import ModelConfig
from mm.model.vision import VisionState, visible_rows

__all__ = ["build_video_modules", "encode_video_frames", "video_state", "video_tokens"]


def build_video_modules(config: ModelConfig) -> tuple[TemporalAggregator, nn.ModuleList]:
    """The temporal aggregator and one zero-gated cross-attention block per video layer."""
    text, video = config.text, config.video
    aggregator = TemporalAggregator(
        dim=text.embed_dim,
        num_heads=video.num_heads or text.num_heads,
        group_size=video.group_size,
        num_layers=video.num_layers,
        ffn_dim=video.ffn_dim or default_aggregator_ffn_dim(text.embed_dim),
        norm_eps=text.norm_eps,
    )
    blocks = nn.ModuleList(
        GatedCrossAttentionBlock(
            dim=text.embed_dim,
            num_heads=text.num_heads,
            num_kv_heads=text.num_kv_heads,
            head_dim=text.head_dim,
            intermediate_dim=config.cross_attention_intermediate_dim,
            norm_eps=text.norm_eps,
        )
        for _ in video.cross_attention_layers
    )
    return aggregator, blocks


def encode_video_frames(
    model, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor | None
) -> torch.Tensor:
    """Per-frame visual tokens ``[b, v, f, t, p, d]`` of ``pixel_values [b, v, f, t, 3, H, W]``.

    Frames are images to the encoder: the ``v`` videos' frames form the batch, each frame one image
    with the video's aspect ratio.
    """
    b, v, f, t = pixel_values.shape[:4]
    if aspect_ratio_mask is None:
        aspect_ratio_mask = torch.ones(b, v, t, dtype=torch.long, device=pixel_values.device)
    frames = rearrange(pixel_values, "b v f t c h w -> (b v) f t c h w")
    ids = aspect_ratio_ids.reshape(b * v, 1).expand(b * v, f)  # [(b v), f]
    masks = aspect_ratio_mask.reshape(b * v, 1, t).expand(b * v, f, t)  # [(b v), f, t]
    tokens = model.encode_images(frames, ids, masks)  # [(b v), f, t, p, d]
    return rearrange(tokens, "(b v) f t p d -> b v f t p d", b=b)


def video_tokens(model, frame_tokens: torch.Tensor, group_size: int | None = None) -> torch.Tensor:
    """Aggregate ``[b, v, f, t, p, d]`` frame tokens into cross-attention tokens ``[b, v, f' t p, d]``."""
    b, v = frame_tokens.shape[:2]
    merged = model.video_aggregator(
        rearrange(frame_tokens, "b v f t p d -> (b v) f t p d"), group_size=group_size
    )  # [(b v), f', t, p, d]
    return rearrange(merged, "(b v) g t p d -> b v (g t p) d", b=b)


def video_state(model, video: VideoInputs | None) -> VisionState | None:
    """Aggregate the frames of the rows that can see a video; project every video block's keys/values.

    Cached frame tokens (``video.features``) replace the pixels and skip the image encoder.
    ``None`` when there are no videos or no row sees one.
    """
    if video is None:
        return None
    if model.video_aggregator is None:
        raise ValueError("this model has no video adapter")
    rows = visible_rows(video.cross_attention_mask)  # [r]
    if rows.numel() == 0:
        return None
    all_rows = rows.numel() == video.cross_attention_mask.shape[0]
    if video.features is not None:
        frames = video.features if all_rows else video.features[rows]
    else:
        pick = (lambda x: x) if all_rows else (lambda x: None if x is None else x[rows])
        frames = encode_video_frames(
            model, pick(video.pixel_values), pick(video.aspect_ratio_ids), pick(video.aspect_ratio_mask)
        )  # [r, v, f, t, p, d]
    tokens = video_tokens(model, frames.to(model.dtype), video.group_size)  # [r, v, m_v, d]
    per_video = tokens.shape[2]
    tokens = tokens.flatten(1, 2)  # [r, v m_v, d]
    kv = [block.project_kv(tokens) for block in model.video_blocks]
    return VisionState(rows=rows, kv=kv, tokens_per_tile=per_video, all_rows=all_rows)
