"""Continuous batching: requests decode together one token per step, joining and leaving between steps.

Shapes: B rows decoding, b rows joining, s prompt tokens, L cache slots, r rows that see media, M
vision tokens per row (padded to the longest row's), V vocabulary, kvh key/value heads, hd head dim.

A :class:`DecodeBatch` holds the rows that decode together. :meth:`DecodeBatch.join` prefills new
requests (their images and videos encoded, every block's cross-attention keys/values projected once,
their speech spliced in) as a group of their own and appends them to the running rows: their
KV cache rows are right-aligned with the others' (:meth:`~mm.text_backbone.KVCache.join`), their
vision keys/values padded to the batch's longest. :meth:`DecodeBatch.step` feeds every row its
last token and samples the next; :meth:`DecodeBatch.leave` drops rows (finished, or their client
went away) at once, so their slots serve the next request.

A row computes what it computes alone: its tokens' positions are its own (padding slots before
them are masked), its decoded tokens see exactly the media its prompt's last token saw, and each
row samples with its own settings (temperature, top-p, its own seeded generator). Greedy rows
therefore decode the tokens they decode alone, up to floating-point differences between batch
shapes, which change a token only at an exact tie.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mm.adapters.cross_attention import VisionKV
from mm.model.video import video_state
from mm.model.vision import VisionState, image_state, token_mask
from mm.text_backbone import KVCache
from mm.text_backbone.generation import sample_next

__all__ = ["DecodeBatch", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """How one row picks its tokens: greedy at ``temperature == 0``, else nucleus sampling, with a
    generator of its own when ``seed`` is given."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class _Cross:
    """The media one kind of cross-attention block sees while decoding.

    Attributes:
        rows: batch rows with media ``[r]``.
        kv: per block, keys and values ``[r, kvh, M, hd]`` (zeros past a row's own tokens).
        mask: ``[r, 1, M]``, the media tokens a decoded token of each row sees.
    """

    rows: torch.Tensor
    kv: list[VisionKV]
    mask: torch.Tensor

    @classmethod
    def of(cls, state: VisionState | None, last_row: torch.Tensor | None) -> _Cross | None:
        """From a prefill's state and the cross-attention mask row of its prompts' last token."""
        if state is None:
            return None
        return cls(rows=state.rows, kv=state.kv, mask=token_mask(last_row, state))

    def state(self, batch_size: int) -> VisionState:
        return VisionState(
            rows=self.rows, kv=self.kv, tokens_per_tile=1, all_rows=self.rows.numel() == batch_size
        )


def _pad_tokens(t: torch.Tensor, m: int) -> torch.Tensor:
    """Pad dimension 2 (media tokens) of ``t`` with zeros (or False) to ``m``."""
    extra = m - t.shape[2]
    if extra == 0:
        return t
    return F.pad(t, (0, 0, 0, extra)) if t.ndim == 4 else F.pad(t, (0, extra))


def _concat(a: _Cross | None, b: _Cross | None, offset: int) -> _Cross | None:
    """``a``'s rows, then ``b``'s rows shifted by ``offset`` (``b`` belongs to rows joining after ``a``'s)."""
    if b is None:
        return a
    b = _Cross(rows=b.rows + offset, kv=b.kv, mask=b.mask)
    if a is None:
        return b
    m = max(a.mask.shape[-1], b.mask.shape[-1])
    kv = [
        (
            torch.cat([_pad_tokens(ka, m), _pad_tokens(kb, m)]),
            torch.cat([_pad_tokens(va, m), _pad_tokens(vb, m)]),
        )
        for (ka, va), (kb, vb) in zip(a.kv, b.kv)
    ]
    mask = torch.cat([_pad_tokens(a.mask, m), _pad_tokens(b.mask, m)])
    return _Cross(rows=torch.cat([a.rows, b.rows]), kv=kv, mask=mask)


def _select(c: _Cross | None, keep: torch.Tensor) -> _Cross | None:
    """The rows of ``c`` among batch rows ``keep`` (sorted), renumbered to their places in ``keep``."""
    if c is None:
        return None
    kept = torch.isin(c.rows, keep)
    if not bool(kept.any()):
        return None
    return _Cross(
        rows=torch.searchsorted(keep, c.rows[kept]),
        kv=[(k[kept], v[kept]) for k, v in c.kv],
        mask=c.mask[kept],
    )


