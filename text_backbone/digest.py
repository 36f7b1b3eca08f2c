"""A stable fingerprint of a set of tensors, used to prove that the backbone never changed."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch

__all__ = ["state_digest"]


def state_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of ``tensors``, in name order.

    Equal digests mean bit-identical weights. Tensors on any device are read through the CPU;
    one tensor at a time is copied, so the cost in memory is that of the largest tensor.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach()
        if hasattr(t, "full_tensor"):  # a sharded (FSDP2 / DTensor) weight: hash the whole of it
            t = t.full_tensor()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}\n".encode())
        flat = t.reshape(-1).contiguous().cpu()
        if flat.numel():
            h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()
