"""Everything between a conversation and the model's input tensors, saved with the model.

Shapes: b batch, s tokens, n images per sample, t tiles per image.

A :class:`Preprocessor` bundles the tokenizer, the image processor (tile size, tiles, normalisation),
the cross-attention mask policy and the length limit. Training collation, ``model.chat``, ``mm ask``
and ``mm serve`` all use the one saved with the model, so training and serving never disagree.

Conversations are Llama 3 chat messages whose media parts carry the media themselves:
``{"type": "image", "image": <PIL image | path | bytes>}``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mm.datasets.cross_attention_mask import MASK_MODES, batch_cross_attention_mask
from mm.datasets.image_processing import ImageProcessor
from mm.datasets.images import load_image
from mm.text_backbone.chat_format import IGNORE_INDEX, format_chat, labels_from
from mm.text_backbone.tokenizer import Tokenizer, load_tokenizer

__all__ = ["EncodedSample", "Preprocessor", "SampleTooLong"]


class SampleTooLong(ValueError):
    """A sample has more tokens than ``max_seq_len`` (it is skipped, never cut through an image)."""


@dataclass
class EncodedSample:
    """One tokenised conversation: ids, labels (``-100`` where nothing is learned) and its images."""

    ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)


def _media(messages: Sequence[Mapping[str, Any]], kind: str) -> list[Any]:
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            out.extend(
                part.get(kind) for part in content if isinstance(part, Mapping) and part.get("type") == kind
            )
    return out


class Preprocessor:
    """Tokenizer + image processor + mask policy + length limit.

    Args:
        tokenizer: any mm tokenizer; its ``image_id`` must be the model's ``<|image|>`` id.
        image_processor: tiling and normalisation of images (``None`` for text-only models).
        mask_mode: ``"all_previous"`` (a token sees every earlier image) or ``"most_recent"``.
        max_seq_len: longer samples are refused with :class:`SampleTooLong`.
        max_images: images allowed in one sample.
        encoder_tiles: ``(max_tiles, aspect_ratios)`` of the image encoder when it differs from the
            processor's (a stage at lower resolution): batches are padded to the encoder's tile count
            and aspect-ratio ids renumbered into the encoder's list.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        image_processor: ImageProcessor | None = None,
        *,
        mask_mode: str = "all_previous",
        max_seq_len: int = 2048,
        max_images: int = 16,
        encoder_tiles: tuple[int, Sequence[Sequence[int]]] | None = None,
    ) -> None:
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.mask_mode = mask_mode
        self.max_seq_len = max_seq_len
        self.max_images = max_images
        self.encoder_tiles = None
        if encoder_tiles is not None:
            self.encoder_tiles = (
                int(encoder_tiles[0]),
                tuple(tuple(int(v) for v in r) for r in encoder_tiles[1]),
            )
        self.skipped: Counter[str] = Counter()

    # ------------------------------------------------------------------ settings
    def settings(self) -> dict[str, Any]:
        return {
            "image": None if self.image_processor is None else self.image_processor.to_dict(),
            "mask_mode": self.mask_mode,
            "max_seq_len": self.max_seq_len,
            "max_images": self.max_images,
            "encoder_tiles": None
            if self.encoder_tiles is None
            else [self.encoder_tiles[0], [list(r) for r in self.encoder_tiles[1]]],
        }

    def with_settings(self, **changes: Any) -> Preprocessor:
        """A copy with other settings (a stage's resolution or length), sharing the tokenizer."""
        s = {**self.settings(), **changes}
        image = s["image"]
        proc = ImageProcessor.from_dict(image) if isinstance(image, Mapping) else image
        return Preprocessor(
            self.tokenizer,
            proc,
            mask_mode=s["mask_mode"],
            max_seq_len=s["max_seq_len"],
            max_images=s["max_images"],
            encoder_tiles=s["encoder_tiles"],
        )

    def save(self, directory: str | os.PathLike) -> dict[str, Any]:
        """Write the tokenizer's files into ``directory``; return the settings for ``config.json``."""
        self.tokenizer.save(directory)
        return self.settings()

    @classmethod
    def load(cls, directory: str | os.PathLike, settings: Mapping[str, Any]) -> Preprocessor:
        """The preprocessor saved by :meth:`save` (strict: unknown settings are errors)."""
        known = {"image", "mask_mode", "max_seq_len", "max_images", "encoder_tiles"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise ValueError(f"unknown preprocessing settings {unknown}")
        image = settings.get("image")
        return cls(
            load_tokenizer(Path(directory)),
            None if image is None else ImageProcessor.from_dict(image),
            mask_mode=settings.get("mask_mode", "all_previous"),
            max_seq_len=int(settings.get("max_seq_len", 2048)),
            max_images=int(settings.get("max_images", 16)),
            encoder_tiles=settings.get("encoder_tiles"),
        )

    # ------------------------------------------------------------------ one sample
    def encode(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False
    ) -> EncodedSample:
        """Tokenise a conversation; images are decoded here so a bad one fails this sample only.

        Raises:
            SampleTooLong: more than ``max_seq_len`` tokens.
            ValueError: malformed messages, too many images, or an image that cannot be decoded.
        """
        chat = format_chat(self.tokenizer, messages, add_generation_prompt=add_generation_prompt)
        if len(chat.ids) > self.max_seq_len:
            raise SampleTooLong(f"{len(chat.ids)} tokens > max_seq_len {self.max_seq_len}")
        unsupported = sorted({kind for kind in chat.media if kind != "image"})
        if unsupported:
            raise ValueError(f"this preprocessor takes images only, not {unsupported}")
        images = _media(messages, "image")
        if images and self.image_processor is None:
            raise ValueError("this model takes no images")
        if len(images) > self.max_images:
            raise ValueError(f"{len(images)} images in one sample; the limit is {self.max_images}")
        max_pixels = self.image_processor.max_image_pixels if images else 0
        decoded = [load_image(im, max_pixels=max_pixels) for im in images]
        return EncodedSample(ids=chat.ids, labels=labels_from(chat), images=decoded)

    def encode_or_skip(self, messages: Sequence[Mapping[str, Any]]) -> EncodedSample | None:
        """:meth:`encode` for training streams: a too-long sample is counted in ``skipped`` and dropped."""
        try:
            return self.encode(messages)
        except SampleTooLong:
            self.skipped["too long"] += 1
            return None

    # ------------------------------------------------------------------ batches
    def collate(
        self, samples: Sequence[EncodedSample], *, padding_side: str = "right"
    ) -> dict[str, torch.Tensor]:
        """Pad a batch: ``input_ids``, ``attention_mask``, ``labels`` ``[b, s]`` and, when any sample
        has images, ``pixel_values [b, n, t, 3, H, W]``, ``aspect_ratio_ids``, ``aspect_ratio_mask``
        and ``cross_attention_mask [b, s, n, t]``. Any number of images per sample, including none."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        width = max(len(s.ids) for s in samples)
        pad = self.tokenizer.pad_id
        ids = torch.full((len(samples), width), pad, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(len(samples), width, dtype=torch.long)
        for i, s in enumerate(samples):
            sl = slice(0, len(s.ids)) if padding_side == "right" else slice(width - len(s.ids), width)
            ids[i, sl] = torch.tensor(s.ids)
            labels[i, sl] = torch.tensor(s.labels)
            mask[i, sl] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if any(s.images for s in samples):
            proc = self.image_processor([s.images for s in samples])
            pixels, ratio_ids, ratio_mask = proc.pixel_values, proc.aspect_ratio_ids, proc.aspect_ratio_mask
            tiles = self.image_processor.max_tiles
            if self.encoder_tiles is not None:
                tiles, ratio_ids, pixels, ratio_mask = self._to_encoder_tiles(ratio_ids, pixels, ratio_mask)
            batch.update(
                pixel_values=pixels,
                aspect_ratio_ids=ratio_ids,
                aspect_ratio_mask=ratio_mask,
                cross_attention_mask=batch_cross_attention_mask(
                    [s.ids for s in samples],
                    proc.num_tiles,
                    media_token_id=self.tokenizer.image_id,
                    max_tiles=tiles,
                    length=width,
                    padding_side=padding_side,
                    mode=self.mask_mode,
                ),
            )
        return batch

    def _to_encoder_tiles(self, ratio_ids, pixels, ratio_mask):
        """Pad ``[b, n, t, ...]`` to the encoder's tiles and renumber aspect-ratio ids into its list."""
        max_tiles, ratios = self.encoder_tiles
        own = self.image_processor.supported_aspect_ratios
        lookup = torch.zeros(len(own) + 1, dtype=torch.long)
        for i, r in enumerate(own):
            if tuple(r) not in ratios:
                raise ValueError(f"tile grid {tuple(r)} is not supported by the image encoder ({ratios})")
            lookup[i + 1] = ratios.index(tuple(r)) + 1
        extra = max_tiles - pixels.shape[2]
        if extra < 0:
            raise ValueError(
                f"{pixels.shape[2]} tiles per image; the image encoder takes at most {max_tiles}"
            )
        if extra:
            pixels = torch.nn.functional.pad(pixels, (0, 0, 0, 0, 0, 0, 0, extra))
            ratio_mask = torch.nn.functional.pad(ratio_mask, (0, extra))
        return max_tiles, lookup[ratio_ids], pixels, ratio_mask

    def prompts(self, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, torch.Tensor]:
        """Left-padded generation inputs for conversations that end with a user turn."""
        samples = [self.encode(c, add_generation_prompt=True) for c in conversations]
        batch = self.collate(samples, padding_side="left")
        batch.pop("labels")
        return batch
