"""The text task: mm's promise measured on a text benchmark, and that benchmark scored by log-likelihood.

mm promises that a text-only prompt gives the backbone's logits bit for bit (../shared/DESIGN.md). The
``text`` task checks it on real prompts: every query (with each of its choices) goes through
``model.backbone`` alone and through the multimodal model, and the report says whether

* the logits are equal (``torch.equal`` on every batch),
* the log-likelihood of every choice after its query is equal (``max_abs_loglikelihood_diff``, exactly
  0.0 for an mm model), and
* the greedy answers to every query (``max_new_tokens``, the model's stop tokens) are the same tokens.

The same log-likelihoods score the file as lm-evaluation-harness scores a multiple-choice task
(``output_type: multiple_choice``): per question, the choice with the highest summed log-probability of
``" " + choice`` after the query is the prediction (``acc``, the task's score), and the highest per
character of the choice (``acc_norm``, lm-eval's length normalisation ``ll / len(choice)``) is reported
beside it. The pair is split into tokens as lm-eval does: whitespace at the end of the query moves to the
continuation, and the continuation's tokens are those of ``query + continuation`` past the query's own
tokens. Every sequence starts with ``<|begin_of_text|>`` (Llama 3 is trained with it; lm-eval's HF
backend adds it for Llama tokenizers).

File: JSON Lines (or a JSON list), one question a record, lm-eval's processed-document style:

* ``query`` (used verbatim), or ``question`` (written ``"Question: {question}\\nAnswer:"``, lm-eval's
  ARC / SciQ template);
* ``choices``: at least two strings;
* ``gold`` (or ``label``, or ``answer``): the 0-based index of the right choice;
* ``id`` (optional; else the record's 0-based index).

Shapes: b batch, s tokens, V vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm.eval.samples import EvalDataError, EvalSample, TaskData, TaskOptions, load_records

if TYPE_CHECKING:
    import torch

__all__ = ["TEXT_MAX_NEW_TOKENS", "evaluate_text", "read_text", "split_pair"]

TEXT_MAX_NEW_TOKENS = 32
"""Default length of the greedy answers compared in the regression."""


def read_text(data: Path, options: TaskOptions) -> TaskData:
    """A multiple-choice text file (module docstring)."""
    options.refuse("text", "answers", "split", "media", "prompt")
    samples = []
    for index, rec in enumerate(load_records(data)):
        if rec.has("query"):
            query = rec.get("query")
        else:
            query = f"Question: {rec.get('query', 'question').strip()}\nAnswer:"
        choices = rec.strings("choices", min_len=2)
        gold = rec.get("gold", "label", "answer", kind=int)
        if not 0 <= gold < len(choices):
            raise rec.error(f"the gold index {gold} is outside the {len(choices)} choices")
        sample_id = rec.get("id", kind=(str, int), required=False)
        samples.append(
            EvalSample(
                id=index if sample_id is None else sample_id,
                messages=[{"role": "user", "content": query}],
                references=(choices[gold],),
                extra={"query": query, "choices": choices, "gold": gold},
                source=rec.where,
            )
        )
    return TaskData(samples)


def split_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a context (after ``<|begin_of_text|>``) and of its continuation, split as lm-eval does.

    Returns:
        ``(context_ids, continuation_ids)``; their concatenation is the tokens of ``context +
        continuation`` after the begin-of-text token.
    """
    kept = context.rstrip()
    continuation = context[len(kept) :] + continuation
    whole = tokenizer.encode(kept + continuation)
    head = tokenizer.encode(kept)
    return [tokenizer.bos_id, *whole[: len(head)]], whole[len(head) :]


def _pad_id(tokenizer) -> int:
    """An id for padding (masked or past the end, so any id would do): the fine-tune pad token if any."""
    try:
        return tokenizer.pad_id
    except (KeyError, ValueError):
        return tokenizer.eos_id


def _continuation_logprob(logits: torch.Tensor, context: int, continuation: list[int]) -> float:
    """Sum of ``log p(continuation token)`` under a row's logits ``[s, V]`` (context tokens first)."""
    import torch

    rows = logits[context - 1 : context - 1 + len(continuation)].float()  # [c, V]: each predicts the next
    targets = torch.tensor(continuation, device=rows.device)[:, None]
    return float(torch.log_softmax(rows, dim=-1).gather(-1, targets).sum())


