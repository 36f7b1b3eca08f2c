"""Packed training batches: several samples in one row, each seeing only itself.

Shapes: b rows, s tokens per row, n images per row, t tiles per image, v videos per row, N samples.

Fine-tuning data have very uneven lengths; padding every sample of a batch to the longest wastes
most of the batch. Packing puts several whole samples into one row of at most ``max_len`` tokens
and tells the model where each begins (``sequence_ids``):

* self-attention is block-diagonal and causal, and positions restart at 0 for each sample
  (:meth:`mm.text_backbone.TextBackbone.prepare`);
* a row's image list is its samples' images in order, and ``cross_attention_mask`` lets each
  sample's tokens see only its own images, under the preprocessor's own rule (``all_previous`` or
  ``most_recent``) applied to that sample alone; videos likewise;
* no token is a next-token target of the previous sample's last token.

So a packed sample gets the loss and gradients it gets alone (within floating-point rounding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mm.datasets.cross_attention_mask import cross_attention_mask
from mm.datasets.preprocessing import EncodedSample, Preprocessor
from mm.model.multimodal import label_targets
from mm.text_backbone.chat_format import IGNORE_INDEX

__all__ = ["collate_packed", "pack_samples", "per_sample_losses"]


def pack_samples(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Group samples into rows of at most ``max_len`` tokens, first-fit decreasing.

    Samples are taken longest first (ties in input order) and each goes into the first row with
    room for it, else a new row. Samples are never split.

    Args:
        lengths: token count of each sample (``len(sample.ids)``).
        max_len: the row length.

    Returns:
        Rows of sample indices into ``lengths``; every index appears exactly once.

    Raises:
        ValueError: a sample is longer than ``max_len`` or empty, or ``max_len < 1``.
    """
    if max_len < 1:
        raise ValueError(f"max_len must be at least 1, got {max_len}")
    for i, n in enumerate(lengths):
        if not 1 <= n <= max_len:
            raise ValueError(f"sample {i} has {n} tokens; packing needs 1..max_len={max_len}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(max_len - n)
    return rows


def _merge(samples: Sequence[EncodedSample]) -> EncodedSample:
    """One sample holding ``samples`` back to back (tokens, labels and media in order)."""
    return EncodedSample(
        ids=[t for s in samples for t in s.ids],
        labels=[t for s in samples for t in s.labels],
        images=[x for s in samples for x in s.images],
        videos=[x for s in samples for x in s.videos],
        audios=[x for s in samples for x in s.audios],
    )


def collate_packed(
    preprocessor: Preprocessor, samples: Sequence[EncodedSample], rows: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """The keyword arguments of ``model(**batch)`` for packed ``rows`` of ``samples``.

    Media tensors are the padded collator's (:meth:`Preprocessor.collate` of each row's samples
    joined into one); then each sample's own cross-attention masks replace the joined ones.

    Args:
        preprocessor: the stage's preprocessor (tokenizer, image settings, mask rule).
        samples: the encoded samples.
        rows: sample indices per row, e.g. from :func:`pack_samples`.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` and ``sequence_ids`` ``[b, s]`` (the sample's
        index in ``samples``; ``-1`` on the padding at the end of a row), plus ``pixel_values`` …
        ``cross_attention_mask [b, s, n, t]``, ``video`` and ``audio`` when the samples have them.
        No ``attention_mask``: ``sequence_ids`` says which tokens see which.
    """
    seen = sorted(i for row in rows for i in row)
    if seen != list(range(len(samples))):
        raise ValueError("rows must hold every sample index exactly once")
    batch = preprocessor.collate([_merge([samples[i] for i in row]) for row in rows])
    batch.pop("attention_mask")
    ids = batch["input_ids"]
    sequence_ids = torch.full_like(ids, -1)
    position_ids = torch.zeros_like(ids)
    labels = batch["labels"]
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = len(samples[i].ids)
            sequence_ids[r, start : start + n] = i
            position_ids[r, start : start + n] = torch.arange(n)
            # Never a target: alone, a sample's first label is shifted out too.
            labels[r, start] = IGNORE_INDEX
            start += n
    batch.update(sequence_ids=sequence_ids, position_ids=position_ids)
    mode = preprocessor.mask_mode
    if "cross_attention_mask" in batch:
        batch["cross_attention_mask"] = _own_media_mask(
            batch["cross_attention_mask"], samples, rows, "images", preprocessor.tokenizer.image_id, mode
        )
    if "video" in batch:
        video = batch["video"]
        xmask = _own_media_mask(
            video.cross_attention_mask[..., None],
            samples,
            rows,
            "videos",
            preprocessor.tokenizer.video_id,
            mode,
        )[..., 0]
        batch["video"] = dataclasses.replace(video, cross_attention_mask=xmask)
    return batch


def _own_media_mask(
    joined: torch.Tensor,
    samples: Sequence[EncodedSample],
    rows: Sequence[Sequence[int]],
    kind: str,
    media_token_id: int,
    mode: str,
) -> torch.Tensor:
    """``[b, s, n, t]`` mask in which each sample's tokens see only its own media.

    ``joined`` is the mask of the rows' joined samples; a placeholder always sees its own media
    item, so the tile count of each item is read there.
    """
    out = torch.zeros_like(joined)
    max_tiles = joined.shape[-1]
    for r, row in enumerate(rows):
        start, first = 0, 0
        for i in row:
            sample = samples[i]
            count = len(getattr(sample, kind))
            if count:
                where = [start + p for p, tok in enumerate(sample.ids) if tok == media_token_id]
                tiles = [int(joined[r, p, first + k].sum()) for k, p in enumerate(where[:count])]
                own = cross_attention_mask(
                    sample.ids, tiles, media_token_id=media_token_id, max_tiles=max_tiles, mode=mode
                )  # [len, count, t]
                out[r, start : start + len(sample.ids), first : first + count] = own.to(out.dtype)
            start += len(sample.ids)
            first += count
    return out


def per_sample_losses(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy and labelled-token count of every sample of a batch.

    Args:
        model: a :class:`~mm.MultimodalModel`.
        batch: a packed batch (:func:`collate_packed`; samples numbered by ``sequence_ids``) or a
            padded one (:meth:`Preprocessor.collate`; sample ``i`` is row ``i``).

    Returns:
        ``loss_sums [N]`` (float32, differentiable) and ``counts [N]``.
    """
    labels = batch["labels"]
    sequence_ids = batch.get("sequence_ids")
    owner = (
        sequence_ids
        if sequence_ids is not None
        else torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    )  # [b, s]
    num = int(owner.max()) + 1
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    hidden = out.hidden  # [b, s, d]
    targets, keep = label_targets(labels, owner)  # [b, s-1]
    logits = out.head(hidden[:, :-1][keep]).float()  # [count, V]
    losses = F.cross_entropy(logits, targets[keep], reduction="none")
    who = owner[:, 1:][keep]
    sums = losses.new_zeros(num).index_add(0, who, losses)
    counts = torch.zeros(num, dtype=torch.long, device=labels.device).index_add(0, who, torch.ones_like(who))
    return sums, counts
