"""Training objectives a stage can name: next-token prediction, and BEST-RQ for the speech encoder.

* ``lm`` (every image, video and speech stage of the Llama 3 paper): next-token cross-entropy on
  the labelled tokens. A micro-batch weighs its number of labelled tokens, so the loss is the mean
  over the labelled tokens of the whole global batch, whatever the number of processes.
* ``best_rq`` (section 8.1.3, speech encoder pre-training): a frozen random-projection quantiser
  gives each 40 ms frame 16 codebook targets; spans of masked input frames are predicted by
  per-codebook classifiers on the encoder output. A micro-batch weighs 1 (its loss is already a
  mean over its masked frames). The classifiers exist only during the stage: they are attached to
  the model as ``best_rq_head`` (so DDP/FSDP synchronise them and checkpoints keep them for a
  resume) and removed before the model is saved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm.encoders.best_rq import BestRqHead, BestRqQuantizer, best_rq_loss

__all__ = ["BestRqSettings", "attach_objective", "batch_weight", "detach_objective", "objective_loss_sum"]


@dataclass(frozen=True, kw_only=True)
class BestRqSettings:
    """BEST-RQ as the Llama 3 paper uses it: 4 stacked frames -> 16 dims, 16 codebooks of 8,192
    normalised entries, spans of 32 input frames masked with probability 2.5%."""

    proj_dim: int = 16
    codebook_size: int = 8192
    num_codebooks: int = 16
    mask_prob: float = 0.025
    span: int = 32
    noise_std: float = 0.1
    seed: int = 0


def attach_objective(model: nn.Module, objective: str, settings: BestRqSettings | None) -> None:
    """Add what an objective needs to ``model`` (the BEST-RQ quantiser and classifiers)."""
    if objective == "lm":
        return
    if objective != "best_rq":
        raise ValueError(f"unknown objective {objective!r}")
    if model.speech_encoder is None:
        raise ValueError("the best_rq objective pre-trains the speech encoder; this model has none")
    s = settings or BestRqSettings()
    enc = model.speech_encoder.config
    model.best_rq_quantizer = BestRqQuantizer(
        input_dim=enc.input_dim,
        stack=enc.stack,
        proj_dim=s.proj_dim,
        codebook_size=s.codebook_size,
        num_codebooks=s.num_codebooks,
        seed=s.seed,
    ).to(model.device)
    model.best_rq_head = BestRqHead(
        enc.width, codebook_size=s.codebook_size, num_codebooks=s.num_codebooks
    ).to(model.device)
    model.best_rq_settings = s


def detach_objective(model: nn.Module) -> None:
    """Remove what :func:`attach_objective` added, so the saved model holds only its own parts."""
    for name in ("best_rq_quantizer", "best_rq_head"):
        if hasattr(model, name):
            delattr(model, name)
    if hasattr(model, "best_rq_settings"):
        del model.best_rq_settings


def batch_weight(objective: str, batch: dict[str, Any]) -> int:
    """How much a micro-batch counts in the global mean (known before the forward pass)."""
    if objective == "lm":
        return int((batch["labels"][:, 1:] != -100).sum())
    return 1


def speech_pretraining_loss(
    model, audio_features: torch.Tensor, audio_lengths: torch.Tensor, seed: int
) -> torch.Tensor:
    """The BEST-RQ loss of one micro-batch; ``seed`` fixes its masks (so a resumed run repeats them)."""
    s = model.best_rq_settings
    generator = torch.Generator(device=audio_features.device).manual_seed(int(seed))
    return best_rq_loss(
        model.speech_encoder,
        model.best_rq_quantizer,
        model.best_rq_head,
        audio_features,
        audio_lengths,
        generator=generator,
        prob=s.mask_prob,
        span=s.span,
        noise_std=s.noise_std,
    )


def objective_loss_sum(out, objective: str, weight: int) -> torch.Tensor:
    """The micro-batch's loss times its weight (its share of the global mean), in float32."""
    if objective == "lm":
        return out.loss.float() * out.num_label_tokens
    return out.loss.float() * weight
