"""Training objectives a stage can name, each owning the modules it needs and calling the model's parts.

* ``lm`` (every image, video and speech stage of the Llama 3 paper): next-token cross-entropy on
  the labelled tokens. A micro-batch weighs its number of labelled tokens, so the loss is the mean
  over the labelled tokens of the whole global batch, whatever the number of processes.
* ``reward`` and ``dpo`` (section 7.5, post-training): on preference micro-batches
  (:func:`mm.training.data.collate_preferences`); see :mod:`mm.training.reward` and
  :mod:`mm.training.dpo`. Their objectives set ``preference_data = True``.
* ``best_rq`` (section 8.1.3, speech encoder pre-training): a frozen random-projection quantiser
  gives each 40 ms frame 16 codebook targets; spans of masked input frames are predicted by
  per-codebook classifiers on the speech encoder's output. A micro-batch weighs 1 (its loss is
  already a mean over its masked frames). The quantiser and classifiers belong to the objective,
  not to the model: they exist while the stage trains and are never part of a saved model.

An objective is an ``nn.Module`` (its heads are its submodules). The trainer wraps the model and the
objective in one :class:`TrainStep`, which is what DDP or FSDP see: the heads are synchronised and
checkpointed (under ``objective.``) like the adapters, and the model is called exactly as a user
calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mm._values import as_int, check_values
from mm.encoders.best_rq import BestRqHead, BestRqQuantizer, best_rq_loss
from mm.training._ranges import number

__all__ = [
    "OBJECTIVES",
    "BestRq",
    "BestRqSettings",
    "LanguageModeling",
    "Objective",
    "TrainStep",
    "build_objective",
]


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

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "proj_dim": as_int(minimum=1),
                "codebook_size": as_int(minimum=2),
                "num_codebooks": as_int(minimum=1),
                "mask_prob": number(low=0, high=1, low_open=True),
                "span": as_int(minimum=1),
                "noise_std": number(low=0),
                "seed": as_int(minimum=0),
            },
        )


class Objective(nn.Module):
    """A stage's loss. Subclasses say how much a micro-batch counts and what its loss sum is."""

    name: str = ""
    #: Whether the objective trains on preference micro-batches (:mod:`mm.training.data`).
    preference_data: bool = False

    def weight(self, batch: dict[str, Any]) -> int:
        """How much a micro-batch counts in the global mean (known before the forward pass)."""
        raise NotImplementedError

    def loss_sum(self, model: nn.Module, batch: dict[str, Any], seed: int) -> torch.Tensor:
        """The micro-batch's loss times its weight (its share of the global mean), in float32.

        ``seed`` fixes whatever the objective draws for this micro-batch (a resumed run repeats it).
        """
        raise NotImplementedError


class LanguageModeling(Objective):
    """Next-token cross-entropy on the labelled tokens (logits only where there are labels)."""

    name = "lm"

    def weight(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss_sum(self, model: nn.Module, batch: dict[str, Any], seed: int) -> torch.Tensor:
        out = model(**batch, return_logits=False)
        return out.loss.float() * out.num_label_tokens


class BestRq(Objective):
    """BEST-RQ pre-training of the speech encoder: a frozen quantiser gives the targets, a linear
    classifier per codebook predicts them on masked frames (:mod:`mm.encoders.best_rq`)."""

    name = "best_rq"

    def __init__(self, model: nn.Module, settings: BestRqSettings | None = None) -> None:
        super().__init__()
        if model.speech_encoder is None:
            raise ValueError("the best_rq objective pre-trains the speech encoder; this model has none")
        s = settings or BestRqSettings()
        enc = model.speech_encoder.config
        self.settings = s
        self.quantizer = BestRqQuantizer(
            input_dim=enc.input_dim,
            stack=enc.stack,
            proj_dim=s.proj_dim,
            codebook_size=s.codebook_size,
            num_codebooks=s.num_codebooks,
            seed=s.seed,
        )
        self.head = BestRqHead(enc.width, codebook_size=s.codebook_size, num_codebooks=s.num_codebooks)

    def weight(self, batch: dict[str, Any]) -> int:
        return 1

    def loss_sum(self, model: nn.Module, batch: dict[str, Any], seed: int) -> torch.Tensor:
        audio = batch.get("audio")
        if audio is None:
            raise ValueError("the best_rq objective needs audio")
        s = self.settings
        generator = torch.Generator(device=audio.features.device).manual_seed(int(seed))
        loss = best_rq_loss(
            model.speech_encoder,
            self.quantizer,
            self.head,
            audio.features,
            audio.frame_lengths(),
            generator=generator,
            prob=s.mask_prob,
            span=s.span,
            noise_std=s.noise_std,
        )
        return loss.float()


#: Objective names (``reward``: :mod:`mm.training.reward`, ``dpo``: :mod:`mm.training.dpo`, both
#: imported when built: they import this module).
OBJECTIVES = ("lm", "best_rq", "reward", "dpo")


def build_objective(
    name: str,
    model: nn.Module,
    best_rq: BestRqSettings | None = None,
    *,
    reward: Any = None,
    dpo: Any = None,
) -> Objective:
    """The objective a stage names, built for ``model`` (on its device), with the stage's settings
    block of that objective (``best_rq``, ``reward``: RewardSettings, ``dpo``: DpoSettings)."""
    if name == "lm":
        return LanguageModeling()
    if name == "best_rq":
        return BestRq(model, best_rq).to(model.device)
    if name == "reward":
        from mm.training.reward import Reward

        return Reward(model, reward).to(model.device)
    if name == "dpo":
        from mm.training.dpo import Dpo

        return Dpo(model, dpo).to(model.device)
    raise ValueError(f"unknown objective {name!r}; known: {list(OBJECTIVES)}")


class TrainStep(nn.Module):
    """The model and its stage's objective as one module (what DDP or FSDP wrap).

    ``forward(batch, seed)`` returns the micro-batch's loss sum (:meth:`Objective.loss_sum`).
    """

    def __init__(self, model: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.model = model
        self.objective = objective

    def forward(self, batch: dict[str, Any], seed: int = 0) -> torch.Tensor:
        return self.objective.loss_sum(self.model, batch, seed)
