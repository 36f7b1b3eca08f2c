"""Preference pairs of ``mm demo``'s post-training phase: one picture, one question, two answers.

Each pair is an image question of :func:`mm.demo.image_data.make_image_qa` (so held-out
colour-shape-quadrant combinations stay apart exactly as there: ``"train"`` pairs never show one,
every ``"eval"`` pair does) with

* ``chosen``: the short correct answer (``"red"``), the form the image stages taught;
* ``rejected``, by the pair's place in the list (:data:`FLAWS`, a third of the pairs each):

  - **wrong**: another answer of the same kind, as short (``"blue"``; for a count, a neighbouring
    number, the mistake a model makes);
  - **verbose**: the correct answer buried in a long hedging sentence (``"Looking at the picture, I
    would say that the answer is probably red, but I am not completely sure."``);
  - **off-topic**: the question is worded as users word it and the image stages never did (one of
    the kind's held-out wordings, :data:`mm.demo.scenes.QUESTIONS`), and the rejected answer is
    true of the picture but answers another question: its caption (``"A red circle in the top
    left."``) or an answer of another kind (the corner when asked the colour). That is what the SFT
    model does with such wordings (its tiny frozen language model does not carry the image stages'
    answers over to new wordings; it falls back on captions and on other questions' answers), so
    these are the pairs DPO has something to teach on.

A user sees the difference at once: the rejected answer is false, padded, or beside the question. The pairs are
written as preference samples (``{"messages": [user: image + question], "chosen", "rejected"}``,
a JSONL manifest with PNG files beside it) and packed with ``mm data pack``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.demo._sampling import check_count
from mm.demo.image_data import QASample, make_image_qa
from mm.demo.scenes import QUESTIONS, caption

__all__ = [
    "FLAWS",
    "VERBOSE_TEMPLATES",
    "PreferencePair",
    "make_preference_pairs",
    "pair_prompt",
    "write_preference_manifest",
]

#: What is wrong with the rejected answer, by the pair's place in the list (``FLAWS[i % 3]``).
FLAWS = ("wrong", "verbose", "off-topic")

#: Long answers that hold the correct answer (``{answer}``) among many words.
VERBOSE_TEMPLATES = (
    "Looking at the picture, I would say that the answer is probably {answer}, but I am not completely sure.",
    "That is a good question. After thinking about it for a while, my best guess would be {answer}.",
    "Well, there are several possibilities here, and it is hard to tell, but I believe it is {answer}.",
    "If I had to give an answer to this question about the image, I would have to say {answer}, I think.",
)


@dataclass(frozen=True, kw_only=True)
class PreferencePair:
    """One preference pair.

    Attributes:
        sample: the image question (its ``answer`` is the chosen answer).
        chosen: the short correct answer.
        rejected: a wrong short answer, a verbose correct one or an off-topic one (``flaw``).
        flaw: one of :data:`FLAWS`.
    """

    sample: QASample
    chosen: str
    rejected: str
    flaw: str


def make_preference_pairs(
    num_pairs: int, *, split: str, seed: int, image_size: int = 56
) -> list[PreferencePair]:
    """``num_pairs`` pairs, a third each with a wrong, a verbose and an off-topic rejected answer
    (module docstring); ``split`` and ``seed`` as :func:`~mm.demo.image_data.make_image_qa` takes
    them, the same arguments giving the same pairs."""
    check_count("num_pairs", num_pairs)
    samples = make_image_qa(num_pairs, split=split, seed=seed, image_size=image_size)
    rng = random.Random(f"preference-{split}-{seed}")
    pairs = []
    for i, s in enumerate(samples):
        flaw = FLAWS[i % len(FLAWS)]
        if flaw == "off-topic":
            s = dataclasses.replace(s, question=rng.choice(QUESTIONS[s.kind].heldout))
            rejected = rng.choice(_off_topic(s))
        elif flaw == "wrong" and s.kind == "count":  # a neighbouring count: the hard mistake
            rejected = rng.choice([c for c in s.choices if abs(int(c) - int(s.answer)) == 1])
        elif flaw == "wrong":
            rejected = rng.choice([c for c in s.choices if c != s.answer])
        else:
            rejected = rng.choice(VERBOSE_TEMPLATES).format(answer=s.answer)
        pairs.append(PreferencePair(sample=s, chosen=s.answer, rejected=rejected, flaw=flaw))
    return pairs


def _off_topic(sample: QASample) -> list[str]:
    """True things to say about the picture that do not answer the question: its caption (a lone
    shape's) and the answers to questions of other kinds."""
    from mm.demo.scenes import quadrant

    first = sample.scene.shapes[0]
    facts = {"colour": first.colour, "shape": first.shape, "position": quadrant(first.x, first.y)}
    if len(sample.scene.shapes) > 1:  # several shapes: the first one's colour or shape is beside a count
        return [facts["colour"], facts["shape"]]
    return [caption(sample.scene)] + [v for k, v in facts.items() if k != sample.kind]


def pair_prompt(pair: PreferencePair, image_ref: Any = None) -> list[dict[str, Any]]:
    """The prompt of a pair: one user turn, the image (``image_ref``, or the picture itself) then the
    question."""
    ref = pair.sample.image if image_ref is None else image_ref
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": ref}, {"type": "text", "text": pair.sample.question}],
        }
    ]


def write_preference_manifest(pairs: Sequence[PreferencePair], folder: str | os.PathLike[str]) -> Path:
    """Write the pairs as ``KEY.png`` files and a ``pairs.jsonl`` manifest (keys ``000000``, ...;
    ``meta`` holds the question kind and the flaw) for :func:`mm.datasets.shards.pack`.

    Raises:
        FileExistsError: ``folder`` holds files already (they would be packed along).
    """
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise FileExistsError(f"{folder} is not empty")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, pair in enumerate(pairs):
        key = f"{i:06d}"
        pair.sample.image.save(folder / f"{key}.png", format="PNG")
        record = {
            "key": key,
            "messages": pair_prompt(pair, f"{key}.png"),
            "chosen": pair.chosen,
            "rejected": pair.rejected,
            "meta": {"kind": pair.sample.kind, "flaw": pair.flaw},
        }
        lines.append(json.dumps(record))
    manifest = folder / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest
