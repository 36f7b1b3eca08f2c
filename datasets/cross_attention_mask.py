"""Which text tokens may look at which image tiles: the ``cross_attention_mask``.

Shapes: b batch, s text tokens, n images (or videos) per sample, t tiles per image.

The mask is built from where the placeholder tokens (``<|image|>``) stand in the token sequence,
in the ``[b, s, n, t]`` 0/1 layout of Hugging Face's Mllama processor. Two policies:

* ``"all_previous"`` (mm's default): a token sees every image whose placeholder stands at or
  before it — later text can still refer back to the first image of a conversation.
* ``"most_recent"``: a token sees only the most recent image (a run of adjacent placeholders
  counts as one group that all following text sees) — the policy of Meta's reference
  (``create_vision_mask``) and of Hugging Face's processor.

Tokens before the first placeholder see nothing; the model then gives them exactly the backbone's
hidden states. Tiles beyond an image's tile count are never visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["MASK_MODES", "batch_cross_attention_mask", "cross_attention_mask", "visible_spans"]

MASK_MODES = ("all_previous", "most_recent")


def visible_spans(
    token_ids: Sequence[int], media_token_id: int, mode: str = "all_previous"
) -> list[tuple[int, int]]:
    """``[start, end)`` token span that sees each placeholder's media, in placeholder order."""
    if mode not in MASK_MODES:
        raise ValueError(f"unknown cross-attention mask mode {mode!r}; use one of {MASK_MODES}")
    positions = [i for i, tok in enumerate(token_ids) if tok == media_token_id]
    length = len(token_ids)
    if mode == "all_previous":
        return [(p, length) for p in positions]
    spans = [[p, q] for p, q in zip(positions, positions[1:] + [length])]
    # Adjacent placeholders form one group: all of them stay visible until the group's span ends.
    end = length
    for span in reversed(spans):
        if span[1] == span[0] + 1:
            span[1] = end
        end = span[1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(
    token_ids: Sequence[int],
    num_tiles: Sequence[int],
    *,
    media_token_id: int,
    max_tiles: int,
    num_media: int | None = None,
    mode: str = "all_previous",
) -> torch.Tensor:
    """The ``[s, n, t]`` 0/1 mask of one sample.

    Args:
        token_ids: the sample's tokens ``s``.
        num_tiles: tiles of each media item, in placeholder order.
        media_token_id: the placeholder id (``<|image|>``).
        max_tiles: ``t``.
        num_media: ``n`` (pads with invisible media slots); defaults to ``len(num_tiles)``.
        mode: ``"all_previous"`` or ``"most_recent"``.
    """
    spans = visible_spans(token_ids, media_token_id, mode)
    if len(spans) != len(num_tiles):
        raise ValueError(
            f"the text has {len(spans)} placeholder tokens (id {media_token_id}) but {len(num_tiles)} media items"
        )
    n = len(num_tiles) if num_media is None else num_media
    if n < len(num_tiles):
        raise ValueError(f"num_media {n} is smaller than the {len(num_tiles)} media items")
    mask = torch.zeros(len(token_ids), n, max_tiles, dtype=torch.long)
    for k, ((start, end), tiles) in enumerate(zip(spans, num_tiles)):
        if not 1 <= tiles <= max_tiles:
            raise ValueError(f"media item {k} has {tiles} tiles; expected 1..{max_tiles}")
        mask[start:end, k, :tiles] = 1
    return mask


def batch_cross_attention_mask(
    batch_ids: Sequence[Sequence[int]],
    batch_tiles: Sequence[Sequence[int]],
    *,
    media_token_id: int,
    max_tiles: int,
    length: int | None = None,
    padding_side: str = "right",
    mode: str = "all_previous",
) -> torch.Tensor:
    """``[b, s, n, t]`` masks of a batch, padded to ``length`` tokens and the largest media count."""
    s = max((len(ids) for ids in batch_ids), default=0) if length is None else length
    n = max((len(t) for t in batch_tiles), default=0)
    out = torch.zeros(len(batch_ids), s, n, max_tiles, dtype=torch.long)
    for i, (ids, tiles) in enumerate(zip(batch_ids, batch_tiles)):
        one = cross_attention_mask(
            ids, tiles, media_token_id=media_token_id, max_tiles=max_tiles, num_media=n, mode=mode
        )
        if padding_side == "right":
            out[i, : len(ids)] = one
        elif padding_side == "left":
            out[i, s - len(ids) :] = one
        else:
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return out
