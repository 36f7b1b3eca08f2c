"""Meta's own layout of Llama 3.2 Vision: ``consolidated.*.pth`` + ``params.json`` + ``tokenizer.model``.

This is what Meta's download gives and what its reference implementation (llama-models
``llama3/multimodal/model.py``, ``CrossAttentionTransformer``) loads, strictly, into a model built
from ``params.json``. Reading it needs no converter: names, model-parallel shards and the three
tensors whose layout differs from mm's are translated here, by explicit tables.

* Names. The text model keeps its Llama 3 names under ``text_model.`` (``layers.N.attention.wq``,
  …), its ``cross_attention_layers`` list holds the image blocks in the order of the fusion
  schedule, ``learnable_embedding`` the 8 rows after the text vocabulary (``<|image|>`` is the first),
  and the image encoder lives under ``vision_model.vision_encoder.`` (``transformer.resblocks``,
  ``global_transformer.resblocks``) with the projection at ``vision_model.vision_projection``.
* Shards. ``consolidated.NN.pth`` are model-parallel parts, split as fairscale's layers split them:
  column-parallel linears along their output rows, row-parallel linears along their input columns
  (their biases whole), vocabulary-parallel embeddings along the vocabulary; norms, gates and the
  encoder's embeddings whole. They are read with ``torch.load(weights_only=True, mmap=True)``.
* Tensors. The self-attention query/key rows interleave RoPE pairs (as in Meta's text checkpoints);
  the patch embedding is an unfolded linear ``[d, 3·14·14]``; and the tile-position tables are
  indexed by tile row and column (``[4, 4, …]``: tile ``(i, j)`` of any grid reads entry ``[i, j]``),
  where mm (like Hugging Face) keeps one row per aspect-ratio id holding its tiles in order. Reading
  expands Meta's table into mm's rows; writing needs mm's rows to agree wherever two grids share a
  tile, and writes zeros at the positions no supported grid reaches (Meta's model never reads them).

Meta's model fixes the image encoder (ViT-H/14: width 1280, 32 local and 8 global layers, 16 heads,
features from the inputs of local layers 3, 7, 15, 23, 30, at most 4 tiles); ``params.json`` gives
the tile size (``vision_chunk_size``) and the number of cross-attention layers, which its fusion
schedule spreads from the last layer down: every ``ceil(n_layers / n_cross)``-th layer, counting back
from the last, gets a block in front of it (layers 3, 7, …, 31 for the 11B model).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from mm._io import atomic_dir
from mm.encoders import ImageEncoderConfig
from mm.model.config import ModelConfig
from mm.text_backbone import TextBackbone, TextConfig
from mm.text_backbone import key_maps as text_keys
from mm.text_backbone.checkpoint import (
    CheckpointError,
    merge_meta_shards,
    read_json,
    read_meta_shards,
    split_meta_shards,
    write_meta_shards,
)

__all__ = [
    "export_meta",
    "fusion_schedule",
    "is_meta_vision_folder",
    "load_meta",
    "load_meta_backbone",
    "meta_model_config",
    "meta_params",
    "meta_to_mm_name",
    "mm_to_meta_name",
]

#: Meta's image encoder, fixed in ``CrossAttentionTransformerVision`` (only the tile size varies).
META_IMAGE_ENCODER = ImageEncoderConfig()
#: ``learnable_embedding`` rows: ``max(model-parallel size, 8)``.
NUM_EXTRA_TOKENS = 8

_ENC = "vision_model.vision_encoder."
# Meta name -> (mm name, model-parallel split dim), outside the layer stacks.
_TOP: dict[str, tuple[str, int | None]] = {
    _ENC + "class_embedding": ("image_encoder.class_embedding", None),
    _ENC + "positional_embedding": ("image_encoder.positional_embedding.position", None),
    _ENC + "gated_positional_embedding": ("image_encoder.positional_embedding.tile_position.weight", None),
    _ENC + "gated_positional_embedding_gate": ("image_encoder.positional_embedding.gate", None),
    _ENC + "conv1._linear.weight": ("image_encoder.patch_embed.weight", 0),
    _ENC + "ln_pre.weight": ("image_encoder.ln_pre.weight", None),
    _ENC + "ln_pre.bias": ("image_encoder.ln_pre.bias", None),
    _ENC + "ln_post.weight": ("image_encoder.ln_post.weight", None),
    _ENC + "ln_post.bias": ("image_encoder.ln_post.bias", None),
    _ENC + "pre_tile_pos_embed.embedding": ("image_encoder.pre_tile_aspect_embedding.embedding.weight", None),
    _ENC + "pre_tile_pos_embed.gate": ("image_encoder.pre_tile_aspect_embedding.gate", None),
    _ENC + "post_tile_pos_embed.embedding": (
        "image_encoder.post_tile_aspect_embedding.embedding.weight",
        None,
    ),
    _ENC + "post_tile_pos_embed.gate": ("image_encoder.post_tile_aspect_embedding.gate", None),
    "vision_model.vision_projection.weight": ("projector.weight", 0),
    "vision_model.vision_projection.bias": ("projector.bias", 0),
    "text_model.tok_embeddings.weight": ("backbone.embed_tokens.weight", 0),
    "text_model.learnable_embedding.weight": ("extra_embeddings.weight", 0),
    "text_model.norm.weight": ("backbone.norm.weight", None),
    "text_model.output.weight": ("backbone.lm_head.weight", 0),
}
# Inside one image-encoder layer (``resblocks.N.``): Meta -> (mm, split dim).
_VISION_LAYER: dict[str, tuple[str, int | None]] = {
    "attn.wq.weight": ("attn.q_proj.weight", 0),
    "attn.wk.weight": ("attn.k_proj.weight", 0),
    "attn.wv.weight": ("attn.v_proj.weight", 0),
    "attn.wo.weight": ("attn.o_proj.weight", 1),
    "ln_1.weight": ("attn_norm.weight", None),
    "ln_1.bias": ("attn_norm.bias", None),
    "ln_2.weight": ("mlp_norm.weight", None),
    "ln_2.bias": ("mlp_norm.bias", None),
    "mlp.c_fc.weight": ("mlp.fc1.weight", 0),
    "mlp.c_fc.bias": ("mlp.fc1.bias", 0),
    "mlp.c_proj.weight": ("mlp.fc2.weight", 1),
    "mlp.c_proj.bias": ("mlp.fc2.bias", None),
}
_GLOBAL_LAYER = {**_VISION_LAYER, "gate_attn": ("attn_gate", None), "gate_ffn": ("mlp_gate", None)}
# Inside one cross-attention layer (``text_model.cross_attention_layers.J.``).
_CROSS_LAYER: dict[str, tuple[str, int | None]] = {
    "attention.wq.weight": ("cross_attn.q_proj.weight", 0),
    "attention.wk.weight": ("cross_attn.k_proj.weight", 0),
    "attention.wv.weight": ("cross_attn.v_proj.weight", 0),
    "attention.wo.weight": ("cross_attn.o_proj.weight", 1),
    "attention.q_norm.weight": ("cross_attn.q_norm.weight", None),
    "attention.k_norm.weight": ("cross_attn.k_norm.weight", None),
    "attention_norm.weight": ("input_layernorm.weight", None),
    "ffn_norm.weight": ("post_attention_layernorm.weight", None),
    "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
    "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
    "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
    "gate_attn": ("attn_gate", None),
    "gate_ffwd": ("mlp_gate", None),
}
# Meta stack prefix -> (mm stack prefix, table of names inside one of its layers).
_STACKS = {
    _ENC + "transformer.resblocks.": ("image_encoder.layers.", _VISION_LAYER),
    _ENC + "global_transformer.resblocks.": ("image_encoder.global_layers.", _GLOBAL_LAYER),
    "text_model.cross_attention_layers.": ("image_blocks.", _CROSS_LAYER),
}
_TOP_MM = {mm: meta for meta, (mm, _) in _TOP.items()}
_STACKS_MM = {mm: (meta, {v[0]: k for k, v in table.items()}) for meta, (mm, table) in _STACKS.items()}
_STACK_RE = re.compile(r"^(.*\.)(\d+)\.(.+)$")
_TEXT_LAYER = "text_model.layers."

# Tensors whose layout differs from mm's (by mm name).
_TILE_TABLES = {
    "image_encoder.positional_embedding.tile_position.weight",
    "image_encoder.pre_tile_aspect_embedding.embedding.weight",
    "image_encoder.post_tile_aspect_embedding.embedding.weight",
}
_PATCH = "image_encoder.patch_embed.weight"


# ---------------------------------------------------------------------------- names
def _lookup(name: str) -> tuple[str, int | None]:
    if name in _TOP:
        return _TOP[name]
    if name.startswith(_TEXT_LAYER):
        rest = name[len("text_model.") :]
        return "backbone." + text_keys.meta_to_mm(rest), text_keys.meta_shard_dim(rest)
    m = _STACK_RE.match(name)
    if m and m.group(1) in _STACKS:
        prefix, table = _STACKS[m.group(1)]
        if m.group(3) in table:
            inner, dim = table[m.group(3)]
            return f"{prefix}{m.group(2)}.{inner}", dim
    raise KeyError(name)


def meta_to_mm_name(name: str) -> str:
    """mm's parameter name for a tensor of Meta's Llama 3.2 Vision checkpoint (``KeyError`` if unknown)."""
    return _lookup(name)[0]


def meta_shard_dim(name: str) -> int | None:
    """The dimension Meta's model-parallel shards split tensor ``name`` along (``None``: whole)."""
    return _lookup(name)[1]


