"""The optimiser's parameter groups and the learning-rate schedule every stage uses."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping

import torch

__all__ = ["lr_factor", "param_groups"]


def lr_factor(step: int, *, steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``steps``."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def param_groups(
    named: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float,
    lr: float,
    lr_scale: Mapping[str, float],
):
    """AdamW groups: matrices decay, norms/biases/gates/embedding rows do not; ``lr_scale`` by glob.

    ``named`` gives the parameters with the names ``lr_scale`` patterns match (the model's own
    names; an objective's heads under ``objective.``).
    """
    groups: dict[tuple[float, float], list[torch.nn.Parameter]] = {}
    for name, p in named:
        if not p.requires_grad:
            continue
        decay = weight_decay if p.ndim >= 2 and "embed" not in name else 0.0
        scale = next((float(f) for pat, f in lr_scale.items() if fnmatch.fnmatch(name, pat)), 1.0)
        groups.setdefault((decay, lr * scale), []).append(p)
    return [{"params": ps, "weight_decay": d, "lr": g_lr} for (d, g_lr), ps in sorted(groups.items())]