class DecodeBatch:
    """The rows decoding together (see the module docstring).

    Args:
        model: a :class:`~mm.model.MultimodalModel`.
    """

    def __init__(self, model) -> None:
        self.model = model
        self.keys: list[Hashable] = []
        self.cache: KVCache | None = None
        self.vision: _Cross | None = None
        self.video: _Cross | None = None
        self.sampling: list[Sampling] = []
        self.generators: list[torch.Generator | None] = []
        self.next_tokens: torch.Tensor | None = None  # [B]: what each row feeds at the next step

    def __len__(self) -> int:
        return len(self.keys)

    # ------------------------------------------------------------------ joining
    @torch.inference_mode()
    def join(
        self, keys: Sequence[Hashable], batch: dict[str, Any], sampling: Sequence[Sampling]
    ) -> list[int]:
        """Prefill new requests and add them to the batch; returns each one's first token.

        Args:
            keys: one per request, unique in the batch.
            batch: their prompts as :meth:`~mm.datasets.preprocessing.Preprocessor.collate` pads them
                on the left (``labels`` dropped), on the model's device.
            sampling: one per request.
        """
        model = self.model
        input_ids = batch["input_ids"]
        attention_mask = batch.get("attention_mask")
        cross_mask = batch.get("cross_attention_mask")
        video = batch.get("video")
        vision = image_state(
            model,
            batch.get("pixel_values"),
            batch.get("aspect_ratio_ids"),
            batch.get("aspect_ratio_mask"),
            cross_mask,
        )
        videos = video_state(model, video)
        cache = model.backbone.new_cache(input_ids.shape[0], input_ids.shape[1])
        embeds = model.input_embeddings(input_ids, batch.get("audio"))
        h, ctx = model.backbone.prepare(
            input_ids=input_ids if embeds is None else None,
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            cache=cache,
        )
        h = model.run_layers(
            h,
            ctx,
            vision=vision,
            cross_attention_mask=cross_mask,
            video=videos,
            video_cross_attention_mask=None if video is None else video.cross_attention_mask,
            last_only=True,
        )
        generators = [
            None
            if s.seed is None or s.temperature == 0
            else torch.Generator(input_ids.device).manual_seed(s.seed)
            for s in sampling
        ]
        first = self._sample(h[:, -1], list(sampling), generators)
        offset = len(self.keys)
        self.vision = _concat(
            self.vision, _Cross.of(vision, None if cross_mask is None else cross_mask[:, -1:]), offset
        )
        self.video = _concat(
            self.video,
            _Cross.of(videos, None if video is None else video.cross_attention_mask[:, -1:]),
            offset,
        )
        if self.cache is None:
            self.cache = cache
        else:
            self.cache.join(cache)
        self.keys += list(keys)
        self.sampling += list(sampling)
        self.generators += generators
        self.next_tokens = first if self.next_tokens is None else torch.cat([self.next_tokens, first])
        return first.tolist()

    # ------------------------------------------------------------------ decoding
    @torch.inference_mode()
    def step(self) -> list[int]:
        """Feed every row its pending token; returns each row's next token (in row order)."""
        if not self.keys:
            return []
        model, cache = self.model, self.cache
        b = len(self.keys)
        cache.ensure_capacity(cache.length + 1)
        attention_mask = torch.cat(
            [cache.valid[:, : cache.length], torch.ones(b, 1, dtype=torch.bool, device=cache.valid.device)],
            dim=1,
        ).long()
        ids = self.next_tokens[:, None]  # [B, 1]
        h, ctx = model.backbone.prepare(input_ids=ids, attention_mask=attention_mask, cache=cache)
        vision = None if self.vision is None else self.vision.state(b)
        video = None if self.video is None else self.video.state(b)
        h = model.run_layers(
            h,
            ctx,
            vision=vision,
            video=video,
            vision_mask=None if vision is None else self.vision.mask,
            video_mask=None if video is None else self.video.mask,
        )
        self.next_tokens = self._sample(h[:, -1], self.sampling, self.generators)
        return self.next_tokens.tolist()

    def _sample(
        self, h: torch.Tensor, sampling: list[Sampling], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Each row's token from its last hidden state ``[n, d]``, with its own sampling settings."""
        backbone = self.model.backbone
        if all(s.temperature == 0 for s in sampling):
            return backbone.greedy_head(h).argmax(dim=-1)
        logits = backbone.head(h)  # [n, V]
        tokens = logits.argmax(dim=-1)
        for i, (s, g) in enumerate(zip(sampling, generators)):
            if s.temperature > 0:
                tokens[i] = sample_next(
                    logits[i : i + 1], temperature=s.temperature, top_p=s.top_p, generator=g
                )[0]
        return tokens

    # ------------------------------------------------------------------ leaving
    def leave(self, keys: Sequence[Hashable]) -> None:
        """Drop the rows of ``keys``; their slots are free at once."""
        gone = set(keys)
        if not gone:
            return
        keep_list = [i for i, k in enumerate(self.keys) if k not in gone]
        if not keep_list:
            self.__init__(self.model)
            return
        keep = torch.tensor(keep_list, device=self.next_tokens.device)
        self.cache.select_rows(keep)
        self.cache.compact()
        self.vision = _select(self.vision, keep)
        self.video = _select(self.video, keep)
        self.keys = [self.keys[i] for i in keep_list]
        self.sampling = [self.sampling[i] for i in keep_list]
        self.generators = [self.generators[i] for i in keep_list]
        self.next_tokens = self.next_tokens[keep]
