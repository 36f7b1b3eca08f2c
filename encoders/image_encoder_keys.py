"""Explicit tables between :class:`~mm.encoders.ImageEncoder` parameter names and Hugging Face's
``MllamaVisionModel`` names.

:func:`hf_to_mm` and :func:`mm_to_hf` translate *bare* names, as ``MllamaVisionModel.state_dict()``
writes them (``transformer.layers.0.mlp.fc1.weight``) and as ``ImageEncoder.state_dict()`` writes
them (``layers.0.mlp.fc1.weight``). Inside a whole Mllama model the vision names carry a prefix,
passed as ``prefix=``:

* :data:`HF_CHECKPOINT_PREFIX` ``"vision_model."`` — what Llama 3.2 Vision's published
  ``*.safetensors`` hold, and what ``MllamaForConditionalGeneration.save_pretrained`` writes (checked
  with transformers 4.x and 5.24: 5.x reverts its in-memory renaming when saving);
* :data:`HF_MODULE_PREFIX` ``"model.vision_model."`` — ``MllamaForConditionalGeneration.state_dict()``
  in memory with transformers ≥ 4.52 (never on disk).

:func:`state_dict_from_hf` and :func:`state_dict_to_hf` convert whole dictionaries of tensors; the
tensors themselves need no reshaping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

__all__ = [
    "HF_CHECKPOINT_PREFIX",
    "HF_MODULE_PREFIX",
    "hf_to_mm",
    "mm_to_hf",
    "state_dict_from_hf",
    "state_dict_to_hf",
]

HF_CHECKPOINT_PREFIX = "vision_model."
HF_MODULE_PREFIX = "model.vision_model."

# Names outside the layer stacks: mm -> Hugging Face.
_MM_TO_HF_TOP = {
    "patch_embed.weight": "patch_embedding.weight",
    "class_embedding": "class_embedding",
    "positional_embedding.position": "gated_positional_embedding.embedding",
    "positional_embedding.tile_position.weight": "gated_positional_embedding.tile_embedding.weight",
    "positional_embedding.gate": "gated_positional_embedding.gate",
    "pre_tile_aspect_embedding.embedding.weight": "pre_tile_positional_embedding.embedding.weight",
    "pre_tile_aspect_embedding.gate": "pre_tile_positional_embedding.gate",
    "post_tile_aspect_embedding.embedding.weight": "post_tile_positional_embedding.embedding.weight",
    "post_tile_aspect_embedding.gate": "post_tile_positional_embedding.gate",
    "ln_pre.weight": "layernorm_pre.weight",
    "ln_pre.bias": "layernorm_pre.bias",
    "ln_post.weight": "layernorm_post.weight",
    "ln_post.bias": "layernorm_post.bias",
}

# Names inside one layer: mm -> Hugging Face. Global layers have the two gates as well.
_MM_TO_HF_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_norm.bias": "input_layernorm.bias",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp_norm.bias": "post_attention_layernorm.bias",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_MM_TO_HF_GATES = {"attn_gate": "gate_attn", "mlp_gate": "gate_ffn"}

# Layer stacks: mm list name -> (Hugging Face list name, table of names inside one of its layers).
_STACKS = {
    "layers": ("transformer.layers", _MM_TO_HF_LAYER),
    "global_layers": ("global_transformer.layers", {**_MM_TO_HF_LAYER, **_MM_TO_HF_GATES}),
}

_HF_TO_MM_TOP = {v: k for k, v in _MM_TO_HF_TOP.items()}
_HF_STACKS = {hf: (mm, {v: k for k, v in table.items()}) for mm, (hf, table) in _STACKS.items()}
_MM_LAYER = re.compile(r"^(layers|global_layers)\.(\d+)\.(.+)$")
_HF_LAYER = re.compile(r"^(transformer\.layers|global_transformer\.layers)\.(\d+)\.(.+)$")


def _strip(name: str, prefix: str) -> str:
    if not name.startswith(prefix):
        raise KeyError(f"{name!r} does not start with the prefix {prefix!r}")
    return name[len(prefix) :]


def hf_to_mm(name: str, prefix: str = "") -> str:
    """mm name of a Hugging Face Mllama vision tensor.

    Args:
        name: the Hugging Face name, starting with ``prefix``.
        prefix: ``""`` for bare ``MllamaVisionModel`` names, :data:`HF_CHECKPOINT_PREFIX` for names in
            a saved Mllama checkpoint, :data:`HF_MODULE_PREFIX` for an in-memory Mllama model.

    Raises:
        KeyError: the name is not one of the vision model's tensors.
    """
    bare = _strip(name, prefix)
    if bare in _HF_TO_MM_TOP:
        return _HF_TO_MM_TOP[bare]
    match = _HF_LAYER.match(bare)
    if match:
        stack, table = _HF_STACKS[match.group(1)]
        if match.group(3) in table:
            return f"{stack}.{match.group(2)}.{table[match.group(3)]}"
    raise KeyError(f"not a Mllama vision model tensor: {name!r}")


def mm_to_hf(name: str, prefix: str = "") -> str:
    """Hugging Face name of an :class:`~mm.encoders.ImageEncoder` tensor, with ``prefix`` prepended.

    Raises:
        KeyError: the name is not one of the encoder's tensors.
    """
    if name in _MM_TO_HF_TOP:
        return prefix + _MM_TO_HF_TOP[name]
    match = _MM_LAYER.match(name)
    if match:
        stack, table = _STACKS[match.group(1)]
        if match.group(3) in table:
            return f"{prefix}{stack}.{match.group(2)}.{table[match.group(3)]}"
    raise KeyError(f"not an ImageEncoder tensor: {name!r}")


def state_dict_from_hf(
    tensors: Mapping[str, torch.Tensor], prefix: str = HF_CHECKPOINT_PREFIX
) -> dict[str, torch.Tensor]:
    """The encoder's state dict out of Hugging Face tensors.

    Only names starting with ``prefix`` are read (a whole Mllama checkpoint also holds the language
    model and the projector); each of them must be a vision tensor.
    """
    return {hf_to_mm(k, prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def state_dict_to_hf(
    tensors: Mapping[str, torch.Tensor], prefix: str = HF_CHECKPOINT_PREFIX
) -> dict[str, torch.Tensor]:
    """Hugging Face names (with ``prefix``) for every tensor of an encoder state dict."""
    return {mm_to_hf(k, prefix): v for k, v in tensors.items()}