def _loglikelihoods(
    model,
    pairs: Sequence[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    tick: Callable[[], None],
) -> tuple[list[float], list[float], bool]:
    """Log-likelihood of every continuation through the model and through its backbone alone.

    Sequences are batched longest first and padded on the right, so every real position sees exactly its
    own prefix under the causal mask.

    Returns:
        ``(multimodal, backbone, whether every batch's logits were equal)``.
    """
    import torch

    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    through_model, through_backbone = [0.0] * len(pairs), [0.0] * len(pairs)
    equal = True
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(pairs[i][0]) + len(pairs[i][1]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [b, s]
        for row, i in enumerate(chunk):
            sequence = pairs[i][0] + pairs[i][1]
            ids[row, : len(sequence)] = torch.tensor(sequence)
        ids = ids.to(model.device)
        with torch.inference_mode():
            mm_logits = model(input_ids=ids).logits  # [b, s, V]
            bb_logits = model.backbone(ids)  # [b, s, V]
        equal = equal and torch.equal(mm_logits, bb_logits)
        for row, i in enumerate(chunk):
            context, continuation = pairs[i]
            through_model[i] = _continuation_logprob(mm_logits[row], len(context), continuation)
            through_backbone[i] = _continuation_logprob(bb_logits[row], len(context), continuation)
        tick()
    return through_model, through_backbone, equal


def _trim(tokens: list[int], stops: frozenset[int]) -> list[int]:
    for k, token in enumerate(tokens):
        if token in stops:
            return tokens[:k]
    return tokens


def _greedy_answers(
    model, prompts: Sequence[list[int]], batch_size: int, max_new_tokens: int, pad_id: int, tick
) -> tuple[list[list[int]], list[list[int]]]:
    """Greedy answer tokens of every prompt through the model and through its backbone (left-padded)."""
    import torch

    stops = tuple(model.stop_token_ids)
    through_model, through_backbone = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)  # [b, s]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - len(prompt) :] = torch.tensor(prompt)
            mask[row, width - len(prompt) :] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        new = min(max_new_tokens, model.config.text.max_seq_len - width)
        kwargs = dict(attention_mask=mask, max_new_tokens=new, stop_token_ids=stops)
        from_model = model.generate(ids, **kwargs).tolist()
        from_backbone = model.backbone.generate(ids, **kwargs).tolist()
        through_model += [_trim(t, frozenset(stops)) for t in from_model]
        through_backbone += [_trim(t, frozenset(stops)) for t in from_backbone]
        tick()
    return through_model, through_backbone


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value, the first on a tie (``np.argmax``, as lm-eval)."""
    return max(range(len(values)), key=lambda k: (values[k], -k))


def evaluate_text(
    model, samples: Sequence[EvalSample], *, batch_size: int, max_new_tokens: int, progress: bool = True
) -> tuple[list[str], list[float], dict[str, Any]]:
    """Score a text multiple-choice set by log-likelihood and check the backbone regression.

    Args:
        model: a :class:`~mm.MultimodalModel` with a preprocessor (its tokenizer).
        samples: from :func:`read_text`.
        batch_size: sequences per forward pass and prompts per generation batch.
        max_new_tokens: length of the compared greedy answers.
        progress: show a progress bar.

    Returns:
        ``(predictions, scores, details)``: the chosen choice and 1.0 / 0.0 per sample (``acc``), and the
        extra report keys ``acc_norm`` and ``regression`` (module docstring).
    """
    from tqdm.auto import tqdm

    tokenizer = model.preprocessor.tokenizer
    pad_id = _pad_id(tokenizer)
    pairs, owner, first = [], [], []  # first[k]: index in ``pairs`` of sample k's first choice
    for k, sample in enumerate(samples):
        first.append(len(pairs))
        for choice in sample.extra["choices"]:
            pairs.append(split_pair(tokenizer, sample.extra["query"], f" {choice}"))
            owner.append(k)
    context = model.config.text.max_seq_len
    for (head, tail), k in zip(pairs, owner):
        if len(head) + len(tail) > context:
            raise EvalDataError(
                f"{samples[k].source}: a choice makes {len(head) + len(tail)} tokens, more than the model's "
                f"context of {context}"
            )
    prompts = [split_pair(tokenizer, s.extra["query"], "")[0] for s in samples]
    batches = -(-len(pairs) // batch_size) + -(-len(prompts) // batch_size)
    with tqdm(total=batches, desc="text", unit="batch", disable=not progress) as bar:
        lls, lls_backbone, logits_equal = _loglikelihoods(
            model, pairs, batch_size, pad_id, lambda: bar.update()
        )
        answers, answers_backbone = _greedy_answers(
            model, prompts, batch_size, max_new_tokens, pad_id, lambda: bar.update()
        )

    predictions, scores, normalized = [], [], []
    for k, sample in enumerate(samples):
        choices, gold = sample.extra["choices"], sample.extra["gold"]
        mine = lls[first[k] : first[k] + len(choices)]
        best = _argmax(mine)
        predictions.append(choices[best])
        scores.append(float(best == gold))
        normalized.append(float(_argmax([ll / len(c) for ll, c in zip(mine, choices)]) == gold))
    diff = max(abs(a - b) for a, b in zip(lls, lls_backbone))
    differing = [s.id for s, a, b in zip(samples, answers, answers_backbone) if a != b]
    differing_ll = sorted({samples[o].id for o, a, b in zip(owner, lls, lls_backbone) if a != b}, key=str)
    regression = {
        "identical": logits_equal and diff == 0.0 and not differing,
        "logits_identical": logits_equal,
        "loglikelihoods_identical": diff == 0.0,
        "max_abs_loglikelihood_diff": diff,
        "answers_identical": not differing,
        "prompts": len(samples),
        "continuations": len(pairs),
        "max_new_tokens": max_new_tokens,
        "differing_answers": differing,
        "differing_loglikelihoods": differing_ll,
        "answers": [
            {"id": s.id, "answer": tokenizer.decode(a, skip_special=True)} for s, a in zip(samples, answers)
        ],
    }
    return predictions, scores, {"acc_norm": sum(normalized) / len(normalized), "regression": regression}
