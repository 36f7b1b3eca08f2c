"""FSDP2 for a stage: how the model is sharded, and how ranks keep calling the same sharded modules.

Units (``torch.distributed.fsdp.fully_shard``), one per

* backbone decoder layer — frozen, but the bulk of the memory: each rank keeps ``1/N`` of it and
  gathers one layer at a time, in the forward and again in the backward (gradients flow *through*
  the frozen layers to earlier adapters);
* image-encoder layer (local and global), and the image encoder itself (patch and position
  embeddings, norms);
* image and video cross-attention block; their ``project_kv`` runs outside their ``forward`` (vision
  keys/values are computed once, before the layer loop) and is registered as an FSDP forward method;
* the speech encoder and the speech adapter, which an objective may call on their own;
* the model: everything left — token embeddings, final norm and output head (``prepare`` and
  ``head`` are called on the backbone, outside any unit but inside the model's forward),
  placeholder embeddings, projector, temporal aggregator;
* and the root, the stage's :class:`~mm.training.objectives.TrainStep`: the objective's heads.

Gradients are reduce-scattered as averages, as DDP all-reduces them, so the same loss scaling gives
the same update. Each rank must call the same units in the same order: for a micro-batch in which
some rank has images, ranks without any run the image path on a row that sees no image
(:func:`align_media`, the model's ``run_media_path``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping

import torch

from mm.encoders import ImageEncoder
from mm.model import MultimodalModel
from mm.text_backbone import TextBackbone

__all__ = ["align_media", "quiet_fsdp_views", "shard_step", "unsharded_copy"]

_MEDIA_KEYS = ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask")


def shard_step(step: torch.nn.Module, device: torch.device, world_size: int) -> torch.nn.Module:
    """Shard a :class:`~mm.training.objectives.TrainStep` in place over ``world_size`` processes
    (units: module docstring).

    Call after freezing and any resizing, before building the optimizer: parameters become DTensors.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    mesh = init_device_mesh(device.type, (world_size,))
    model: MultimodalModel = step.model
    for layer in model.backbone.layers:
        fully_shard(layer, mesh=mesh)
    enc = model.image_encoder
    if enc is not None:
        if isinstance(enc, ImageEncoder):
            for layer in [*enc.layers, *enc.global_layers]:
                fully_shard(layer, mesh=mesh)
        fully_shard(enc, mesh=mesh)
    for block in [*model.image_blocks, *model.video_blocks]:
        fully_shard(block, mesh=mesh)
        register_fsdp_forward_method(block, "project_kv")
    for part in (model.speech_encoder, model.speech_adapter):
        if part is not None:
            fully_shard(part, mesh=mesh)
    fully_shard(model, mesh=mesh)
    fully_shard(step, mesh=mesh)
    return step


def unsharded_copy(model: MultimodalModel, weights: Mapping[str, torch.Tensor]) -> MultimodalModel:
    """A plain (unsharded) model of ``model``'s configuration holding ``weights`` (its whole state)."""
    with torch.device("meta"):
        plain = MultimodalModel(model.config, backbone=TextBackbone(model.config.text))
    plain.load_state_dict(weights, strict=True, assign=True)
    plain.backbone.source = model.backbone.source
    plain.preprocessor = model.preprocessor
    plain.generation_defaults = model.generation_defaults
    plain.activation_checkpointing = model.activation_checkpointing
    return plain


@contextlib.contextmanager
def quiet_fsdp_views():
    """Silence FSDP2's warning that a unit returned a view (the image encoder's ``[..., :p]``
    slice, ``project_kv``'s transposed values): the model never changes those outputs in place,
    which is the only case the warning is about."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        yield


def align_media(micro: list[dict[str, torch.Tensor]], model: MultimodalModel, device: torch.device) -> None:
    """Make every rank call the same sharded modules for each micro-batch (in place).

    One all-reduce tells each rank whether any rank's micro-batch has placeholder tokens or images
    that some row can see (and the tile shape ``[t, 3, H, W]``). Where some rank has images, a rank
    without any gets an image input that no row can see; where none has, image inputs are dropped
    (no row could see them). A micro-batch whose media paths must run gets ``run_media_path``.
    """
    vocab = model.config.text.vocab_size
    info = torch.zeros(len(micro), 6, dtype=torch.long)
    for i, mb in enumerate(micro):
        if "cross_attention_mask" in mb and bool(mb["cross_attention_mask"].any()):
            info[i, 0] = 1
            info[i, 2:] = torch.tensor(mb["pixel_values"].shape[2:])  # [t, 3, H, W]
        info[i, 1] = int(bool((mb["input_ids"] >= vocab).any()))
    info = info.to(device)
    torch.distributed.all_reduce(info, op=torch.distributed.ReduceOp.MAX)
    info = info.cpu()
    for i, mb in enumerate(micro):
        if not info[i, 0]:
            for key in _MEDIA_KEYS:
                mb.pop(key, None)
        elif "pixel_values" not in mb:
            b, s = mb["input_ids"].shape
            t, c, h, w = (int(x) for x in info[i, 2:])
            dev = mb["input_ids"].device
            # Only one row is ever encoded: one tile set of zeros, broadcast (no copy) over rows.
            mb["pixel_values"] = torch.zeros(1, 1, t, c, h, w, device=dev).expand(b, 1, t, c, h, w)
            mb["aspect_ratio_ids"] = torch.zeros(b, 1, dtype=torch.long, device=dev)
            mb["aspect_ratio_mask"] = torch.zeros(b, 1, t, dtype=torch.long, device=dev)
            mb["cross_attention_mask"] = torch.zeros(b, s, 1, t, dtype=torch.long, device=dev)
        if bool(info[i, :2].any()):
            mb["run_media_path"] = True
