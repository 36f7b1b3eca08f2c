"""The multimodal model: a frozen text backbone with encoders and adapters attached around it.

Llama 3 paper, sections 7 and 8. Shapes: b batch, r rows that carry images, s text tokens,
n images per sample, t tiles per image, p tokens per tile, m vision tokens (n t p), d model width,
V text vocabulary.

The backbone is never wrapped or edited. This module owns the loop over ``backbone.layers`` and
calls an image cross-attention block in front of the layers listed in
``config.cross_attention_layers``. Text-only input takes exactly the backbone's own path, so its
logits are the backbone's bit for bit; rows of a batch that see no image skip every block.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mm.adapters.cross_attention import GatedCrossAttentionBlock, VisionKV
from mm.datasets.inputs import AudioInputs, VideoInputs
from mm.encoders import ImageEncoder, ImageEncoderConfig, build_image_encoder
from mm.model import generation
from mm.model.components import COMPONENTS, component_of
from mm.model.config import ModelConfig, default_cross_attention_layers
from mm.model.reward import build_reward_head, score_batch
from mm.model.speech import build_speech_modules, splice_speech
from mm.model.video import build_video_modules, video_state
from mm.model.vision import VisionState, image_state, token_mask
from mm.text_backbone import TextBackbone
from mm.text_backbone.linear import Linear
from mm.text_backbone.unpad import Unpadding

__all__ = ["MultimodalModel", "MultimodalOutput", "VisionState"]


@dataclass(repr=False, eq=False)
class MultimodalOutput:
    """What a forward pass returns: ``logits [b, s, V]`` and ``loss`` (with ``labels``).

    The logits are computed when first read: a training loop that only calls ``out.loss.backward()``
    (the Hugging Face way) never pays for the ``[b, s, V]`` projection, whose output head is most of
    a small model's work and memory; reading ``out.logits`` computes them from the final hidden
    states, under the same gradient and inference mode as the forward pass. ``logits`` is ``None``
    when the forward pass was told ``return_logits=False``.

    A dataclass, so that wrappers which walk a module's output for its tensors (FSDP2 registers its
    pre-backward hooks on them) find ``loss`` and the hidden states.

    Attributes:
        loss: mean next-token cross-entropy over the labelled tokens (``None`` without labels).
        num_label_tokens: labelled tokens the loss averages over.
        states: what :attr:`hidden` comes from: the final hidden states, or the last layer's input
            while ``finish`` is set.
        head: the output projection applied to :attr:`hidden`.
        finish: the last layer run over every position (then unpadded), where the forward pass ran
            it at the labelled positions only; applied to ``states`` when :attr:`hidden` is first read.
    """

    loss: torch.Tensor | None = None
    num_label_tokens: int = 0
    states: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    finish: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        self._logits: torch.Tensor | None = None
        self._grad = torch.is_grad_enabled()
        self._inference = torch.is_inference_mode_enabled()

    @property
    def hidden(self) -> torch.Tensor | None:
        """The final hidden states ``[b, s, d]`` the logits are computed from (``None`` once they
        are, or when no logits were asked for)."""
        if self.finish is not None and self.states is not None:
            with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
                self.states = self.finish(self.states)
            self.finish = None
        return self.states

    @property
    def logits(self) -> torch.Tensor | None:
        if self._logits is None and self.states is not None:
            with torch.inference_mode(self._inference), torch.set_grad_enabled(self._grad):
                self._logits = self.head(self.hidden)
            self.states = self.head = self.finish = None
        return self._logits

    @logits.setter
    def logits(self, value: torch.Tensor | None) -> None:
        self._logits, self.states, self.head, self.finish = value, None, None, None

    def __repr__(self) -> str:
        shown = "(not computed yet)" if self._logits is None and self.states is not None else self._logits
        return f"MultimodalOutput(logits={shown!r}, loss={self.loss!r}, num_label_tokens={self.num_label_tokens})"


class MultimodalModel(nn.Module):
    """A frozen Llama 3 backbone with an image encoder and gated cross-attention adapters.

    Args:
        config: what is attached and at which sizes.
        backbone: the text model; a randomly initialised one of ``config.text`` when omitted.
    """

    def __init__(self, config: ModelConfig, backbone: TextBackbone | None = None) -> None:
        super().__init__()
        self.config = config
        text = config.text
        self.backbone = backbone if backbone is not None else TextBackbone(text)
        if self.backbone.config != text:
            raise ValueError("the backbone's configuration differs from config.text")
        self.backbone.freeze()
        # Rows for <|image|> and the other placeholders; only models that take media need them.
        self.extra_embeddings = (
            nn.Embedding(config.num_extra_tokens, text.embed_dim) if config.has_media else None
        )
        self.image_encoder = None
        self.projector = None
        self.image_blocks = nn.ModuleList()
        if config.image_encoder is not None:
            enc = config.image_encoder
            self.image_encoder = (
                ImageEncoder(enc) if isinstance(enc, ImageEncoderConfig) else build_image_encoder(enc)
            )
            self.projector = Linear(self.image_encoder.output_dim, text.embed_dim, bias=True)
            self.image_blocks.extend(
                GatedCrossAttentionBlock(
                    dim=text.embed_dim,
                    num_heads=text.num_heads,
                    num_kv_heads=text.num_kv_heads,
                    head_dim=text.head_dim,
                    intermediate_dim=config.cross_attention_intermediate_dim,
                    norm_eps=text.norm_eps,
                )
                for _ in config.cross_attention_layers
            )
        self._image_block_at = {layer: j for j, layer in enumerate(config.cross_attention_layers)}
        # Video: a temporal aggregator and zero-gated blocks before every 4th image block (section 7.2).
        self.video_aggregator = None
        self.video_blocks = nn.ModuleList()
        self._video_block_at: dict[int, int] = {}
        if config.video is not None:
            self.video_aggregator, blocks = build_video_modules(config)
            self.video_blocks.extend(blocks)
            self._video_block_at = {layer: j for j, layer in enumerate(config.video.cross_attention_layers)}
        # Speech: a Conformer encoder and the adapter whose outputs join the token sequence (section 8).
        self.speech_encoder = None
        self.speech_adapter = None
        if config.speech is not None:
            self.speech_encoder, self.speech_adapter = build_speech_modules(config)
        # Reward models (section 7.5.2): a scalar head on the last answer token; never in the logits.
        self.reward_head = build_reward_head(text.embed_dim) if config.reward_head else None
        # Tokenizer, image settings and mask policy saved with the model (see mm.datasets.preprocessing),
        # and how it generates when a caller does not say (mm.model.generation); set by
        # from_pretrained when the folder has them, or by the user / trainer.
        self.preprocessor = None
        self.generation_defaults = None
        # Recompute backbone layers in the backward pass instead of storing their activations
        # (gradients still flow through the frozen layers to reach earlier adapters).
        self.activation_checkpointing = False

    # ------------------------------------------------------------------ construction and I/O
    @classmethod
    def from_backbone(
        cls, text_checkpoint: str | os.PathLike | TextBackbone, preset_or_config: str | ModelConfig
    ) -> MultimodalModel:
        """Fresh (zero-gated) adapters and encoders of a preset's sizes around a text checkpoint.

        The preset's text sizes are replaced by the checkpoint's own, so any Llama 3 checkpoint works.
        """
        backbone = (
            text_checkpoint
            if isinstance(text_checkpoint, TextBackbone)
            else TextBackbone.from_pretrained(text_checkpoint)
        )
        config = (
            ModelConfig.preset(preset_or_config) if isinstance(preset_or_config, str) else preset_or_config
        )
        layers = config.cross_attention_layers
        if config.text != backbone.config:
            # Keep the preset's adapter placement rule, on the checkpoint's depth.
            layers = default_cross_attention_layers(backbone.config.num_layers) if layers else ()
            config = config.replace(
                text=backbone.config, cross_attention_layers=layers, cross_attention_intermediate_dim=None
            )
        model = cls(config, backbone=backbone)
        model.to(backbone.dtype)
        model.init_placeholder_embeddings()
        return model

    @torch.no_grad()
    def init_placeholder_embeddings(self) -> None:
        """Start every placeholder row (``<|image|>`` …) at the mean of the text embeddings.

        A fresh row drawn at unit scale would be an outlier among the backbone's token embeddings,
        and every later token would read it through the frozen self-attention; the mean keeps the
        placeholder in the backbone's own distribution until the adapters learn a better one.
        """
        if self.extra_embeddings is not None:
            mean = self.backbone.embed_tokens.weight.float().mean(dim=0)
            self.extra_embeddings.weight.copy_(mean.expand_as(self.extra_embeddings.weight))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> MultimodalModel:
        """Read mm's own saved folder, a Hugging Face Llama 3.2 Vision (``mllama``) folder, or Meta's
        layout (``consolidated.*.pth`` + ``params.json`` + ``tokenizer.model``).

        Imported folders come back ready to answer: their tokenizer, image settings, multi-image rule
        and stop tokens are read from the files beside the weights.
        """
        from mm.checkpoint.native import load_multimodal

        return load_multimodal(cls, path, dtype=dtype)

    def save_pretrained(self, path: str | os.PathLike, *, copy_backbone: bool = False, **extra) -> None:
        """Write mm's folder: ``config.json``, non-backbone weights, and a reference to the backbone.

        The backbone is referenced by path and digest; with ``copy_backbone`` it is written inside
        the folder too. The model's :attr:`preprocessor` (tokenizer files and settings) is saved
        with it; ``extra`` entries are stored in ``config.json``.
        """
        from mm.checkpoint.native import save_multimodal

        save_multimodal(self, path, copy_backbone=copy_backbone, **extra)

    def export_hf(self, path: str | os.PathLike) -> None:
        """Write a folder that ``transformers.MllamaForConditionalGeneration.from_pretrained`` loads."""
        from mm.checkpoint.mllama import export_mllama

        export_mllama(self, path)

    def export_meta(self, path: str | os.PathLike, *, num_shards: int = 1) -> None:
        """Write Meta's layout (``params.json``, ``consolidated.NN.pth``, ``tokenizer.model``), which
        llama-models' ``CrossAttentionTransformer`` loads with the same logits."""
        from mm.checkpoint.meta import export_meta

        export_meta(self, path, num_shards=num_shards)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Token ids that end an answer: the saved generation defaults', else the text config's
        ``eos_token_ids``, else the tokenizer's stop tokens (empty when none is known)."""
        defaults = self.generation_defaults
        if defaults is not None and defaults.stop_token_ids is not None:
            return defaults.stop_token_ids
        if self.config.text.eos_token_ids:
            return self.config.text.eos_token_ids
        if self.preprocessor is not None:
            return self.preprocessor.tokenizer.stop_ids
        return ()

    def swap_backbone(self, backbone: TextBackbone) -> None:
        """Put another text model of the same architecture under the adapters (the paper's hot-swap
        of the instruct model for supervised fine-tuning)."""
        old, new = self.config.text, backbone.config
        sizes = (
            "vocab_size",
            "embed_dim",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_dim",
        )
        diff = [
            f"{k}: {getattr(old, k)} -> {getattr(new, k)}"
            for k in sizes
            if getattr(old, k) != getattr(new, k)
        ]
        if diff:
            raise ValueError(f"cannot hot-swap a backbone of another architecture ({'; '.join(diff)})")
        self.backbone = backbone.freeze().to(device=self.device)
        self.config = self.config.replace(text=new)

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight that is not the backbone's."""
        return {k: v for k, v in self.state_dict().items() if component_of(k) != "backbone"}

    def component_parameters(self) -> dict[str, int]:
        """Parameter count of every component present (shared tensors counted once)."""
        counts = dict.fromkeys(COMPONENTS, 0)
        seen: set[int] = set()
        for name, p in self.named_parameters(remove_duplicate=True):
            if id(p) in seen:
                continue
            seen.add(id(p))
            counts[component_of(name)] += p.numel()
        return {c: n for c, n in counts.items() if n or c == "backbone"}

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # ------------------------------------------------------------------ pieces of the forward pass
    def embed(self, input_ids: torch.Tensor, *, force: bool = False) -> torch.Tensor | None:
        """Embeddings ``[b, s, d]`` when ``input_ids`` hold placeholder ids (or ``force``), else ``None``
        (the backbone's own path)."""
        vocab = self.config.text.vocab_size
        extra = input_ids >= vocab
        if not bool(extra.any()) and not (force and self.extra_embeddings is not None):
            return None
        limit = vocab + (self.config.num_extra_tokens if self.extra_embeddings is not None else 0)
        if bool((input_ids >= limit).any()) or bool((input_ids < 0).any()):
            raise ValueError(f"token ids must lie in [0, {limit}) for this model")
        h = self.backbone.embed_tokens(input_ids.clamp(max=vocab - 1))
        placeholders = self.extra_embeddings((input_ids - vocab).clamp(min=0)).to(h.dtype)
        return torch.where(extra[..., None], placeholders, h)

    def encode_images(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, aspect_ratio_mask: torch.Tensor
    ) -> torch.Tensor:
        """Vision tokens ``[b, n, t, p, d]`` at the backbone's width for ``pixel_values [b, n, t, 3, H, W]``."""
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder")
        features = self.image_encoder(
            pixel_values.to(self.projector.weight.dtype), aspect_ratio_ids, aspect_ratio_mask
        )  # [b, n, t, p, D]
        return self.projector(features)

    def vision_state(
        self,
        pixel_values: torch.Tensor | None,
        aspect_ratio_ids: torch.Tensor | None,
        aspect_ratio_mask: torch.Tensor | None,
        cross_attention_mask: torch.Tensor | None,
        *,
        force: bool = False,
    ) -> VisionState | None:
        """The images' per-block keys/values (see :func:`mm.model.vision.image_state`)."""
        return image_state(
            self, pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask, force=force
        )

    def video_state(self, video: VideoInputs | None) -> VisionState | None:
        """The videos' per-block keys/values (see :func:`mm.model.video.video_state`)."""
        return video_state(self, video)

    @staticmethod
    def _cross(
        block: GatedCrossAttentionBlock,
        h: torch.Tensor,
        state: VisionState,
        kv: VisionKV,
        mask: torch.Tensor,
        unpadding: Unpadding | None,
    ) -> torch.Tensor:
        """One block on ``h``: the rows in ``state``, or with ``unpadding`` the packed ``[1, N, d]``
        (each row's span against its own keys/values under the packed ``mask [1, N, m]`` when every
        row has them, else through the padded rows)."""
        if unpadding is not None:
            if state.all_rows:
                return block(h, kv, mask, spans=unpadding.lengths)
            return unpadding.pack(MultimodalModel._cross(block, unpadding.unpack(h), state, kv, mask, None))
        if state.all_rows:
            return block(h, kv, mask)
        return h.index_copy(0, state.rows, block(h[state.rows], kv, mask))

    def run_layers(
        self,
        h: torch.Tensor,
        ctx,
        *,
        vision: VisionState | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        video: VisionState | None = None,
        video_cross_attention_mask: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
        video_mask: torch.Tensor | None = None,
        unpadding: Unpadding | None = None,
        last_only: bool = False,
        rows: torch.Tensor | None = None,
        last_input: list[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The backbone's layers with the adapters in front of theirs; ``h [b, s, d]`` in and out
        (with ``last_only``, a prefill's: the last position's ``[b, 1, d]`` out, the last layer's
        queries, output and MLP computed there only; see :meth:`TextBackbone.hidden_states`).

        In front of a layer that has both, the video block runs before the image block. The blocks'
        masks come from the ``[b, s, n, t]`` / ``[b, s, v]`` cross-attention masks, or ready-made as
        boolean ``[r, s, m]`` masks of the rows in ``vision`` / ``video`` (continuous batching).
        With ``unpadding``, ``h`` is the packed ``[1, N, d]`` of a right-padded batch. With ``rows``
        (ascending positions of a single row), the last layer computes its queries, output and MLP at
        those positions only and ``[1, len(rows), d]`` comes out: a training step whose loss reads
        nothing else. ``last_input``, a list, receives the last layer's input.
        """
        xmask = (
            vision_mask
            if vision is None or vision_mask is not None
            else token_mask(cross_attention_mask, vision)
        )
        vmask = (
            video_mask
            if video is None or video_mask is not None
            else token_mask(video_cross_attention_mask, video)
        )
        if unpadding is not None:  # the blocks that run packed take their masks packed
            xmask = unpadding.pack(xmask) if vision is not None and vision.all_rows else xmask
            vmask = unpadding.pack(vmask) if video is not None and video.all_rows else vmask
        recompute = self.activation_checkpointing and torch.is_grad_enabled()
        last = len(self.backbone.layers) - 1
        prune = last if last_only and ctx.segments is None else None
        for i, layer in enumerate(self.backbone.layers):
            k = self._video_block_at.get(i)
            if k is not None and video is not None:
                h = self._cross(self.video_blocks[k], h, video, video.kv[k], vmask, unpadding)
            j = self._image_block_at.get(i)
            if j is not None and vision is not None:
                h = self._cross(self.image_blocks[j], h, vision, vision.kv[j], xmask, unpadding)
            kept = rows if i == last else None
            if i == last and last_input is not None:
                last_input.append(h)
            if recompute and h.requires_grad:
                h = checkpoint(layer, h, ctx, rows=kept, use_reentrant=False)
            else:
                h = layer(h, ctx, last_only=i == prune, rows=kept)
        return h

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        pixel_values: torch.Tensor | None = None,
        aspect_ratio_ids: torch.Tensor | None = None,
        aspect_ratio_mask: torch.Tensor | None = None,
        cross_attention_mask: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = True,
        video: VideoInputs | None = None,
        audio: AudioInputs | None = None,
        run_media_path: bool = False,
        sequence_ids: torch.Tensor | None = None,
    ) -> MultimodalOutput:
        """Logits (and loss) for a batch in the layout of Hugging Face's Mllama processor.

        Args:
            input_ids: ``[b, s]``; ids ``>= V`` are placeholders (``<|image|>`` = ``V``).
            pixel_values: ``[b, n, t, 3, H, W]``; aspect_ratio_ids ``[b, n]``; aspect_ratio_mask ``[b, n, t]``.
            cross_attention_mask: ``[b, s, n, t]``, 1 where a text token may attend to a tile.
            attention_mask: ``[b, s]``, 0 on padding. A right-padded batch (the collator's) runs as
                one packed row of its real tokens, as the backbone runs it
                (:mod:`~mm.text_backbone.unpad`): no work on the padding, whose logits are zero.
            labels: ``[b, s]`` next-token targets in Hugging Face's convention (shifted inside,
                -100 ignored); the loss is the mean over labelled tokens, and only those positions
                are projected to the vocabulary for it.
            return_logits: keep what the full ``[b, s, V]`` logits need, computed when
                ``.logits`` is first read (``False``: no logits at all).
            video: the batch's videos (:class:`~mm.datasets.inputs.VideoInputs`).
            audio: the log-mel clips whose ``<|audio|>`` runs stand in ``input_ids``
                (:class:`~mm.datasets.inputs.AudioInputs`).
            run_media_path: run the placeholder-embedding and image paths even when no token needs
                them (they then change nothing). FSDP needs it: every rank must call the same
                sharded modules, whose weights are gathered in their forward.
            sequence_ids: ``[b, s]`` for packed rows (:mod:`mm.training.packing`): tokens with equal
                ids (contiguous) are one sample, attending only to themselves, with positions
                restarting at 0 (unless ``position_ids``); no label is predicted across a boundary.
                Each sample's images are its own through ``cross_attention_mask``.
        """
        if inputs_embeds is None and input_ids is None:
            raise ValueError("pass input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.input_embeddings(input_ids, audio, force=run_media_path)
        vision = self.vision_state(
            pixel_values, aspect_ratio_ids, aspect_ratio_mask, cross_attention_mask, force=run_media_path
        )
        videos = self.video_state(video)
        unpadding = self.backbone.unpadding(
            input_ids if inputs_embeds is None else inputs_embeds,
            attention_mask,
            sequence_ids=sequence_ids,
            labels=labels,
        )
        if unpadding is not None:  # the backbone's own route for a right-padded batch
            input_ids, inputs_embeds, position_ids, labels = map(
                unpadding.pack_optional, (input_ids, inputs_embeds, position_ids, labels)
            )
            attention_mask, sequence_ids = None, unpadding.sequence_ids
        h, ctx = self.backbone.prepare(
            input_ids=input_ids if inputs_embeds is None else None,
            inputs_embeds=inputs_embeds,
            position_ids=position_ids,
            attention_mask=attention_mask,
            sequence_ids=sequence_ids,
        )
        targets = keep = rows = last_input = None
        if labels is not None:
            targets, keep = label_targets(labels, sequence_ids)
            # The loss reads the last layer at the labelled positions only; the logits, if read,
            # run it over every position then, from its input.
            found = keep[0].nonzero().squeeze(1) if h.shape[0] == 1 else None
            if found is not None and len(found):
                rows, last_input = found, [] if return_logits else None
        h = self.run_layers(
            h,
            ctx,
            vision=vision,
            cross_attention_mask=cross_attention_mask,
            video=videos,
            video_cross_attention_mask=None if video is None else video.cross_attention_mask,
            unpadding=unpadding,
            rows=rows,
            last_input=last_input,
        )
        loss, count = None, 0
        if rows is not None:
            loss, count = self.backbone.head_loss(h[0], targets[keep]), len(rows)
        elif labels is not None:
            loss, count = self.label_loss(h, labels, sequence_ids)
        if not return_logits:
            return MultimodalOutput(loss=loss, num_label_tokens=count)
        unpack = (lambda x: x) if unpadding is None else unpadding.unpack
        if last_input:
            layer = self.backbone.layers[-1]
            return MultimodalOutput(
                loss=loss,
                num_label_tokens=count,
                states=last_input[0],
                head=self.backbone.head,
                finish=lambda x: unpack(layer(x, ctx)),
            )
        return MultimodalOutput(loss=loss, num_label_tokens=count, states=unpack(h), head=self.backbone.head)

    def input_embeddings(
        self, input_ids: torch.Tensor, audio: AudioInputs | None, *, force: bool = False
    ) -> torch.Tensor | None:
        """Token embeddings with placeholders and spliced speech, or ``None`` for the backbone's own path."""
        embeds = self.embed(input_ids, force=force)
        if audio is None:
            return embeds
        if embeds is None:
            embeds = self.backbone.embed_tokens(input_ids)
        return splice_speech(self, embeds, input_ids, audio)

    def label_loss(
        self, h: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, int]:
        """Mean next-token cross-entropy over labelled positions, projecting only those to the vocabulary.

        With packed rows (``sequence_ids``) a sample's first token is never a target of the previous
        sample's last one."""
        targets, keep = label_targets(labels, sequence_ids)
        count = int(keep.sum())
        if count == 0:
            return h.sum() * 0.0, 0
        return self.backbone.head_loss(h[:, :-1][keep], targets[keep]), count

    # ------------------------------------------------------------------ generation
    def stream(
        self,
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
        """Yield the next token ``[b]`` of each (left-padded) row as it is decoded.

        Vision and video tokens, every block's cross-attention keys/values and the spliced speech
        are computed once, at prefill, and reused for each decoded token; decoded tokens see what
        the prompt's last token saw (see :func:`mm.model.generation.stream`). ``cuda_graph=True``
        decodes with fixed shapes, each token one CUDA graph launch on a GPU
        (:mod:`mm.model.static_decode`); elsewhere the fixed-shape step runs eagerly.
        """
        return generation.stream(
            self,
            input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            aspect_ratio_ids=aspect_ratio_ids,
            aspect_ratio_mask=aspect_ratio_mask,
            cross_attention_mask=cross_attention_mask,
            video=video,
            audio=audio,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_token_ids=stop_token_ids,
            cuda_graph=cuda_graph,
        )

    def score(self, messages) -> float:
        """The reward of the conversation's last (assistant) answer (:mod:`mm.model.reward`)."""
        return score_batch(self, [messages])[0]

    def score_batch(self, conversations) -> list[float]:
        """:meth:`score` of each conversation, batched (the same values)."""
        return score_batch(self, conversations)

    def chat(self, messages, **options) -> str:
        """The answer to a chat conversation; see :func:`mm.model.chat.chat`."""
        from mm.model.chat import chat

        return chat(self, messages, **options)

    def chat_stream(self, messages, **options) -> Iterator[str]:
        """Yield the answer's text as it is decoded; see :func:`mm.model.chat.chat_stream`."""
        from mm.model.chat import chat_stream

        return chat_stream(self, messages, **options)

    def chat_batch(self, conversations, **options) -> list[str]:
        """Answers to several conversations decoded together; see :func:`mm.model.chat.chat_batch`."""
        from mm.model.chat import chat_batch

        return chat_batch(self, conversations, **options)

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """New token ids ``[b, n]`` with ``n <= max_new_tokens``; arguments as :meth:`stream`.

        ``stop_token_ids=()`` never stops early; ``None`` uses the model's own stop tokens.
        """
        tokens = list(self.stream(input_ids, **kwargs))
        return torch.stack(tokens, dim=1) if tokens else input_ids.new_zeros(input_ids.shape[0], 0)


def label_targets(
    labels: torch.Tensor, sequence_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets [b, s-1], keep [b, s-1])``: the next-token targets of ``labels`` (Hugging Face's
    convention, -100 ignored) and where the loss reads one; with packed rows (``sequence_ids``) a
    sample's first token is never a target of the previous sample's last one."""
    targets = labels[:, 1:]
    keep = targets != -100
    if sequence_ids is not None:
        keep = keep & (sequence_ids[:, 1:] == sequence_ids[:, :-1])
    return targets, keep
