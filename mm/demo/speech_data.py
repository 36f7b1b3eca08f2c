"""Spoken data of ``mm demo --speech``: what is said, for which task, and the answer expected.

Three tasks, each a Llama 3 chat turn (:func:`speech_messages`):

* *Recognition* (``asr``): the user says "Repeat after me in English." in text and a short
  description in speech ("The red circle."); the assistant answers with the transcript.
* *Translation* (``ast``): the user says "Translate the following sentence into French." in text
  and the same kind of description in speech; the assistant answers in French ("The green cross."
  -> "La croix verte.": :func:`to_french`, where the colour follows the noun and agrees with it).
  The paper's translation data goes from other languages into English; hibari's bundled voice
  speaks English only (its other voices download at run time), so the demo translates out of
  English.
* *Spoken question answering* (``qa``): the user's turn is only speech ("What colour is the
  sky?"); the assistant answers with one colour word ("blue."), as the backbone's text corpus
  answers its questions; the facts are the corpus's (:data:`~mm.demo.text_data.COLOUR_FACTS`).

Evaluation holds out colour-shape pairs (:data:`~mm.demo.scenes.HELDOUT_COLOUR_SHAPE`: no training
utterance says "red triangle"), sentence forms (half the evaluation utterances are phrased in ways
never heard in training, for all three tasks) and speaking speeds and seeds. Every evaluation word
was heard in training: a model cannot transcribe a word it has never heard, so "held-out words"
here means held-out *word sequences*. Speech is synthesised offline with hibari's bundled voice
(:func:`synthesize`, :mod:`mm.serving.speech_out`) at varied speed and noise seed.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mm._io import atomic_dir
from mm.demo.scenes import COLOURS, HELDOUT_COLOUR_SHAPE, SHAPES, Phrasings
from mm.demo.text_data import COLOUR_FACTS

if TYPE_CHECKING:
    import torch

__all__ = [
    "ASR_PROMPT",
    "ASR_TEMPLATES",
    "AST_PROMPT",
    "FRENCH_TEMPLATES",
    "QA_TEMPLATES",
    "TASK_PROMPTS",
    "SpeechSample",
    "make_speech_samples",
    "speech_messages",
    "synthesize",
    "to_french",
    "write_speech_folder",
]

ASR_PROMPT = "Repeat after me in English."
AST_PROMPT = "Translate the following sentence into French."
TASK_PROMPTS = {"asr": ASR_PROMPT, "ast": AST_PROMPT}
"""The text before the speech, per task (spoken questions have none: the speech is the turn)."""

ASR_TEMPLATES = Phrasings(
    train=(
        "The {colour} {shape}.",
        "A {colour} {shape}.",
        "The {shape} is {colour}.",
        "This is a {colour} {shape}.",
        "I see a {colour} {shape}.",
        "Look at the {colour} {shape}.",
        "My {shape} is {colour}.",
        "One {colour} {shape}.",
    ),
    heldout=("A {shape} is {colour}.",),
)
"""Sentences spoken for recognition; ``heldout`` ones are said only in evaluation."""

FRENCH_TEMPLATES: dict[str, str] = {
    "The {colour} {shape}.": "{le} {shape} {colour}.",
    "A {colour} {shape}.": "{un} {shape} {colour}.",
    "The {shape} is {colour}.": "{le} {shape} est {colour}.",
    "This is a {colour} {shape}.": "C'est {un} {shape} {colour}.",
    "I see a {colour} {shape}.": "Je vois {un} {shape} {colour}.",
    "Look at the {colour} {shape}.": "Regarde {le} {shape} {colour}.",
    "My {shape} is {colour}.": "{mon} {shape} est {colour}.",
    "One {colour} {shape}.": "{un} {seul} {shape} {colour}.",
    "A {shape} is {colour}.": "{un} {shape} est {colour}.",
}
"""French for every recognition sentence form (the translation task's answers): in French the
colour follows the shape and agrees with its gender, and the article does too."""

_FRENCH_SHAPES = {
    "circle": ("cercle", "m"),
    "square": ("carré", "m"),
    "triangle": ("triangle", "m"),
    "cross": ("croix", "f"),
}
_FRENCH_COLOURS = {
    "red": ("rouge", "rouge"),
    "green": ("vert", "verte"),
    "blue": ("bleu", "bleue"),
    "yellow": ("jaune", "jaune"),
}
_FRENCH_WORDS = {"le": ("le", "la"), "un": ("un", "une"), "mon": ("mon", "ma"), "seul": ("seul", "seule")}


def to_french(template: str, colour: str, shape: str) -> str:
    """The French of ``template`` (a key of :data:`FRENCH_TEMPLATES`) said of ``colour`` ``shape``:
    ``to_french("The {colour} {shape}.", "green", "cross") == "La croix verte."``."""
    if template not in FRENCH_TEMPLATES:
        raise ValueError(f"no French for the sentence form {template!r}")
    noun, gender = _FRENCH_SHAPES[shape]
    g = gender == "f"
    words = {k: v[g] for k, v in _FRENCH_WORDS.items()}
    text = FRENCH_TEMPLATES[template].format(shape=noun, colour=_FRENCH_COLOURS[colour][g], **words)
    return text[0].upper() + text[1:]


QA_TEMPLATES = Phrasings(
    train=(
        "What colour is {thing}?",
        "Which colour is {thing}?",
        "What is the colour of {thing}?",
        "Say the colour of {thing}.",
        "Do you know the colour of {thing}?",
        "I wonder what colour {thing} is.",
        "Name the colour of {thing}.",
        "What colour do you see in {thing}?",
    ),
    heldout=("Tell me the colour of {thing}.", "Which colour does {thing} have?"),
)
"""Spoken questions; ``heldout`` phrasings are said only in evaluation."""


@dataclass(frozen=True, kw_only=True)
class SpeechSample:
    """One utterance: what is said, how, and the answer the assistant should give.

    Attributes:
        task: ``"asr"`` (recognition), ``"ast"`` (translation into French) or ``"qa"`` (spoken
            question answering).
        text: the words spoken.
        answer: the transcript (``asr``), its French (``ast``) or the colour (``qa``).
        heldout_phrasing: whether ``text`` uses a template never heard in training.
        speed: hibari's speaking rate.
        seed: hibari's noise seed.
    """

    task: str
    text: str
    answer: str
    heldout_phrasing: bool
    speed: float
    seed: int


def make_speech_samples(num: int, task: str, *, split: str, seed: int) -> list[SpeechSample]:
    """Utterances for ``task`` in ``split`` (``"train"`` or ``"eval"``), deterministic in ``seed``.

    Training recognition and translation never say a colour-shape pair of
    :data:`~mm.demo.scenes.HELDOUT_COLOUR_SHAPE`; evaluation always says one. Evaluation uses the
    held-out templates for half its utterances. Answers are drawn in shuffled blocks, so any run of
    samples is balanced over them.
    """
    if task not in ("asr", "ast", "qa") or split not in ("train", "eval"):
        raise ValueError(
            f"task must be 'asr', 'ast' or 'qa' and split 'train' or 'eval', got {task!r}, {split!r}"
        )
    # The stream's name is the data: it keeps the name of the module it was born in (mm.demo_speech).
    rng = random.Random(f"mm.demo_speech:{task}:{split}:{seed}")
    templates = QA_TEMPLATES if task == "qa" else ASR_TEMPLATES
    if task != "qa":
        pairs = [(c, s) for c in COLOURS for s in SHAPES]
        pool = [p for p in pairs if (p in HELDOUT_COLOUR_SHAPE) == (split == "eval")]
    else:
        pool = sorted(COLOUR_FACTS)
    out: list[SpeechSample] = []
    block: list[Any] = []
    for i in range(num):
        if not block:
            block = list(pool)
            rng.shuffle(block)
        item = block.pop()
        heldout = split == "eval" and i % 2 == 1
        template = rng.choice(templates.heldout if heldout else templates.train)
        if task != "qa":
            colour, shape = item
            text = answer = template.format(colour=colour, shape=shape)
            if task == "ast":
                answer = to_french(template, colour, shape)
        else:
            text = template.format(thing=item)
            answer = f"{COLOUR_FACTS[item]}."  # one word, as the text corpus answers its questions
        out.append(
            SpeechSample(
                task=task,
                text=text[0].upper() + text[1:],
                answer=answer[0].upper() + answer[1:] if task != "qa" else answer,
                heldout_phrasing=heldout,
                speed=round(rng.uniform(0.85, 1.2), 3),
                seed=rng.randrange(2**31),
            )
        )
    return out


def speech_messages(sample: SpeechSample, audio: Any) -> list[dict[str, Any]]:
    """Llama 3 chat messages of a sample whose audio part holds ``audio`` (a waveform or a field)."""
    content: list[dict[str, Any]] = []
    if sample.task in TASK_PROMPTS:
        content.append({"type": "text", "text": TASK_PROMPTS[sample.task]})
    content.append({"type": "audio", "audio": audio})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": sample.answer}]


def synthesize(samples: Sequence[SpeechSample], *, sample_rate: int = 16000) -> list[torch.Tensor]:
    """Waveforms ``[samples]`` of every utterance, at ``sample_rate`` (hibari's bundled voice)."""
    from mm.serving.speech_out import get_synthesizer

    synth = get_synthesizer()
    return [synth(s.text, speed=s.speed, seed=s.seed, sample_rate=sample_rate) for s in samples]


def write_speech_folder(
    samples: Sequence[SpeechSample], waves: Sequence[torch.Tensor], out_dir: Path, *, sample_rate: int = 16000
) -> None:
    """Write ``KEY.wav`` + ``KEY.json`` per sample (mm's sample schema) for ``mm data pack``."""
    from mm.serving.speech_out import wav_bytes

    with atomic_dir(out_dir) as tmp:
        for i, (sample, wave) in enumerate(zip(samples, waves)):
            key = f"{sample.task}-{i:06d}"
            (tmp / f"{key}.wav").write_bytes(wav_bytes(wave, sample_rate))
            row = {"messages": speech_messages(sample, f"{key}.wav"), "meta": dataclasses.asdict(sample)}
            (tmp / f"{key}.json").write_text(json.dumps(row) + "\n", encoding="utf-8")
