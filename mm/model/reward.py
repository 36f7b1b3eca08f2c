"""The reward head and scoring of answers (Llama 3 section 7.5.2, reward modelling).

Shapes: b batch, s tokens, d model width.

A reward model is a :class:`~mm.model.MultimodalModel` whose config has ``reward_head=True``: a
``Linear(d, 1)`` reads the final hidden state, after the backbone's final norm, of the sequence's
last answer token (the ``<|eot_id|>`` that closes the last assistant turn, the last labelled
position). The head is a component of its own, saved with the adapters; the logits never see it,
so a text-only prompt still gives the backbone's logits bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["answer_rewards", "attach_reward_head", "build_reward_head", "last_labelled", "score_batch"]


def build_reward_head(embed_dim: int) -> nn.Linear:
    """The scalar head ``Linear(d, 1)``."""
    return nn.Linear(embed_dim, 1, bias=True)


def attach_reward_head(model: nn.Module) -> None:
    """Give ``model`` a fresh reward head (and ``reward_head=True`` in its config) unless it has one.

    The reward stage starts from the SFT model, which has none (section 7.5.2)."""
    if getattr(model, "reward_head", None) is not None:
        return
    model.config = model.config.replace(reward_head=True)
    model.reward_head = build_reward_head(model.config.text.embed_dim).to(
        device=model.device, dtype=model.dtype
    )


def last_labelled(labels: torch.Tensor) -> torch.Tensor:
    """Index ``[b]`` of the last position whose label is not -100 (the answer's closing token).

    Raises:
        ValueError: a row has no labelled token (no answer to score).
    """
    keep = labels != -100  # [b, s]
    if not bool(keep.any(dim=1).all()):
        raise ValueError("a row has no answer tokens (labels are all -100): nothing to score")
    positions = torch.arange(labels.shape[1], device=labels.device).expand_as(labels)
    return torch.where(keep, positions, -1).amax(dim=1)


def answer_rewards(model: nn.Module, kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The reward ``[b]`` (float32) of each row of a batch as ``model(**kwargs)`` takes it.

    Args:
        model: a :class:`~mm.model.MultimodalModel` with a reward head.
        kwargs: ``input_ids``, ``attention_mask``, ``labels`` (the scored answer's tokens labelled)
            and the media inputs; the labels only locate the answer's last token.
    """
    head = getattr(model, "reward_head", None)
    if head is None:
        raise ValueError("this model has no reward head (its config has reward_head: false)")
    inputs = dict(kwargs)
    labels = inputs.pop("labels")
    out = model(**inputs, return_logits=True)
    h = out.hidden  # [b, s, d], before the final norm
    rows = torch.arange(h.shape[0], device=h.device)
    last = h[rows, last_labelled(labels).to(h.device)]  # [b, d]
    return head(model.backbone.norm(last)).squeeze(-1).float()  # [b]


@torch.no_grad()
def score_batch(model: nn.Module, conversations: Sequence[Sequence[Mapping[str, Any]]]) -> list[float]:
    """Rewards of conversations that each end with the assistant answer to score (one batch)."""
    if model.preprocessor is None:
        raise ValueError("the model has no preprocessor (tokenizer and preprocessing settings)")
    samples = []
    for i, messages in enumerate(conversations):
        if not messages or messages[-1].get("role") != "assistant":
            raise ValueError(f"conversation {i} must end with the assistant answer to score")
        samples.append(model.preprocessor.encode(messages))
    batch = model.preprocessor.collate(samples)
    device = model.device
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = model.training
    model.eval()
    try:
        return [float(r) for r in answer_rewards(model, batch)]
    finally:
        model.train(was_training)
