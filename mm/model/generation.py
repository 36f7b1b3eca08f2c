"""Generation: decoding with everything that does not change computed once, and the defaults a model
generates with when the caller does not say.

:func:`stream` prefills the prompt — vision and video tokens, every block's cross-attention
keys/values and the spliced speech are computed once — and then decodes one token per step from the
backbone's KV cache; decoded tokens see what the prompt's last token saw (Llama 3 paper, section 7).

:class:`GenerationDefaults`: stop tokens, temperature, top-p, length.

A Hugging Face folder states these in ``generation_config.json`` (Llama 3.2 Vision Instruct: stop at
``<|end_of_text|>``, ``<|eom_id|>`` and ``<|eot_id|>``, sample at temperature 0.6 with top-p 0.9);
Meta's folder only implies the stop tokens (its tokenizer's ``stop_tokens``). They travel with the
model (``config.json``'s ``"generation"`` entry of an mm folder), and ``model.chat`` / ``mm ask``
use them for every option the caller leaves out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mm._strict import check_fields
from mm.datasets.inputs import AudioInputs, VideoInputs
from mm.model.static_decode import StaticDecoder
from mm.model.video import video_state
from mm.model.vision import VisionState, image_state
from mm.text_backbone import KVCache, stream_tokens

__all__ = ["GenerationDefaults", "GenerationState", "stream"]


@dataclass(frozen=True, kw_only=True)
class GenerationDefaults:
    """Generation settings saved with a model.

    Args:
        stop_token_ids: ids that end an answer (``None``: the text config's ``eos_token_ids``, else
            the tokenizer's stop tokens).
        temperature: 0 decodes greedily.
        top_p: nucleus sampling mass, in ``(0, 1]``.
        max_new_tokens: answer length limit (``None``: the caller's default).
    """

    stop_token_ids: tuple[int, ...] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.stop_token_ids is not None:
            ids = tuple(self.stop_token_ids)
            if not ids or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", ids)
        if not (isinstance(self.temperature, int | float) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, int | float) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.max_new_tokens is not None and (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d["stop_token_ids"] is not None:
            d["stop_token_ids"] = list(d["stop_token_ids"])
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationDefaults:
        """Strict inverse of :meth:`to_dict`: unknown keys are an error."""
        return cls(**check_fields(cls, data, "generation settings"))

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> GenerationDefaults:
        """Read a Hugging Face ``generation_config.json`` (as a dict).

        ``do_sample: false`` (or absent, transformers' default) means greedy whatever the
        temperature says, as ``generate`` does.
        """
        eos = config.get("eos_token_id")
        stops = None if eos is None else tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
        sample = bool(config.get("do_sample", False))
        max_new = config.get("max_new_tokens")
        return cls(
            stop_token_ids=stops,
            temperature=float(config.get("temperature", 1.0)) if sample else 0.0,
            top_p=float(config.get("top_p", 1.0)) if sample else 1.0,
            max_new_tokens=None if max_new is None else int(max_new),
        )

    def to_hf(self) -> dict[str, Any]:
        """``generation_config.json`` content transformers reads the same way."""
        out: dict[str, Any] = {"do_sample": self.temperature > 0}
        if self.temperature > 0:
            out.update(temperature=self.temperature, top_p=self.top_p)
        if self.stop_token_ids is not None:
            out["eos_token_id"] = list(self.stop_token_ids)
        if self.max_new_tokens is not None:
            out["max_new_tokens"] = self.max_new_tokens
        return out


@dataclass
class GenerationState:
    """What one request reuses across decoding steps: the KV cache and the vision keys/values.

    Attributes:
        cache: the backbone's KV cache.
        vision: the images' per-block keys/values (``None``: no row sees an image).
        last_mask_row: ``[b, 1, n, t]``, the cross-attention mask of decoded tokens.
        video: the videos' per-block keys/values.
        last_video_row: ``[b, 1, v]``, what decoded tokens see of the videos.
    """

    cache: KVCache
    vision: VisionState | None
    last_mask_row: torch.Tensor | None
    video: VisionState | None = None
    last_video_row: torch.Tensor | None = None


def stream(
    model,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    aspect_ratio_ids: torch.Tensor | None = None,
    aspect_ratio_mask: torch.Tensor | None = None,
    cross_attention_mask: torch.Tensor | None = None,
    video: VideoInputs | None = None,
    audio: AudioInputs | None = None,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_token_ids: tuple[int, ...] | None = None,
    cuda_graph: bool = False,
) -> Iterator[torch.Tensor]:
    """Yield the next token ``[b]`` of each (left-padded) row of ``model`` as it is decoded
    (:meth:`mm.model.MultimodalModel.stream`).

    ``cuda_graph``: decode through :class:`~mm.model.static_decode.StaticDecoder`, one CUDA graph
    launch per token on a GPU; on other devices its fixed-shape step runs eagerly.
    """
    b, s = input_ids.shape
    with torch.inference_mode():
        vision = image_state(model, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask)
        videos = video_state(model, video)
        state = GenerationState(
            cache=model.backbone.new_cache(b, s + max_new_tokens),
            vision=vision,
            last_mask_row=None if vision is None else cross_attention_mask[:, -1:],
            video=videos,
            last_video_row=None if videos is None else video.cross_attention_mask[:, -1:],
        )
        prefill = [True]
        head = model.backbone.greedy_head if temperature == 0 else model.backbone.head
        static: list[StaticDecoder] = []

        def step(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            first = prefill[0]
            prefill[0] = False
            if cuda_graph and not first:
                if not static:
                    graph = input_ids.device.type == "cuda"
                    static.append(StaticDecoder(model, state, mask[:, :s], head, graph=graph))
                return static[0](ids)
            embeds = model.input_embeddings(ids, audio) if first else model.embed(ids)
            h, ctx = model.backbone.prepare(
                input_ids=ids if embeds is None else None,
                inputs_embeds=embeds,
                attention_mask=mask,
                cache=state.cache,
            )
            h = model.run_layers(
                h,
                ctx,
                vision=state.vision,
                cross_attention_mask=cross_attention_mask if first else state.last_mask_row,
                video=state.video,
                video_cross_attention_mask=(
                    None if video is None else video.cross_attention_mask if first else state.last_video_row
                ),
                last_only=True,
            )
            return head(h[:, -1])

        stops = model.stop_token_ids if stop_token_ids is None else stop_token_ids
        yield from stream_tokens(
            step,
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stops,
            pad_token_id=model.config.text.pad_token_id or 0,
        )