def mm_to_meta_name(name: str) -> str:
    """Inverse of :func:`meta_to_mm_name`."""
    if name in _TOP_MM:
        return _TOP_MM[name]
    if name.startswith("backbone.layers."):
        return "text_model." + text_keys.mm_to_meta(name[len("backbone.") :])
    m = _STACK_RE.match(name)
    if m and m.group(1) in _STACKS_MM:
        prefix, table = _STACKS_MM[m.group(1)]
        if m.group(3) in table:
            return f"{prefix}{m.group(2)}.{table[m.group(3)]}"
    raise KeyError(name)


# ---------------------------------------------------------------------------- config
def fusion_schedule(num_layers: int, num_cross_layers: int) -> tuple[int, ...]:
    """Backbone layers with a cross-attention block in front of them, as Meta's model places them."""
    if not 0 < num_cross_layers <= num_layers:
        raise ValueError(f"{num_cross_layers} cross-attention layers do not fit {num_layers} layers")
    step = math.ceil(num_layers / num_cross_layers)
    return tuple(sorted(range(num_layers - 1, -1, -step)[:num_cross_layers]))


def is_meta_vision_folder(path: Path) -> bool:
    """A folder with Meta's ``params.json`` describing a vision model (``vision_chunk_size > 0``)."""
    params = path / "params.json"
    if not params.is_file():
        return False
    return int(read_json(params).get("vision_chunk_size", -1)) > 0


