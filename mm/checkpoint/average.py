"""``mm average``: uniform weight averaging of trained models (a "model soup").

The Llama 3 paper (section 7.4, supervised fine-tuning) runs a hyperparameter sweep, ranks the runs
and averages the weights of the top-K. Every input must be an mm model folder with the same
configuration on the same backbone (equal digests); only the adapter and encoder weights are
averaged — the backbone is shared and untouched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch

from mm.model.multimodal import MultimodalModel
from mm.text_backbone.checkpoint import CheckpointError

__all__ = ["average_models", "run_average"]


def average_models(folders: Sequence[str | os.PathLike], out: str | os.PathLike) -> MultimodalModel:
    """Average the non-backbone weights of the models in ``folders`` and save the result to ``out``."""
    if len(folders) < 2:
        raise ValueError("averaging needs at least two models")
    first = MultimodalModel.from_pretrained(folders[0])
    digest = first.backbone.digest()
    total = {k: v.double().clone() for k, v in first.adapter_state_dict().items()}
    for folder in folders[1:]:
        other = MultimodalModel.from_pretrained(folder)
        if other.config != first.config:
            raise CheckpointError(f"{folder} has another model configuration than {folders[0]}")
        if other.backbone.digest() != digest:
            raise CheckpointError(f"{folder} sits on another backbone than {folders[0]}")
        for k, v in other.adapter_state_dict().items():
            total[k] += v.double()
    averaged = {k: (v / len(folders)).to(first.adapter_state_dict()[k].dtype) for k, v in total.items()}
    with torch.no_grad():
        first.load_state_dict(averaged, strict=False)
    first.save_pretrained(Path(out), copy_backbone=first.backbone.source is None)
    return first


def run_average(args) -> int:
    """``mm average`` (arguments: :mod:`mm.cli`)."""
    import sys

    from mm.text_backbone.checkpoint import CheckpointError

    try:
        average_models(args.models, args.out)
    except (CheckpointError, ValueError) as e:
        print(f"mm average: {e}", file=sys.stderr)
        return 2
    print(f"averaged {len(args.models)} models into {args.out}")
    return 0
