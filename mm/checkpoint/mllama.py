"""Interop with Hugging Face Llama 3.2 Vision (``model_type: "mllama"``) folders.

Hugging Face keeps one merged decoder stack in which cross-attention layers sit at indices
3, 8, 13, … among the self-attention layers. mm keeps the text model's own stack untouched and puts
each cross-attention block *before* a backbone layer: merged layer ``m`` that is the ``k``-th
cross-attention layer becomes image block ``k`` in front of backbone layer ``m - k`` (3, 7, 11, …),
and merged self-attention layer ``m`` becomes backbone layer ``m`` minus the number of
cross-attention layers before it.

The token embedding has 8 rows more than the text vocabulary (``<|image|>`` is the first of them);
they become mm's ``extra_embeddings`` and the text vocabulary's rows stay the backbone's.

On disk (what Meta published and what ``save_pretrained`` writes, transformers 4.x and 5.x) names
are ``language_model.model.*``, ``language_model.lm_head.weight``, ``vision_model.*`` and
``multi_modal_projector.*``; transformers >= 4.52 uses ``model.language_model.*`` etc. in memory,
which some re-saved folders carry: both are read.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from mm._io import atomic_dir
from mm.encoders import ImageEncoderConfig
from mm.encoders import image_encoder_keys as vision_keys
from mm.model.config import ModelConfig
from mm.text_backbone import TextBackbone, TextConfig
from mm.text_backbone.checkpoint import (
    CheckpointError,
    _safetensors_files,
    iter_safetensors,
    read_json,
)

__all__ = ["export_mllama", "load_mllama", "mllama_config", "mllama_tensor_names"]

# Inside one cross-attention layer: Hugging Face name -> mm name (relative to the block).
_CROSS_LAYER = {
    "input_layernorm.weight": "input_layernorm.weight",
    "cross_attn.q_proj.weight": "cross_attn.q_proj.weight",
    "cross_attn.k_proj.weight": "cross_attn.k_proj.weight",
    "cross_attn.v_proj.weight": "cross_attn.v_proj.weight",
    "cross_attn.o_proj.weight": "cross_attn.o_proj.weight",
    "cross_attn.q_norm.weight": "cross_attn.q_norm.weight",
    "cross_attn.k_norm.weight": "cross_attn.k_norm.weight",
    "cross_attn_attn_gate": "attn_gate",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "cross_attn_mlp_gate": "mlp_gate",
}
_CROSS_LAYER_MM = {v: k for k, v in _CROSS_LAYER.items()}
_TEXT_LAYER = re.compile(r"^language_model\.model\.layers\.(\d+)\.(.+)$")
# transformers >= 4.52 in-memory names -> on-disk names.
_MODERN_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def _canonical(name: str) -> str:
    for modern, disk in _MODERN_PREFIXES:
        if name.startswith(modern):
            return disk + name[len(modern) :]
    return name


def mllama_config(hf: dict) -> ModelConfig:
    """mm's configuration for a Mllama ``config.json``."""
    text_cfg = dict(hf["text_config"])
    vision_cfg = dict(hf["vision_config"])
    cross = sorted(int(i) for i in text_cfg.get("cross_attention_layers") or [3, 8, 13, 18, 23, 28, 33, 38])
    total = int(text_cfg["num_hidden_layers"])
    vocab = int(text_cfg.get("vocab_size", 128256))
    image_token = int(hf.get("image_token_index", hf.get("image_token_id", vocab)))
    if image_token != vocab:
        raise CheckpointError(
            f"image_token_index is {image_token}; mm places <|image|> right after the text vocabulary ({vocab})"
        )
    text_cfg.update(num_hidden_layers=total - len(cross), model_type="llama")
    text = TextConfig.from_hf(text_cfg)
    vision = ImageEncoderConfig.from_hf(vision_cfg)
    if int(vision_cfg.get("vision_output_dim", vision.output_dim)) != vision.output_dim:
        raise CheckpointError(
            f"vision_output_dim {vision_cfg['vision_output_dim']} does not match the encoder's "
            f"{vision.output_dim} features"
        )
    return ModelConfig(
        text=text,
        image_encoder=vision,
        cross_attention_layers=tuple(m - k for k, m in enumerate(cross)),
        cross_attention_intermediate_dim=int(text_cfg["intermediate_size"]),
        num_extra_tokens=8,
    )