def _num_cross_layers(params: Mapping) -> int:
    if "vision_num_cross_attention_layers" in params:
        return int(params["vision_num_cross_attention_layers"])
    adapter = (params.get("vision_model") or {}).get("cross_attention_adapter") or {}
    if "num_layers" not in adapter:
        raise KeyError("vision_num_cross_attention_layers")
    return int(adapter["num_layers"])


def meta_model_config(params: Mapping) -> ModelConfig:
    """mm's configuration for a Llama 3.2 Vision ``params.json``.

    Raises:
        CheckpointError: a text-only ``params.json``, or values Meta's model cannot have built.
    """
    chunk = int(params.get("vision_chunk_size", -1))
    if chunk <= 0:
        raise CheckpointError(
            "params.json describes a text-only model (no vision_chunk_size): load it with "
            "TextBackbone.from_pretrained or MultimodalModel.from_backbone"
        )
    tiles = int(params.get("vision_max_num_chunks", 4))
    if tiles != META_IMAGE_ENCODER.max_num_tiles:
        raise CheckpointError(
            f"vision_max_num_chunks is {tiles}; Meta's image encoder is built for exactly "
            f"{META_IMAGE_ENCODER.max_num_tiles} tiles"
        )
    try:
        text = TextConfig.from_meta(params)
        layers = fusion_schedule(text.num_layers, _num_cross_layers(params))
        image = META_IMAGE_ENCODER.replace(image_size=chunk)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"params.json is not a usable Llama 3.2 Vision configuration: {e}") from None
    return ModelConfig(
        text=text,
        image_encoder=image,
        cross_attention_layers=layers,
        cross_attention_intermediate_dim=text.intermediate_dim,
        num_extra_tokens=NUM_EXTRA_TOKENS,
    )


