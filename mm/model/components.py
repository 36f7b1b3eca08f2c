"""Components of a multimodal model, and the one place where freezing is decided.

A component is a named group of parameters that learns or stays frozen as a unit:

=================  ============================================================
``backbone``       the text model (always frozen in mm)
``image_encoder``  the image encoder (ViT)
``image_adapter``  projector, image cross-attention blocks, placeholder embeddings
``video_adapter``  temporal aggregator and video cross-attention blocks
``speech_encoder`` the Conformer speech encoder
``speech_adapter`` the speech adapter
``reward_head``    the scalar head of a reward model (section 7.5.2)
=================  ============================================================
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

from torch import nn

__all__ = [
    "COMPONENTS",
    "check_trainable",
    "component_of",
    "is_pattern",
    "set_trainable",
    "trainable_components",
]

COMPONENTS = (
    "backbone",
    "image_encoder",
    "image_adapter",
    "video_adapter",
    "speech_encoder",
    "speech_adapter",
    "reward_head",
)

# First dotted name of a parameter -> its component.
_PREFIX = {
    "backbone": "backbone",
    "image_encoder": "image_encoder",
    "projector": "image_adapter",
    "image_blocks": "image_adapter",
    "extra_embeddings": "image_adapter",
    "video_aggregator": "video_adapter",
    "video_blocks": "video_adapter",
    "speech_encoder": "speech_encoder",
    "speech_adapter": "speech_adapter",
    "reward_head": "reward_head",
}


def component_of(param_name: str) -> str:
    """The component a parameter name belongs to (``"image_blocks.0.attn_gate"`` -> ``image_adapter``)."""
    head = param_name.split(".", 1)[0]
    if head not in _PREFIX:
        raise KeyError(f"parameter {param_name!r} belongs to no component")
    return _PREFIX[head]


def is_pattern(entry: str) -> bool:
    """Whether a trainable entry is a glob over parameter names (``"image_blocks.*"``), not a component."""
    return entry not in COMPONENTS and any(c in entry for c in "*?[.")


def check_trainable(entries: Iterable[str]) -> None:
    """Refuse unknown components and anything that would let the backbone learn."""
    entries = list(entries)
    unknown = [e for e in entries if e not in COMPONENTS and not is_pattern(e)]
    if unknown:
        raise ValueError(
            f"unknown trainable components {unknown}; known: {list(COMPONENTS)} "
            "(or glob patterns over parameter names)"
        )
    if "backbone" in entries or any(is_pattern(e) and fnmatch.fnmatchcase("backbone.x", e) for e in entries):
        raise ValueError("the backbone is never trained in mm: remove it from the trainable components")


def set_trainable(model: nn.Module, components: Iterable[str]) -> list[str]:
    """Make exactly the parameters of ``components`` trainable and freeze every other one.

    Entries are component names (``image_adapter``) or glob patterns over parameter names
    (``"image_blocks.*"``, ``"projector.*"``; a pattern never matches the backbone). Sets
    ``requires_grad`` on *every* parameter, so calling it twice gives the same result. The backbone
    can never be made trainable: that would break mm's promise.

    Returns:
        Names of the trainable parameters.
    """
    entries = list(components)
    check_trainable(entries)
    wanted = {e for e in entries if not is_pattern(e)}
    patterns = [e for e in entries if is_pattern(e)]
    trainable = []
    for name, p in model.named_parameters():
        component = component_of(name)
        learn = component in wanted or (
            component != "backbone" and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        )
        p.requires_grad_(learn)
        if learn:
            trainable.append(name)
    return trainable


def trainable_components(model: nn.Module) -> list[str]:
    """Components that currently have at least one trainable parameter, in canonical order."""
    found = {component_of(n) for n, p in model.named_parameters() if p.requires_grad}
    return [c for c in COMPONENTS if c in found]
