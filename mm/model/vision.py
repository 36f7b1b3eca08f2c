"""The image path of the multimodal model (Llama 3 paper, section 7.2).

Shapes: b batch, r rows that see at least one image, n images per sample, t tiles per image, p
tokens per tile, m vision tokens per row (n t p), s text tokens, d model width, kvh key/value
heads, hd head dim.

Images are encoded (image encoder, then the projector to the backbone's width) only for the rows
whose text can see one; each image block projects the vision tokens to its keys and values once,
and generation reuses them for every decoded token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from mm.adapters.cross_attention import VisionKV

__all__ = ["VisionState", "image_state", "token_mask"]


@dataclass
class VisionState:
    """Vision tokens of one batch, turned into every block's keys/values once.

    Attributes:
        rows: batch rows that carry at least one visible image (or video) ``[r]``.
        kv: one ``(keys, values)`` pair ``[r, kvh, m, hd]`` per block.
        tokens_per_tile: ``p`` (a video's tokens for videos), to expand a ``[.., n, t]`` mask to ``[.., m]``.
        all_rows: every row of the batch is in ``rows``.
    """

    rows: torch.Tensor
    kv: list[VisionKV]
    tokens_per_tile: int
    all_rows: bool


def visible_rows(cross_attention_mask: torch.Tensor) -> torch.Tensor:
    """``[r]`` indices of the rows of a ``[b, s, ...]`` mask in which some token sees something."""
    return cross_attention_mask.flatten(1).bool().any(dim=1).nonzero().squeeze(1)


def image_state(
    model,
    pixel_values: torch.Tensor | None,
    aspect_ratio_ids: torch.Tensor | None,
    aspect_ratio_mask: torch.Tensor | None,
    cross_attention_mask: torch.Tensor | None,
    *,
    force: bool = False,
) -> VisionState | None:
    """Encode the images of the rows that can see one and project every image block's keys/values.

    ``None`` when no row sees an image, unless ``force`` (FSDP: every rank must call the same
    sharded modules), which encodes row 0: its tokens see no image, so the blocks give it back
    unchanged.
    """
    if pixel_values is None:
        return None
    if cross_attention_mask is None or aspect_ratio_ids is None:
        raise ValueError("pixel_values need aspect_ratio_ids and cross_attention_mask")
    b, n, t = pixel_values.shape[:3]
    if cross_attention_mask.shape[0] != b or cross_attention_mask.shape[2:] != (n, t):
        raise ValueError(
            f"cross_attention_mask has shape {tuple(cross_attention_mask.shape)}; "
            f"expected [b={b}, s, n={n}, t={t}]"
        )
    if aspect_ratio_mask is None:
        aspect_ratio_mask = torch.ones(b, n, t, dtype=torch.long, device=pixel_values.device)
    rows = visible_rows(cross_attention_mask)  # [r]
    if rows.numel() == 0:
        if not force:
            return None
        rows = rows.new_zeros(1)
    all_rows = rows.numel() == b
    if not all_rows:
        pixel_values, aspect_ratio_ids, aspect_ratio_mask = (
            pixel_values[rows],
            aspect_ratio_ids[rows],
            aspect_ratio_mask[rows],
        )
    tokens = model.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)  # [r, n, t, p, d]
    tokens_per_tile = tokens.shape[3]
    tokens = rearrange(tokens, "r n t p d -> r (n t p) d").to(model.dtype)  # [r, m, d]
    kv = [block.project_kv(tokens) for block in model.image_blocks]
    return VisionState(rows=rows, kv=kv, tokens_per_tile=tokens_per_tile, all_rows=all_rows)


def token_mask(cross_attention_mask: torch.Tensor, state: VisionState) -> torch.Tensor:
    """``[b, s, n, t]`` (or a video's ``[b, s, v]``) 0/1 mask to the boolean ``[r, s, m]`` mask of the
    rows in ``state``."""
    if cross_attention_mask.ndim == 3:
        cross_attention_mask = cross_attention_mask[..., None]  # videos: one "tile" per video
    mask = cross_attention_mask if state.all_rows else cross_attention_mask[state.rows]
    r, s, n, t = mask.shape
    mask = mask.bool()[..., None].expand(r, s, n, t, state.tokens_per_tile)
    return mask.reshape(r, s, n * t * state.tokens_per_tile)  # [r, s, m]