def _merged_layout(config: ModelConfig) -> tuple[dict[int, str], int]:
    """Merged Hugging Face layer index -> mm prefix, and the merged depth."""
    layout: dict[int, str] = {}
    m = 0
    for i in range(config.text.num_layers):
        if i in config.cross_attention_layers:
            layout[m] = f"image_blocks.{config.cross_attention_layers.index(i)}."
            m += 1
        layout[m] = f"backbone.layers.{i}."
        m += 1
    return layout, m


def mllama_tensor_names(
    name: str, tensor: torch.Tensor, config: ModelConfig
) -> list[tuple[str, torch.Tensor]]:
    """mm ``(name, tensor)`` pairs for one Hugging Face Mllama tensor (the embedding splits in two)."""
    name = _canonical(name)
    vocab = config.text.vocab_size
    if name == "language_model.model.embed_tokens.weight":
        return [("backbone.embed_tokens.weight", tensor[:vocab]), ("extra_embeddings.weight", tensor[vocab:])]
    if name == "language_model.model.norm.weight":
        return [("backbone.norm.weight", tensor)]
    if name == "language_model.lm_head.weight":
        return [("backbone.lm_head.weight", tensor)]
    if name.startswith("multi_modal_projector."):
        return [("projector." + name[len("multi_modal_projector.") :], tensor)]
    if name.startswith(vision_keys.HF_CHECKPOINT_PREFIX):
        return [
            ("image_encoder." + vision_keys.hf_to_mm(name, prefix=vision_keys.HF_CHECKPOINT_PREFIX), tensor)
        ]
    match = _TEXT_LAYER.match(name)
    if match:
        layout, _ = _merged_layout(config)
        prefix = layout.get(int(match.group(1)))
        rest = match.group(2)
        if prefix is not None:
            if prefix.startswith("image_blocks."):
                if rest in _CROSS_LAYER:
                    return [(prefix + _CROSS_LAYER[rest], tensor)]
            else:
                return [(prefix + rest, tensor)]
    if re.match(r"^language_model\.model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", name):
        return []
    raise KeyError(name)


def _mm_tensors(path: Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor, Path]]:
    """Every tensor of the folder's safetensors files under its mm name: ``(name, tensor, file)``."""
    for name, t, file in iter_safetensors(_safetensors_files(path)):
        try:
            pairs = mllama_tensor_names(name, t, config)
        except KeyError:
            raise CheckpointError(f"unexpected tensor {name!r} in {file}") from None
        for mm_name, part in pairs:
            yield mm_name, part, file


