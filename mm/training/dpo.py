"""Direct preference optimisation, the ``dpo`` objective (Llama 3 paper, sections 4.1.4 and 7.5).

The loss of one preference pair is DPO's (Rafailov et al. 2023), TRL's ``"sigmoid"`` loss::

    logit = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    loss  = -logsigmoid(logit) + nll_weight * nll_c

with ``pi_*`` / ``ref_*`` the summed log-probabilities of the chosen (``c``) and rejected (``r``)
answer's tokens under the policy and the reference, and ``nll_c`` the chosen answer's mean token
negative log-likelihood under the policy. What the paper adds to plain DPO, each a setting:

* **Formatting tokens masked** (section 4.1.4): special tokens — in an answer that is its closing
  ``<|eot_id|>`` / ``<|eom_id|>``; headers are never labelled — are left out of ``pi`` and ``ref``.
  Both answers end with the same token, and the contrastive loss would push its likelihood up and
  down at once (the paper saw tail repetition and abrupt termination).
* **NLL on the chosen answer** (section 4.1.4, weight 0.2, "similar to Pang et al. 2024"). It is
  normalised per pair, by the chosen answer's own number of labelled tokens, as in Pang et al.'s
  Iterative RPO (``-log p(chosen) / |chosen|``), and then averaged over pairs like the DPO term: a
  pair weighs the same whatever its length, and the global batch's loss does not depend on how it is
  split into micro-batches or processes (a token mean over each micro-batch would). The NLL counts
  every labelled token, the closing ``<|eot_id|>`` included: the masking above is about the
  contrastive term, and the policy must keep learning where an answer ends.
* **An EMA reference** (section 7.5, vision DPO): "instead of always freezing the reference model,
  updating it in an exponential moving average (EMA) fashion every k-steps helps the model learn
  more". ``reference: frozen`` keeps the usual fixed reference.

The reference never copies the backbone. Only the parameters that learn in the stage differ between
policy and reference, so the reference is a copy of exactly those (buffers of this objective, saved
in checkpoints under ``objective.reference.`` so that a resumed run continues exactly), and its
log-probabilities come from ``torch.func.functional_call(model, reference, ...)`` under ``no_grad``:
the same modules, the frozen backbone and encoders shared, the learning tensors swapped for the
reference's. The copy is taken at the first loss of the stage (the trainer sets ``requires_grad``
after it builds the objective), or read back from a checkpoint on resume.

A micro-batch weighs its number of pairs: the trainer's step loss is the mean over the global
batch's pairs. Each pair costs four forward passes (policy and reference, chosen and rejected) and
projects only the answers' positions to the vocabulary. An ``edited`` answer in the batch (the
ranking edited > chosen > rejected, used by the reward model) is not used here.

Shapes: b pairs, s tokens, V vocabulary, n labelled tokens of a batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from mm._values import as_bool, as_choice, as_int, check_values
from mm.training._ranges import number
from mm.training.objectives import Objective

__all__ = ["AnswerLogps", "Dpo", "DpoSettings", "answer_logps", "dpo_losses", "special_token_ids"]


@dataclass(frozen=True, kw_only=True)
class DpoSettings:
    """Settings of the ``dpo`` objective (a recipe stage's ``dpo:`` block).

    Attributes:
        beta: the KL strength of DPO; 0.1 is the paper's for text DPO (section 4.1.4).
        reference: ``"ema"`` (section 7.5: the reference follows the policy) or ``"frozen"`` (the
            policy at the start of the stage, the usual choice).
        ema_decay: with ``ema``, every ``ema_every`` optimiser steps
            ``ref <- ema_decay * ref + (1 - ema_decay) * policy``. Not stated in the paper; the
            defaults are TR-DPO's soft update (Gorbatovski et al. 2024, "Learn Your Reference Model
            for Real Good Alignment"), as TRL ships it: ``ref_model_mixup_alpha`` 0.6 (the policy's
            share, so a decay of 0.4) every ``ref_model_sync_steps`` 512.
        ema_every: optimiser steps between two EMA refreshes (not stated in the paper; see above).
        nll_weight: weight of the chosen answer's mean token NLL; 0.2 in the paper (section 4.1.4).
        mask_special_tokens: leave special / formatting tokens out of the DPO log-probabilities
            (section 4.1.4).
    """

    beta: float = 0.1
    reference: Literal["ema", "frozen"] = "ema"
    ema_decay: float = 0.4
    ema_every: int = 512
    nll_weight: float = 0.2
    mask_special_tokens: bool = True

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "beta": number(low=0, low_open=True),
                "reference": as_choice(("ema", "frozen")),
                "ema_decay": number(low=0, high=1),
                "ema_every": as_int(minimum=1),
                "nll_weight": number(low=0),
                "mask_special_tokens": as_bool(),
            },
        )


# ---------------------------------------------------------------------- the loss, as functions
@dataclass(frozen=True)
class AnswerLogps:
    """Per-row log-probabilities of the answer tokens of a batch.

    Attributes:
        dpo: ``[b]`` summed log-probability of the answer's tokens that DPO counts (labelled and,
            with masking, not special).
        total: ``[b]`` summed log-probability of every labelled token.
        count: ``[b]`` number of labelled tokens.
    """

    dpo: torch.Tensor
    total: torch.Tensor
    count: torch.Tensor


def special_token_ids(tokenizer: Any) -> torch.Tensor:
    """Every id the tokenizer calls special (its special tokens, placeholders and base ids aliasing
    them), sorted ``[k]``."""
    ids = set(tokenizer.special_tokens.values()) | set(tokenizer.base_special_tokens.values())
    return torch.tensor(sorted(ids), dtype=torch.long)


def answer_logps(out: Any, labels: torch.Tensor, special_ids: torch.Tensor | None = None) -> AnswerLogps:
    """Summed log-probabilities of each row's labelled tokens from a forward pass's output.

    Args:
        out: what ``model(**inputs)`` returned without labels: its final hidden states and head are
            used to project only the labelled positions (its ``.logits`` where it has none).
        labels: ``[b, s]`` next-token targets in Hugging Face's convention (position ``t`` predicts
            ``labels[t + 1]``), -100 ignored.
        special_ids: ids left out of :attr:`AnswerLogps.dpo` (``None``: none).
    """
    targets = labels[:, 1:]  # [b, s-1]
    keep = targets != -100
    rows = keep.nonzero()[:, 0]  # [n]
    hidden = getattr(out, "hidden", None)
    if hidden is not None:
        logits = out.head(hidden[:, :-1][keep])  # [n, V]
    else:
        logits = out.logits[:, :-1][keep]
    wanted = targets[keep]  # [n]
    token = torch.log_softmax(logits.float(), dim=-1).gather(-1, wanted[:, None])[:, 0]  # [n]
    b = labels.shape[0]
    zeros = torch.zeros(b, dtype=torch.float32, device=labels.device)
    total = zeros.index_add(0, rows, token)
    count = zeros.index_add(0, rows, torch.ones_like(token))
    if special_ids is None or special_ids.numel() == 0:
        return AnswerLogps(dpo=total, total=total, count=count)
    counted = ~torch.isin(wanted, special_ids.to(wanted.device))
    return AnswerLogps(dpo=zeros.index_add(0, rows, token * counted), total=total, count=count)


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO's per-pair loss and implicit rewards (Rafailov et al. 2023, eq. 7; TRL's ``"sigmoid"``).

    Args:
        policy_chosen, policy_rejected, reference_chosen, reference_rejected: ``[b]`` summed
            log-probabilities of each answer under the policy and the reference.
        beta: the KL strength.

    Returns:
        ``-logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` ``[b]``, and the implicit rewards
        ``beta * (pi_c - ref_c)`` and ``beta * (pi_r - ref_r)`` (detached).
    """
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen - rejected))
    return losses, beta * chosen.detach(), beta * rejected.detach()


