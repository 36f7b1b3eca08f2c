"""The reward-model objective (Llama 3 paper, sections 4.1.2 and 7.5.2).

The paper, for its vision reward model: "The vision encoder and the cross-attention layers are
initialized from the vision SFT model and unfrozen during training, while the self-attention layers
are initialized from the language RM and kept frozen. [...] We adopt the same training objective as
the language RM, but adding a weighted regularization term on the square of the reward logits
averaged over the batch, which prevents the reward scores from drifting." For the language RM
(section 4.1.2): "We remove margin term in the loss as we observe diminishing improvements after
data scaling", and "each preference ranking sample has two or three responses with clear ranking
(edited > chosen > rejected)".

So here: a scalar head on the last answer token (:mod:`mm.model.reward`); per sample, the pairwise
ranking loss ``-log sigmoid(r_better - r_worse)`` averaged over every ordered pair the sample gives
(edited > chosen, edited > rejected, chosen > rejected), **without** a margin term, plus
``square_weight`` times the mean of the squared rewards of the sample's answers (the paper's
regulariser; its weight is not stated in the paper). The paper concatenates a sample's answers into
one row; scoring them as separate rows of the batch gives the same rewards.

The text layers come from a text reward-model backbone, hot-swapped in by the stage's
``start: {hot_swap: PATH}`` exactly like the instruct backbone of SFT (and, like it, frozen and
digest-checked). The stage reports ranking accuracy on held-out pairs (``reward.heldout`` shards)
through :meth:`Reward.evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mm._values import as_int, check_values, optional
from mm.model.reward import answer_rewards, attach_reward_head
from mm.training._ranges import number, text
from mm.training.objectives import Objective

__all__ = ["Reward", "RewardSettings", "pairwise_loss", "ranking_accuracy"]


@dataclass(frozen=True, kw_only=True)
class RewardSettings:
    """Settings of a reward stage (the recipe's ``reward:`` block).

    Args:
        square_weight: weight of the mean squared reward (section 7.5.2's regulariser against
            drifting scores; the paper does not state its value). 0 turns it off.
        heldout: shards of held-out preference samples whose pairs' ranking accuracy the stage
            reports when it ends (``None``: none).
        heldout_batch_size: samples per batch while scoring them.
        max_heldout: at most this many held-out samples are scored.
    """

    square_weight: float = 0.0
    heldout: str | None = None
    heldout_batch_size: int = 8
    max_heldout: int = 1000

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "square_weight": number(low=0),
                "heldout": optional(text()),
                "heldout_batch_size": as_int(minimum=1),
                "max_heldout": as_int(minimum=1),
            },
        )


def _pairs(batch: dict[str, Any]) -> list[tuple[str, str, torch.Tensor | None]]:
    """``(better, worse, row mask or None)`` of every ordered pair a preference batch gives."""
    pairs: list[tuple[str, str, torch.Tensor | None]] = [("chosen", "rejected", None)]
    if "edited" in batch:
        mask = batch["edited_mask"]
        pairs += [("edited", "chosen", mask), ("edited", "rejected", mask)]
    return pairs


def pairwise_loss(
    rewards: dict[str, torch.Tensor], edited_mask: torch.Tensor | None = None, square_weight: float = 0.0
) -> torch.Tensor:
    """Per-sample loss ``[b]``: the mean over the sample's ordered pairs of
    ``-log sigmoid(r_better - r_worse)``, plus ``square_weight`` times the mean of its squared rewards.

    Args:
        rewards: ``[b]`` rewards of ``chosen``, ``rejected`` and optionally ``edited``.
        edited_mask: ``[b]``, True where the sample has an edited answer (needed with ``edited``).
    """
    chosen, rejected = rewards["chosen"], rewards["rejected"]
    total = -F.logsigmoid(chosen - rejected)
    squares = chosen.square() + rejected.square()
    count = torch.ones_like(chosen)
    answers = torch.full_like(chosen, 2.0)
    if "edited" in rewards:
        m = edited_mask.to(chosen.dtype)
        edited = rewards["edited"]
        total = total + m * (-F.logsigmoid(edited - chosen) - F.logsigmoid(edited - rejected))
        squares = squares + m * edited.square()
        count = count + 2 * m
        answers = answers + m
    return total / count + square_weight * squares / answers


def ranking_accuracy(
    rewards: dict[str, torch.Tensor], edited_mask: torch.Tensor | None = None
) -> tuple[int, int]:
    """``(pairs ranked right, pairs)``: a pair is right when the better answer's reward is higher."""
    right = int((rewards["chosen"] > rewards["rejected"]).sum())
    total = int(rewards["chosen"].numel())
    if "edited" in rewards:
        m = edited_mask.bool()
        right += int((rewards["edited"] > rewards["chosen"])[m].sum())
        right += int((rewards["edited"] > rewards["rejected"])[m].sum())
        total += 2 * int(m.sum())
    return right, total


class Reward(Objective):
    """Pairwise ranking loss of a scalar reward head (see the module docstring).

    A micro-batch weighs its number of samples, so the step's loss is the mean over the samples of
    the global batch. Gives ``model`` a reward head when it has none (the SFT model)."""

    name = "reward"
    preference_data = True

    def __init__(self, model: nn.Module, settings: RewardSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or RewardSettings()
        attach_reward_head(model)

    def weight(self, batch: dict[str, Any]) -> int:
        _check_preference_batch(batch)
        return int(batch["chosen"]["input_ids"].shape[0])

    def rewards(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``[b]`` rewards of each answer of a preference micro-batch."""
        _check_preference_batch(batch)
        return {
            name: answer_rewards(model, batch[name])
            for name in ("chosen", "rejected", "edited")
            if name in batch
        }

    def loss_sum(self, model: nn.Module, batch: dict[str, Any], seed: int) -> torch.Tensor:
        rewards = self.rewards(model, batch)
        return pairwise_loss(rewards, batch.get("edited_mask"), self.settings.square_weight).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, preprocessor) -> dict[str, float]:
        """Ranking accuracy on the held-out pairs of ``settings.heldout`` (``{}`` without them):
        ``{"heldout_accuracy": right / pairs, "heldout_pairs": pairs}``."""
        if self.settings.heldout is None:
            return {}
        from mm.datasets.webdata import ShardStream
        from mm.training.data import _Decode, collate_preferences

        stream = ShardStream(
            self.settings.heldout, rank=0, world_size=1, seed=0, epoch=0, decode=_Decode(preprocessor)
        )
        was_training = model.training
        model.eval()
        right = total = seen = 0
        pending: list[Any] = []

        def flush() -> None:
            nonlocal right, total
            batch = collate_preferences(preprocessor, pending)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            r, t = ranking_accuracy(self.rewards(model, batch), batch.get("edited_mask"))
            right, total = right + r, total + t
            pending.clear()

        try:
            for encoded, *_ in stream:
                if not hasattr(encoded, "chosen"):
                    raise ValueError(
                        f"reward.heldout {self.settings.heldout}: holds a sample that is no preference sample"
                    )
                pending.append(encoded)
                seen += 1
                if len(pending) == self.settings.heldout_batch_size:
                    flush()
                if seen >= self.settings.max_heldout:
                    break
            if pending:
                flush()
        finally:
            model.train(was_training)
        if not total:
            raise ValueError(f"reward.heldout {self.settings.heldout}: no usable preference sample")
        return {"heldout_accuracy": right / total, "heldout_pairs": total}


def _check_preference_batch(batch: dict[str, Any]) -> None:
    if "chosen" not in batch or "rejected" not in batch:
        raise ValueError(
            "the reward objective takes preference batches (chosen / rejected answers); "
            "this stage's data holds other samples"
        )