def _read_config(path: Path) -> ModelConfig:
    hf = read_json(path / "config.json")
    try:
        return mllama_config(hf)
    except (KeyError, ValueError, TypeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{path}/config.json is not a usable Mllama config: {e}") from None


def load_mllama(cls, path: Path, *, dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """Build a :class:`~mm.MultimodalModel` from a Hugging Face Mllama folder (strict)."""
    config = _read_config(path)
    if config.text.tie_embeddings:
        raise CheckpointError("tied embeddings are not supported for Mllama checkpoints")
    from mm.checkpoint.imported import assign_imported, hf_folder_preprocessing

    with torch.device("meta"):
        model = cls(config, backbone=TextBackbone(config.text))
    assign_imported(model, _mm_tensors(path, config), path, "mllama", dtype=dtype, device=device)
    model.backbone.freeze()
    model.preprocessor, model.generation_defaults = hf_folder_preprocessing(path, config)
    return model


def load_mllama_backbone(path: Path, *, dtype: torch.dtype | None, device: torch.device | str = "cpu"):
    """Only the text backbone of a Mllama folder (for mm folders that refer to one)."""
    from mm.checkpoint.imported import assign_imported, backbone_tensors

    config = _read_config(path)
    with torch.device("meta"):
        backbone = TextBackbone(config.text)
    tensors = backbone_tensors(_mm_tensors(path, config))
    assign_imported(backbone, tensors, path, "mllama", dtype=dtype, device=device)
    return backbone


def _hf_text_config(config: ModelConfig, merged_depth: int, layout: dict[int, str]) -> dict:
    text = config.text.to_hf()
    for key in (
        "architectures",
        "head_dim",
        "attention_bias",
        "mlp_bias",
        "rope_scaling",
        "torch_dtype",
        "dtype",
    ):
        text.pop(key, None)
    if config.text.head_dim != config.text.embed_dim // config.text.num_heads:
        raise ValueError("Mllama needs head_dim = hidden_size / num_attention_heads")
    if config.cross_attention_intermediate_dim != config.text.intermediate_dim:
        raise ValueError("Mllama needs cross-attention MLPs as wide as the backbone's")
    if config.num_extra_tokens != 8:
        raise ValueError("Mllama has exactly 8 extra embedding rows")
    text.update(
        model_type="mllama_text_model",
        num_hidden_layers=merged_depth,
        cross_attention_layers=sorted(m for m, p in layout.items() if p.startswith("image_blocks.")),
        tie_word_embeddings=False,
    )
    return text


def export_mllama(model, path: str | os.PathLike) -> None:
    """Write ``model`` as a Hugging Face Mllama folder (safetensors, 4.x/5.x on-disk names), atomically."""
    config: ModelConfig = model.config
    if not isinstance(config.image_encoder, ImageEncoderConfig):
        raise ValueError("only the Llama 3 image encoder has a Mllama layout (not open_clip / timm backends)")
    if config.text.tie_embeddings:
        raise ValueError("Mllama does not tie the output head to the embedding")
    layout, depth = _merged_layout(config)
    mm_to_merged = {p: m for m, p in layout.items()}
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out: dict[str, torch.Tensor] = {
        "language_model.model.embed_tokens.weight": torch.cat(
            [state.pop("backbone.embed_tokens.weight"), state.pop("extra_embeddings.weight")]
        ),
        "language_model.model.norm.weight": state.pop("backbone.norm.weight"),
        "language_model.lm_head.weight": state.pop("backbone.lm_head.weight"),
    }
    for name, t in state.items():
        if name.startswith("projector."):
            out["multi_modal_projector." + name[len("projector.") :]] = t
        elif name.startswith("image_encoder."):
            out[
                vision_keys.mm_to_hf(name[len("image_encoder.") :], prefix=vision_keys.HF_CHECKPOINT_PREFIX)
            ] = t
        else:
            match = re.match(r"^(backbone\.layers\.\d+\.|image_blocks\.\d+\.)(.+)$", name)
            if not match:
                raise KeyError(f"no Mllama name for {name!r}")
            prefix, rest = match.groups()
            if prefix.startswith("image_blocks."):
                rest = _CROSS_LAYER_MM[rest]
            out[f"language_model.model.layers.{mm_to_merged[prefix]}.{rest}"] = t
    dtype = str(model.dtype).removeprefix("torch.")
    hf_config = {
        "architectures": ["MllamaForConditionalGeneration"],
        "model_type": "mllama",
        "image_token_index": config.image_token_id,
        "text_config": _hf_text_config(config, depth, layout),
        "vision_config": {**config.image_encoder.to_hf(), "model_type": "mllama_vision_model"},
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    with atomic_dir(path) as tmp:
        save_file(out, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        _export_preprocessing(model, tmp)


def _export_preprocessing(model, folder: Path) -> None:
    """The tokenizer, ``preprocessor_config.json`` and ``generation_config.json`` of a model that has them.

    A tiktoken tokenizer is written as ``original/tokenizer.model`` (where Meta's Hugging Face
    folders keep it); mm reads it back from there, transformers needs a ``tokenizer.json``.
    """
    from mm.text_backbone.tokenizer import TiktokenTokenizer

    pre = getattr(model, "preprocessor", None)
    if pre is not None:
        if isinstance(pre.tokenizer, TiktokenTokenizer):
            (folder / "original").mkdir(exist_ok=True)
            pre.tokenizer.save(folder / "original")
        else:
            pre.tokenizer.save(folder)
        if pre.image_processor is not None:
            (folder / "preprocessor_config.json").write_text(
                json.dumps(pre.image_processor.to_hf_config(), indent=2) + "\n"
            )
    defaults = getattr(model, "generation_defaults", None)
    if defaults is not None:
        (folder / "generation_config.json").write_text(json.dumps(defaults.to_hf(), indent=2) + "\n")