# ---------------------------------------------------------------------- the objective
class _Reference(nn.Module):
    """The reference's copies of the learning parameters, as buffers under the parameters' own names
    (nested modules, so that ``image_blocks.0.gate`` is saved as ``reference.image_blocks.0.gate``)."""

    def __init__(self) -> None:
        super().__init__()
        # A resumed run's checkpoint holds the copies: create them so that loading fills them in.
        self.register_load_state_dict_pre_hook(self._create_from_checkpoint)

    def put(self, name: str, value: torch.Tensor) -> None:
        *path, leaf = name.split(".")
        module: nn.Module = self
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_buffer(leaf, value)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.named_buffers())

    def _create_from_checkpoint(
        self, module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_
    ) -> None:
        own = self.tensors()
        for key, value in state_dict.items():
            if key.startswith(prefix) and key[len(prefix) :] not in own:
                self.put(key[len(prefix) :], torch.empty_like(value))


class Dpo(Objective):
    """DPO with a frozen or EMA reference that shares the model's frozen parts (module docstring).

    Args:
        model: the :class:`~mm.model.MultimodalModel` the stage trains; with ``mask_special_tokens``
            its ``preprocessor`` gives the tokenizer whose special tokens are masked.
        settings: beta, the reference, the NLL weight, masking.

    A micro-batch is a preference batch ``{"chosen": inputs, "rejected": inputs, ...}`` whose
    ``inputs`` are what ``model(**inputs)`` takes, labels on the answer's tokens only.
    :meth:`after_step` refreshes an EMA reference; the trainer calls it after each optimiser step.
    """

    name = "dpo"
    preference_data = True

    def __init__(self, model: nn.Module, settings: DpoSettings | None = None) -> None:
        super().__init__()
        self.settings = settings or DpoSettings()
        special = torch.zeros(0, dtype=torch.long)
        if self.settings.mask_special_tokens:
            tokenizer = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
            if tokenizer is None:
                raise ValueError(
                    "dpo.mask_special_tokens needs the model's tokenizer (model.preprocessor), "
                    "and this model has none"
                )
            special = special_token_ids(tokenizer)
        self.register_buffer("special_ids", special, persistent=False)
        self.reference = _Reference()
        self._stats = torch.zeros(5, dtype=torch.float64)  # pairs, chosen, rejected, margin, correct

    # ------------------------------------------------------------------ the reference
    def reference_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The reference's tensors by parameter name, taken from the policy's learning parameters
        the first time (the start of the stage), checked against them after a resume."""
        learning = _learning_parameters(model)
        if not learning:
            raise ValueError("the dpo objective needs parameters that learn; this stage trains none")
        own = self.reference.tensors()
        if not own:
            with torch.no_grad():
                for name, p in learning.items():
                    self.reference.put(name, p.detach().clone())
            return self.reference.tensors()
        if own.keys() != learning.keys():
            extra, missing = sorted(own.keys() - learning.keys()), sorted(learning.keys() - own.keys())
            raise ValueError(
                "the dpo reference does not fit the parameters that learn in this stage "
                f"(reference only: {extra[:3]}, learning only: {missing[:3]})"
            )
        for name, p in learning.items():
            ref = own[name]
            if ref.shape != p.shape:
                raise ValueError(
                    f"the dpo reference's {name} has shape {tuple(ref.shape)}, the model's {tuple(p.shape)}"
                )
            if ref.device != p.device or ref.dtype != p.dtype:  # read from a checkpoint onto the CPU
                self.reference.put(name, ref.to(device=p.device, dtype=p.dtype))
        return self.reference.tensors()

    @torch.no_grad()
    def after_step(self, model: nn.Module, step: int) -> None:
        """After optimiser step ``step`` (1 after the first): with an EMA reference, every
        ``ema_every`` steps ``ref <- ema_decay * ref + (1 - ema_decay) * policy``."""
        s = self.settings
        if s.reference != "ema" or step % s.ema_every != 0:
            return
        reference = self.reference_tensors(model)
        for name, p in _learning_parameters(model).items():
            reference[name].mul_(s.ema_decay).add_(p.detach(), alpha=1.0 - s.ema_decay)

    # ------------------------------------------------------------------ the loss
    def weight(self, batch: dict[str, Any]) -> int:
        return int(batch["chosen"]["input_ids"].shape[0])

    def loss_sum(self, model: nn.Module, batch: dict[str, Any], seed: int) -> torch.Tensor:
        s = self.settings
        special = self.special_ids if s.mask_special_tokens else None
        reference = self.reference_tensors(model)
        policy, ref = {}, {}
        for side in ("chosen", "rejected"):
            inputs = dict(batch[side])
            labels = inputs.pop("labels")
            policy[side] = answer_logps(model(**inputs), labels, special)
            with torch.no_grad():
                out = torch.func.functional_call(model, reference, args=(), kwargs=inputs)
                ref[side] = answer_logps(out, labels, special)
        losses, chosen_rewards, rejected_rewards = dpo_losses(
            policy["chosen"].dpo, policy["rejected"].dpo, ref["chosen"].dpo, ref["rejected"].dpo, s.beta
        )
        chosen = policy["chosen"]
        nll = -chosen.total / chosen.count.clamp(min=1)  # [b] mean token NLL of the chosen answer
        self._record(chosen_rewards, rejected_rewards)
        return (losses + s.nll_weight * nll).sum()

    # ------------------------------------------------------------------ metrics
    def _record(self, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        margin = chosen - rejected
        stats = torch.stack(
            [
                torch.tensor(float(len(chosen)), device=chosen.device),
                chosen.sum(),
                rejected.sum(),
                margin.sum(),
                (margin > 0).float().sum(),
            ]
        )
        self._stats += stats.double().cpu()

    def pop_metrics(self) -> dict[str, float]:
        """Means over the pairs seen since the last call (this process's): the implicit rewards
        ``beta * (pi - ref)`` of chosen and rejected answers, their margin and how often the chosen
        one's is higher (TRL's ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``,
        ``rewards/accuracies``); empty when no pair was seen."""
        pairs, chosen, rejected, margin, correct = self._stats.tolist()
        self._stats.zero_()
        if pairs == 0:
            return {}
        return {
            "rewards_chosen": chosen / pairs,
            "rewards_rejected": rejected / pairs,
            "reward_margin": margin / pairs,
            "reward_accuracy": correct / pairs,
        }


def _learning_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters that learn in this stage, by name; sharded (FSDP) ones are refused."""
    learning = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if any(type(p).__name__ == "DTensor" or hasattr(p, "full_tensor") for p in learning.values()):
        raise ValueError(
            "the dpo objective does not run under FSDP yet (its reference copies whole tensors); "
            "train this stage with DDP (no --fsdp)"
        )
    return learning