def meta_params(config: ModelConfig) -> dict:
    """``params.json`` for ``config``; ``ValueError`` naming what Meta's model cannot express."""
    enc = config.image_encoder
    if not isinstance(enc, ImageEncoderConfig) or enc.replace(image_size=META_IMAGE_ENCODER.image_size) != (
        META_IMAGE_ENCODER
    ):
        raise ValueError(
            "Meta's layout has exactly one image encoder (ViT-H/14, 32 + 8 layers, width 1280, 4 tiles, "
            f"features from layers {list(META_IMAGE_ENCODER.intermediate_layers)}); this model's is {enc!r}"
        )
    if config.video is not None or config.speech is not None:
        raise ValueError("Meta's Llama 3.2 Vision layout has no video or speech parts")
    if config.num_extra_tokens != NUM_EXTRA_TOKENS:
        raise ValueError(f"Meta's layout has {NUM_EXTRA_TOKENS} extra embedding rows")
    text = config.text
    if text.tie_embeddings:
        raise ValueError("Meta's layout does not tie the output head to the embedding")
    if config.cross_attention_intermediate_dim != text.intermediate_dim:
        raise ValueError("Meta's cross-attention MLPs are as wide as the backbone's")
    layers = fusion_schedule(text.num_layers, len(config.cross_attention_layers))
    if tuple(config.cross_attention_layers) != layers:
        raise ValueError(
            f"Meta's model places {len(layers)} cross-attention blocks before layers {list(layers)}; "
            f"this model has them before {list(config.cross_attention_layers)}"
        )
    scaling = text.rope_scaling
    if scaling is not None and (
        scaling.factor,
        scaling.low_freq_factor,
        scaling.high_freq_factor,
        scaling.original_max_seq_len,
    ) != (8.0, 1.0, 4.0, 8192):
        raise ValueError(f"Meta's model applies Llama 3.1's RoPE scaling (8, 1, 4, 8192) only, not {scaling}")
    params = text.to_meta()
    for key in ("rope_scaling_factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"):
        params.pop(key, None)
    params.update(
        vision_chunk_size=enc.image_size,
        vision_max_num_chunks=enc.max_num_tiles,
        vision_num_cross_attention_layers=len(layers),
    )
    return params


# ---------------------------------------------------------------------------- tensors
def _tile_grid_to_rows(grid: torch.Tensor, ratios, max_tiles: int) -> torch.Tensor:
    """``[T, T, p, d]`` (tile row, tile column) -> ``[1 + len(ratios), max_tiles * p * d]`` rows."""
    _, _, p, d = grid.shape
    rows = grid.new_zeros(1 + len(ratios), max_tiles, p, d)
    for i, (r, c) in enumerate(ratios):
        rows[i + 1, : r * c] = grid[:r, :c].reshape(r * c, p, d)
    return rows.reshape(1 + len(ratios), -1)


