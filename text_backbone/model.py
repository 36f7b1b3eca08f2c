"""The Llama 3 / 3.1 / 3.2 dense decoder that mm keeps frozen.

Shapes: b batch, s new tokens, k keys (past + new), d model width, V vocabulary.

The forward pass is split into three public steps so that a multimodal model can own the loop over
``layers`` and call adapters between them while taking *exactly* the backbone's own path for text:

    h, ctx = backbone.prepare(input_ids=ids)     # embed, positions, masks, cache slots
    for layer in backbone.layers:
        h = layer(h, ctx)
    logits = backbone.head(h)                     # final norm + output projection

``backbone(ids)`` runs exactly those steps.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch
from torch import nn

from mm.text_backbone.config import TextConfig
from mm.text_backbone.digest import state_digest
from mm.text_backbone.generation import stream_tokens
from mm.text_backbone.greedy_head import ScreenedHead
from mm.text_backbone.head_loss import linear_cross_entropy
from mm.text_backbone.kv_cache import KVCache
from mm.text_backbone.layers import AttentionContext, DecoderLayer, RMSNorm
from mm.text_backbone.linear import linear
from mm.text_backbone.rope import rope_cos_sin, rope_frequencies
from mm.text_backbone.unpad import Unpadding

__all__ = ["TextBackbone", "packed_positions"]


def _sample_starts(sequence_ids: torch.Tensor) -> torch.Tensor:
    """``[b, s]`` True where a packed sample starts: the row's first token, or a change of id."""
    starts = torch.ones_like(sequence_ids, dtype=torch.bool)
    starts[:, 1:] = sequence_ids[:, 1:] != sequence_ids[:, :-1]
    return starts