def _tile_rows_to_grid(rows: torch.Tensor, ratios, max_tiles: int, p: int, name: str) -> torch.Tensor:
    """Inverse of :func:`_tile_grid_to_rows`; every grid sharing a tile must hold the same values."""
    blocks = rows.reshape(rows.shape[0], max_tiles, p, -1)
    grid = rows.new_zeros(max_tiles, max_tiles, p, blocks.shape[-1])
    seen: dict[tuple[int, int], tuple[int, int]] = {}
    for i, (r, c) in enumerate(ratios):
        for k in range(r * c):
            pos = (k // c, k % c)
            value = blocks[i + 1, k]
            if pos not in seen:
                grid[pos] = value
                seen[pos] = (r, c)
            elif not torch.equal(grid[pos], value):
                diff = float((grid[pos].float() - value.float()).abs().max())
                raise ValueError(
                    f"{name}: tile {pos} holds different values under the grids {seen[pos]} and {(r, c)} "
                    f"(max difference {diff:.3g}); Meta's layout has one entry per tile position"
                )
    return grid


def _to_mm(name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    enc: ImageEncoderConfig = config.image_encoder
    if name in _TILE_TABLES:
        return _tile_grid_to_rows(t, enc.supported_aspect_ratios, enc.max_num_tiles)
    if name == _PATCH:
        return t.reshape(t.shape[0], enc.num_channels, enc.patch_size, enc.patch_size)
    if name.startswith("backbone.layers.") and name.endswith("q_proj.weight"):
        return text_keys.permute_from_meta(t, config.text.num_heads)
    if name.startswith("backbone.layers.") and name.endswith("k_proj.weight"):
        return text_keys.permute_from_meta(t, config.text.num_kv_heads)
    return t


def _to_meta(name: str, t: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    enc: ImageEncoderConfig = config.image_encoder
    if name in _TILE_TABLES:
        p = enc.num_patches if name.startswith("image_encoder.positional_embedding") else 1
        return _tile_rows_to_grid(t, enc.supported_aspect_ratios, enc.max_num_tiles, p, name)
    if name == _PATCH:
        return t.reshape(t.shape[0], -1)
    if name.startswith("backbone.layers.") and name.endswith("q_proj.weight"):
        return text_keys.permute_to_meta(t, config.text.num_heads)
    if name.startswith("backbone.layers.") and name.endswith("k_proj.weight"):
        return text_keys.permute_to_meta(t, config.text.num_kv_heads)
    return t


def _mm_tensors(
    path: Path, config: ModelConfig, keep=lambda name: True
) -> Iterator[tuple[str, torch.Tensor, Path]]:
    files, shards = read_meta_shards(path)
    for name, t in merge_meta_shards(files, shards, meta_shard_dim):
        mm_name = meta_to_mm_name(name)
        if keep(mm_name):
            yield mm_name, _to_mm(mm_name, t, config), files[0]


# ---------------------------------------------------------------------------- load
def _read_config(path: Path) -> ModelConfig:
    return meta_model_config(read_json(path / "params.json"))


def load_meta(cls, path: Path, *, dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """Build a :class:`~mm.MultimodalModel` from Meta's Llama 3.2 Vision folder (strict), ready to answer.

    The folder's ``tokenizer.model`` becomes the preprocessor's tokenizer (with Meta's tile size,
    4 tiles and Meta's multi-image rule); generation stops at the tokenizer's stop tokens.
    """
    from mm.checkpoint.imported import assign_imported, meta_folder_preprocessing

    config = _read_config(path)
    with torch.device("meta"):
        model = cls(config, backbone=TextBackbone(config.text))
    assign_imported(model, _mm_tensors(path, config), path, "meta_vision", dtype=dtype, device=device)
    model.backbone.freeze()
    model.preprocessor, model.generation_defaults = meta_folder_preprocessing(path, config)
    return model


def load_meta_backbone(path: Path, *, dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """Only the text backbone of Meta's Llama 3.2 Vision folder (for mm folders that refer to one)."""
    from mm.checkpoint.imported import assign_imported, backbone_tensors

    config = _read_config(path)
    with torch.device("meta"):
        backbone = TextBackbone(config.text)
    tensors = backbone_tensors(_mm_tensors(path, config, keep=lambda n: n.startswith("backbone.")))
    assign_imported(backbone, tensors, path, "meta_vision", dtype=dtype, device=device)
    return backbone


# ---------------------------------------------------------------------------- export
def export_meta(model, path: str | os.PathLike, *, num_shards: int = 1) -> None:
    """Write ``model`` in Meta's layout (``num_shards`` model-parallel shards), atomically.

    Writes ``params.json``, ``consolidated.NN.pth`` and, when the model's tokenizer is a tiktoken
    ``tokenizer.model``, that file. Loading the result with llama-models' ``CrossAttentionTransformer``
    gives the same logits.

    Raises:
        ValueError: the model has parts Meta's layout cannot hold (see :func:`meta_params`), its
            tile tables disagree between grids, or its tokenizer is not a ``tokenizer.model``.
    """
    from mm.text_backbone.tokenizer import TiktokenTokenizer

    config: ModelConfig = model.config
    params = meta_params(config)
    tokenizer = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, TiktokenTokenizer):
        raise ValueError(
            f"Meta's layout carries a tiktoken tokenizer.model; this model's tokenizer is a {type(tokenizer).__name__}"
        )
    state = {
        mm_to_meta_name(name): _to_meta(name, t.detach(), config).contiguous()
        for name, t in model.state_dict().items()
    }
    shards = split_meta_shards(state, num_shards, meta_shard_dim)
    with atomic_dir(path) as tmp:
        write_meta_shards(tmp, shards)
        (tmp / "params.json").write_text(json.dumps(params, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)