def packed_positions(sequence_ids: torch.Tensor) -> torch.Tensor:
    """Positions ``[b, s]`` that restart at 0 wherever ``sequence_ids [b, s]`` changes along a row."""
    s = sequence_ids.shape[1]
    idx = torch.arange(s, device=sequence_ids.device).expand_as(sequence_ids)  # [b, s]
    first = (
        torch.where(_sample_starts(sequence_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    )  # [b, s]
    return idx - first


class TextBackbone(nn.Module):
    """Llama 3 decoder: token embedding, ``num_layers`` decoder layers, final RMSNorm, output head.

    Args:
        config: sizes (see :class:`~mm.text_backbone.TextConfig`).

    With ``config.tie_embeddings`` there is no ``lm_head`` module: the output projection reuses
    ``embed_tokens.weight``, and the state dict holds that tensor once (as Hugging Face saves it).

    Attributes:
        unpad_padding: run a right-padded batch without a cache as one packed row of its real tokens
            (:mod:`~mm.text_backbone.unpad`): the same values at the real positions, zeros at the
            padding, and no work spent on it. ``False`` computes the padding too (a multimodal
            model follows its backbone's setting).
    """

    unpad_padding: bool = True

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.embed_dim)
        self.layers = nn.ModuleList(
            DecoderLayer(
                dim=config.embed_dim,
                num_heads=config.num_heads,
                num_kv_heads=config.num_kv_heads,
                head_dim=config.head_dim,
                intermediate_dim=config.intermediate_dim,
                norm_eps=config.norm_eps,
                layer_idx=i,
            )
            for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.embed_dim, config.norm_eps)
        self.lm_head = (
            None if config.tie_embeddings else nn.Linear(config.embed_dim, config.vocab_size, bias=False)
        )
        # Not a buffer: `.to(bfloat16)` must never round the frequencies (they are always float32).
        self._inv_freq = rope_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
        # Where the weights were read from ({"path", "format"}), so a multimodal model can refer to
        # its backbone instead of copying it; None for a backbone that was never read from disk.
        self.source: dict[str, str] | None = None

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> TextBackbone:
        """Read a Hugging Face Llama folder or Meta's original layout (see ``mm.text_backbone.checkpoint``).

        The model is built on the meta device and the tensors are assigned, so loading needs the
        memory of one copy of the weights. ``dtype=None`` keeps the checkpoint's dtype.
        """
        from mm.text_backbone.checkpoint import load_backbone

        return load_backbone(cls, path, dtype=dtype, device=device)

    def save_pretrained(
        self, path: str | os.PathLike, *, layout: str = "hf", max_shard_bytes: int = 5 << 30
    ) -> None:
        """Write the Hugging Face layout (``layout="hf"``) or Meta's (``layout="meta"``) to ``path``."""
        from mm.text_backbone.checkpoint import save_backbone

        save_backbone(self, path, layout=layout, max_shard_bytes=max_shard_bytes)

    def freeze(self) -> TextBackbone:
        """Turn off gradients for every weight (the backbone never learns in mm)."""
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def digest(self) -> str:
        """A stable hash of every weight (names, dtypes, shapes and bytes); equal iff the weights are."""
        return state_digest(self.state_dict())

    @property
    def output_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def new_cache(self, batch_size: int, capacity: int, dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated KV cache for ``batch_size`` rows of at most ``capacity`` tokens."""
        c = self.config
        return KVCache(
            num_layers=c.num_layers,
            batch_size=batch_size,
            num_kv_heads=c.num_kv_heads,
            head_dim=c.head_dim,
            capacity=capacity,
            dtype=dtype or self.dtype,
            device=self.device,
        )

    # ------------------------------------------------------------------ forward, in three steps
    def prepare(
        self,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        sequence_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, AttentionContext]:
        """Embed the new tokens and compute what all layers share.

        Args:
            input_ids: ``[b, s]`` token ids; or
            inputs_embeds: ``[b, s, d]`` embeddings (speech adapters feed these).
            position_ids: ``[b, s]``; by default counted over non-padding tokens, so a left-padded row
                gets the positions it would have alone.
            attention_mask: ``[b, past + s]``, 1 for real tokens and 0 for (left) padding.
            cache: a :class:`KVCache`; the new tokens take its next ``s`` slots.
            sequence_ids: ``[b, s]`` for packed rows (several samples in one row): tokens with equal
                ids (contiguous) form one sample, which attends only to itself (a block-diagonal causal mask) and
                whose positions restart at 0 unless ``position_ids`` says otherwise. No cache.

        Returns:
            ``h [b, s, d]`` and the :class:`AttentionContext` for the layers.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # [b, s, d]
        b, s = h.shape[:2]
        start = cache.length if cache is not None else 0
        end = start + s
        if attention_mask is not None and attention_mask.shape != (b, end):
            raise ValueError(
                f"attention_mask must cover past and new tokens: expected shape {(b, end)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if sequence_ids is not None:
            return self._prepare_packed(h, sequence_ids, position_ids, attention_mask, cache)
        if cache is not None:
            cache.reserve(s, None if attention_mask is None else attention_mask[:, start:end])
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, start:end]
            else:
                position_ids = torch.arange(start, end, device=h.device).expand(b, s)
        cos, sin = rope_cos_sin(self._inv_freq, position_ids, h.dtype)

        padded = (cache is not None and cache.has_padding) or (
            cache is None and attention_mask is not None and not bool(attention_mask.all())
        )
        mask, is_causal = None, False
        if not padded and start == 0:
            is_causal = s > 1
        elif padded or s > 1:
            # Left padding or a chunk after cached tokens: an explicit [b, 1, s, k] boolean mask.
            key_valid = cache.valid[:, :end] if cache is not None else attention_mask.bool()  # [b, k]
            q_pos = torch.arange(start, end, device=h.device)[:, None]
            k_pos = torch.arange(end, device=h.device)[None, :]
            allowed = (k_pos <= q_pos)[None] & key_valid[:, None, :]  # [b, s, k]
            # A padding query may always see itself, so no softmax row is empty (no NaN anywhere).
            allowed = allowed | (k_pos == q_pos)[None]
            mask = allowed[:, None]  # [b, 1, s, k]
        return h, AttentionContext(cos=cos, sin=sin, mask=mask, is_causal=is_causal, cache=cache, start=start)

    def _prepare_packed(
        self,
        h: torch.Tensor,
        sequence_ids: torch.Tensor,
        position_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        cache: KVCache | None,
    ) -> tuple[torch.Tensor, AttentionContext]:
        """:meth:`prepare` for packed rows: block-diagonal causal attention, one span at a time."""
        b, s = h.shape[:2]
        if cache is not None:
            raise ValueError("sequence_ids (packed rows) cannot be used with a KV cache")
        if sequence_ids.shape != (b, s):
            raise ValueError(f"sequence_ids must have shape {(b, s)}, got {tuple(sequence_ids.shape)}")
        if position_ids is None:
            position_ids = packed_positions(sequence_ids)
        cos, sin = rope_cos_sin(self._inv_freq, position_ids, h.dtype)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("with sequence_ids, mark padding by its own sequence id, not attention_mask")
        # Spans of equal ids along each row; attention runs span by span (cost: the sum of each
        # sample's length squared, not the row's), which also keeps samples apart.
        segments = []
        for row in _sample_starts(sequence_ids):
            cuts = row.nonzero().squeeze(1).tolist() + [s]
            segments.append(tuple(zip(cuts[:-1], cuts[1:])))
        ctx = AttentionContext(cos=cos, sin=sin, mask=None, is_causal=False, segments=tuple(segments))
        return h, ctx

    def unpadding(
        self,
        tokens: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *,
        cache: KVCache | None = None,
        sequence_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> Unpadding | None:
        """How a forward pass without a cache runs a right-padded batch of ``tokens`` (``[b, s]`` ids
        or ``[b, s, d]`` embeddings) as one packed row (:class:`~mm.text_backbone.unpad.Unpadding`),
        or ``None`` when it runs as given (:meth:`prepare` then checks the mask's shape)."""
        if not self.unpad_padding or cache is not None or sequence_ids is not None:
            return None
        if attention_mask is None or attention_mask.shape != tokens.shape[:2]:
            return None
        return Unpadding.of(attention_mask, labels)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: ``[..., d]`` hidden states to ``[..., V]`` logits."""
        return linear(self.norm(h), self.output_weight)

    def head_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of :meth:`head`'s logits for ``h [n, d]`` against ``targets [n]``, without
        keeping the ``[n, V]`` logits for the backward pass (:mod:`~mm.text_backbone.head_loss`)."""
        return linear_cross_entropy(self.norm(h), self.output_weight, targets)

    def greedy_head(self, h: torch.Tensor) -> torch.Tensor:
        """:meth:`head` for greedy decoding, ``[b, d]`` to ``[b, V]``: the same argmax, with the
        rows that cannot hold it set to ``-inf``. With fp32 weights on the CPU the vocabulary is
        screened in int8 and only candidate rows are computed in fp32
        (:class:`~mm.text_backbone.greedy_head.ScreenedHead`, built on first use: an int8 copy of
        the output matrix, a quarter of its size); elsewhere it is :meth:`head`."""
        weight = self.output_weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or h.ndim != 2:
            return self.head(h)
        screen = self.__dict__.get("_greedy_screen")
        if screen is None or screen.key != ScreenedHead.key_of(weight):
            screen = ScreenedHead(weight)
            self.__dict__["_greedy_screen"] = screen  # not a module or parameter: no state_dict entry
        return screen.logits(self.norm(h), weight)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
        sequence_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits ``[b, s, V]`` (``[b, 1, V]`` with ``last_only``) for ``input_ids [b, s]`` or ``inputs_embeds``.

        Arguments as :meth:`prepare`. Without a cache, a right-padded batch runs as one packed row of
        its real tokens (``unpad_padding``); its padded positions' logits are then zero. With
        ``last_only`` the last layer computes its queries, output and MLP at the last position only
        (``hidden_states``), so its logits equal the full pass's up to fp32 rounding."""
        h = self.hidden_states(
            input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            sequence_ids=sequence_ids,
            last_only=last_only,
        )
        return self.head(h[:, -1:] if last_only else h)

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        sequence_ids: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The last layer's output ``[b, s, d]`` before the final norm (arguments as :meth:`forward`).

        ``last_only``: the last position's ``[b, 1, d]`` alone is wanted (a prefill), so the last
        layer computes every position's keys and values (for the cache) but its queries, attention
        output and MLP only there; rows packed from padding or ``sequence_ids`` run in full."""
        tokens = input_ids if inputs_embeds is None else inputs_embeds
        unpadding = (
            None
            if tokens is None
            else self.unpadding(tokens, attention_mask, cache=cache, sequence_ids=sequence_ids)
        )
        if unpadding is not None:
            h = self.hidden_states(
                unpadding.pack_optional(input_ids),
                inputs_embeds=unpadding.pack_optional(inputs_embeds),
                position_ids=unpadding.pack_optional(position_ids),
                sequence_ids=unpadding.sequence_ids,
            )
            return unpadding.unpack(h)
        h, ctx = self.prepare(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            sequence_ids=sequence_ids,
        )
        prune = last_only and ctx.segments is None
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            h = layer(h, ctx, last_only=prune and i == last)
        return h

    # ------------------------------------------------------------------ generation
    def stream(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: tuple[int, ...] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token ``[b]`` of each left-padded prompt row as it is decoded.

        ``stop_token_ids=None`` stops at the checkpoint's end-of-turn ids; ``()`` never stops early.
        """
        cache = self.new_cache(input_ids.shape[0], input_ids.shape[1] + max_new_tokens)
        head = self.greedy_head if temperature == 0 else self.head

        def step(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return head(self.hidden_states(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1])

        with torch.inference_mode():
            yield from stream_tokens(
                step,
                input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                stop_token_ids=self.config.eos_token_ids if stop_token_ids is None else stop_token_ids,
                pad_token_id=self.config.pad_token_id or 0,
            )

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """New token ids ``[b, n]`` (``n <= max_new_tokens``); arguments as :meth:`stream`."""
        tokens = list(self.stream(input_ids, **kwargs))
        return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)
