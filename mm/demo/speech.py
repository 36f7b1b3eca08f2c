"""The speech phase of ``mm demo --speech``: the frozen text model learns to hear (Llama 3, section 8).

Experimental: the three figures end well away from chance but far from perfect, and how fast the
speech encoder and adapter start to use the audio depends on their random initialisation (see
"What limits it" below).

Before this phase, ``mm demo --speech`` pre-trains its text model longer (2,000 steps instead of
150 with ``--quick`` and 600 without), with 30% of its documents replaced by "Repeat after me in
English." turns and 30% by "Translate the following sentence into French." turns
(:func:`mm.demo.run.sentence_turn`): recognition and translation through a frozen text model can be no
better than the text model repeating or translating the words as text, and the paper's text model
is an instruct model that can. Its perplexity on the held-out documents is then higher (5.08
against 3.15 in the quick run: 60% of what it read were such turns; 4.19 with half of them repeat
turns and no translation), and the image and video figures move with it (quick run, seed 0: image
QA 0.905, video QA 0.800).

Starting from the model the video phase saved, on speech synthesised offline with hibari's bundled
voice (:mod:`mm.serving.speech_out`; varied speed and noise seed):

1. **Data.** Three tasks, interleaved in one ``KEY.wav`` + ``KEY.json`` folder and packed into
   webdataset shards with :func:`mm.datasets.shards.pack` (the real data path: shards -> streaming
   -> audio decoding -> log-mel -> the staged trainer).

   * *Recognition*: the user says "Repeat after me in English." in text and a short description
     in speech ("The red circle."); the assistant answers with the transcript.
   * *Translation*: the user says "Translate the following sentence into French." in text and
     the same kind of description in speech; the assistant answers in French ("The green cross."
     -> "La croix verte.": :func:`to_french`, where the colour follows the noun and agrees with
     it). The paper's translation data goes from other languages into English; hibari's bundled
     voice speaks English only (its other voices download at run time), so the demo translates
     out of English.
   * *Spoken question answering*: the user's turn is only speech ("What colour is the sky?"); the
     assistant answers with one colour word ("blue."), as the backbone's text corpus answers its
     questions; the facts are the corpus's (:func:`mm.demo.data.make_text_corpus`:
     "The sky is blue.").

   Evaluation holds out colour-shape pairs (:data:`mm.demo.data.HELDOUT_COLOUR_SHAPE`:
   no training utterance says "red triangle"), sentence templates (half the evaluation
   utterances are phrased in ways never heard in training, for all three tasks) and speaking
   speeds/seeds. Every eval word was heard in training: a model cannot transcribe a word it has
   never heard, so "held-out words" here means held-out *word sequences*.

2. **Stages** (``mm/recipes/tiny-demo-speech.yaml``): ``speech-pretrain`` (BEST-RQ, only the
   speech encoder learns), then ``speech-sft`` (next-token loss on the answers of all tasks,
   interleaved in every batch; the speech encoder and adapter learn, the backbone is frozen). The
   adapter's output layer starts scaled to the size of the backbone's token embeddings
   (:func:`scale_adapter_output`).

3. **Evaluation**: greedy answers on the held-out utterances, read to their first full stop;
   ``speech_wer`` is the word error rate of the transcripts (word-level Levenshtein distance over
   reference words, summed over the set), ``speech_qa_accuracy`` the share of answers naming the
   right colour and no other, with ``speech_qa_chance`` (always answering the most common colour)
   and ``speech_wer_chance`` (the best single training transcript said for every utterance, i.e.
   a model that ignores the audio). ``speech_text_repeat_wer`` is the same recognition turn with
   the words given as *text* ("Repeat after me in English. The red circle."): text-only turns give
   the backbone's logits bit for bit, so it measures the frozen text model alone, the bound that
   recognition through it cannot pass. ``speech_bleu`` is the corpus BLEU of the translations
   (:func:`corpus_bleu`, sacreBLEU's default: 13a tokens, exp smoothing; checked against sacreBLEU
   in the tests), with ``speech_bleu_chance`` (the best single training translation said for every
   utterance) and ``speech_text_translate_bleu`` (the text model translating the words as text).

**What limits it.** Recognition needs the frozen model to *repeat* what it hears, byte by byte.
Pre-trained on documents alone, the demo's tiny text model could not repeat even text
(``speech_text_repeat_wer`` about 1) and recognition through it stayed at chance; the speech path
(input embeddings only, as in the paper) cannot teach it. With "Repeat after me" turns in place of
15-50% of its documents it repeated none of 40 sentences within 1,200 steps in most settings; with
half of them turns of these sentence forms, 8 of 40 after 1,000 steps and 40 of 40 after 2,000,
hence the longer text pre-training. It learns to repeat these forms, not text in general: with a
quarter of its documents turns of these forms and a quarter turns of random strings of the same
words, it repeated 37 of 40 sentences but 1 of 40 random strings after 2,000 steps. With 30% of
its documents repeat turns and 30% translation turns it repeated 40 of 40 sentences and translated
40 of 40 after 2,000 steps (25% and 25%: 39 and 39).

The rest is how fast the speech encoder and adapter start to use the audio. At first the answers
follow the text model's prior ("This is a red cross." for every utterance); when the audio starts
to count, the tasks improve together. (The rest of this paragraph was measured with recognition
and questions only, before translation was added.) At a learning rate of 3e-3 that took 500 to
more than 1,000 steps depending on the random initialisation (a hand harness over the same data
and model; the demo's trainer behaves the same from the same start); at 1e-3 three
initialisations, including the slowest one, reached word error rates 0.31-0.34 and spoken QA
0.75-0.86 after 600 steps (chance 0.77 and 0.30), training transcripts then almost word-perfect;
``mm demo --quick --speech`` (seed 0) ended at 0.31 and 0.86. What is left there (48 held-out utterances): the
sentence form never heard in training mostly came back as a heard one ("A circle is blue." ->
"The circle is blue."; 26 of 48 forms wrong), and the colour of the held-out pair was wrong in 24
of 48, the shape in 8: the words a pair never said together in training are the hard part.
Both tasks share the encoder and adapter; trained one after the other, the second undid the first
(recognition word error rate 0.92 after a question stage, spoken QA 0.16 after a recognition
stage), so every batch mixes them. Measured with a probe (the Conformer plus a linear classifier
over pooled frames, 400 steps), the encoder itself tells the ten things apart: 1.0 on phrasings
heard in training, about 0.65 on held-out ones, which is why training uses eight phrasings per
task.

With translation as a third task the stage needs more steps (hand harness, ``run_speech_demo`` on
a fresh start model over the text model above, quick data): from one initialisation 800 steps
ended at word error rate 0.51, BLEU 38 and spoken QA 0.75, 1,200 steps at 0.18, 67 and 0.84; two
other initialisations at 1,200 steps: 0.15 / 55 / 0.81 and 0.22 / 58 / 0.76 (chance 0.76-0.77,
7.4-8.2 and 0.30), hence 1,200 steps. ``mm demo --quick --speech`` ended at 0.17, 68.5 and 0.825
with seed 0 (chance 0.77, 7.4 and 0.30; the same in two runs) but at 0.52, 37.0 and 0.775 with
seed 1 (chance 0.76, 7.5, 0.30; with recognition and questions only, seed 1 had ended at 0.26 and
0.89): its training loss fell as far (0.01), but the held-out pairs' colour came back wrong in 35
of 48 recognition answers (seed 0: 9 of 48), and the held-out sentence form in 22 (seed 0: 7).
Which colour-shape pairs generalise depends on the run; the demo's figures are far from chance
but not stable to a few hundredths. Translation's errors are recognition's: the held-out pair's
colour or shape ("Look at the red triangle." -> "Regarde le triangle vert."), not the French; the
text model translates every evaluation sentence given as text (BLEU 100).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ASR_PROMPT",
    "ASR_TEMPLATES",
    "AST_PROMPT",
    "COLOUR_FACTS",
    "FRENCH_TEMPLATES",
    "FULL",
    "QA_TEMPLATES",
    "QUICK",
    "TASK_PROMPTS",
    "SpeechDemoSettings",
    "SpeechSample",
    "bleu_tokens",
    "chance_bleu",
    "corpus_bleu",
    "make_speech_samples",
    "run_speech_demo",
    "speech_markdown",
    "speech_summary_rows",
    "speech_messages",
    "to_french",
    "word_error_rate",
    "word_errors",
    "write_speech_folder",
]

ASR_PROMPT = "Repeat after me in English."
AST_PROMPT = "Translate the following sentence into French."
TASK_PROMPTS = {"asr": ASR_PROMPT, "ast": AST_PROMPT}
"""The text before the speech, per task (spoken questions have none: the speech is the turn)."""


@dataclass(frozen=True)
class _Phrasings:
    train: tuple[str, ...]
    heldout: tuple[str, ...]


ASR_TEMPLATES = _Phrasings(
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


QA_TEMPLATES = _Phrasings(
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

COLOUR_FACTS: dict[str, str] = {  # the keys of mm.demo.data's facts, lower-cased
    "the sky": "blue",
    "grass": "green",
    "the sun": "yellow",
    "a tomato": "red",
    "a banana": "yellow",
    "the sea": "blue",
    "a leaf": "green",
    "a strawberry": "red",
    "a lemon": "yellow",
    "fire": "red",
}
"""Things and their colours, as the backbone's text corpus states them ("The sky is blue.")."""


@dataclass(frozen=True, kw_only=True)
class SpeechDemoSettings:
    """How much work the speech phase does (:data:`QUICK` and :data:`FULL`)."""

    asr_train: int
    qa_train: int
    asr_eval: int
    qa_eval: int
    ast_train: int = 0
    ast_eval: int = 0
    pretrain_steps: int
    sft_steps: int


QUICK = SpeechDemoSettings(
    asr_train=960,
    qa_train=480,
    asr_eval=48,
    qa_eval=80,
    ast_train=960,
    ast_eval=48,
    pretrain_steps=30,
    sft_steps=1200,
)
FULL = SpeechDemoSettings(
    asr_train=1920,
    qa_train=960,
    asr_eval=96,
    qa_eval=160,
    ast_train=1920,
    ast_eval=96,
    pretrain_steps=60,
    sft_steps=2400,
)


# ---------------------------------------------------------------------------------------- data
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
    ``HELDOUT_COLOUR_SHAPE``; evaluation always says one. Evaluation uses the held-out templates
    for half its utterances. Answers are drawn in shuffled blocks, so any run of samples is
    balanced over them.
    """
    from mm.demo.data import COLOURS, HELDOUT_COLOUR_SHAPE, SHAPES

    if task not in ("asr", "ast", "qa") or split not in ("train", "eval"):
        raise ValueError(
            f"task must be 'asr', 'ast' or 'qa' and split 'train' or 'eval', got {task!r}, {split!r}"
        )
    rng = random.Random(f"mm.demo.speech:{task}:{split}:{seed}")
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
    from mm._io import atomic_dir
    from mm.serving.speech_out import wav_bytes

    with atomic_dir(out_dir) as tmp:
        for i, (sample, wave) in enumerate(zip(samples, waves)):
            key = f"{sample.task}-{i:06d}"
            (tmp / f"{key}.wav").write_bytes(wav_bytes(wave, sample_rate))
            row = {"messages": speech_messages(sample, f"{key}.wav"), "meta": dataclasses.asdict(sample)}
            (tmp / f"{key}.json").write_text(json.dumps(row) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------- scoring
def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """``(edits, reference words)``: the word-level Levenshtein distance (substitutions, insertions
    and deletions, each costing 1) after lower-casing and dropping punctuation."""
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1], len(ref)


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus word error rate: total word edits over total reference words."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    edits = words = 0
    for r, h in zip(references, hypotheses):
        e, n = word_errors(r, h)
        edits, words = edits + e, words + n
    if words == 0:
        raise ValueError("the references hold no words")
    return edits / words


_BLEU_SYMBOLS = re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])")
_BLEU_PERIOD_AFTER = re.compile(r"([^0-9])([\.,])")
_BLEU_PERIOD_BEFORE = re.compile(r"([\.,])([^0-9])")
_BLEU_DASH = re.compile(r"([0-9])(-)")


def bleu_tokens(text: str) -> list[str]:
    """Words as BLEU's usual ("13a", mteval-v13a) tokenisation cuts them: symbols are split off,
    and full stops and commas except between digits; apostrophes stay inside words."""
    text = text.replace("\n", " ")
    if "&" in text:
        for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
            text = text.replace(entity, char)
    text = _BLEU_SYMBOLS.sub(r" \1 ", f" {text} ")
    text = _BLEU_PERIOD_AFTER.sub(r"\1 \2 ", text)
    text = _BLEU_PERIOD_BEFORE.sub(r" \1 \2", text)
    return _BLEU_DASH.sub(r"\1 \2 ", text).split()


def corpus_bleu(references: Sequence[str], hypotheses: Sequence[str], max_order: int = 4) -> float:
    """Corpus BLEU (0-100) with one reference per sentence, as sacreBLEU computes it by default:
    13a tokens, case-sensitive, clipped n-gram matches summed over the corpus up to 4-grams, an
    order with no match counted as ``100 / (2^k * total)`` for its k-th such order ("exp"
    smoothing), geometric mean times the brevity penalty; 0 when nothing matches or an order has
    no n-grams at all."""
    from collections import Counter

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    matches, totals = [0] * max_order, [0] * max_order
    ref_len = hyp_len = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = bleu_tokens(ref), bleu_tokens(hyp)
        ref_len, hyp_len = ref_len + len(r), hyp_len + len(h)
        for n in range(1, max_order + 1):
            h_grams = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            r_grams = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            matches[n - 1] += sum(min(c, r_grams[g]) for g, c in h_grams.items())
            totals[n - 1] += max(0, len(h) - n + 1)
    if ref_len == 0:
        raise ValueError("the references hold no words")
    if not any(matches):
        return 0.0
    log_precision, halvings = 0.0, 1
    for m, t in zip(matches, totals):
        if t == 0:
            return 0.0
        if m == 0:
            halvings *= 2
        log_precision += math.log(100.0 * m / t if m else 100.0 / (halvings * t))
    brevity = 1.0 if hyp_len > ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0)
    return brevity * math.exp(log_precision / max_order)


def chance_bleu(references: Sequence[str], train_answers: Sequence[str]) -> float:
    """The BLEU of the best constant answer: one training translation said for every utterance."""
    return max(corpus_bleu(references, [t] * len(references)) for t in sorted(set(train_answers)))


def named_colours(text: str) -> set[str]:
    """The colour words in ``text``."""
    from mm.demo.data import COLOURS

    return set(_words(text)) & set(COLOURS)


def qa_correct(sample: SpeechSample, answer: str) -> bool:
    """A spoken-question answer is right when it names the right colour and no other one."""
    return named_colours(answer) == named_colours(sample.answer)


def chance_wer(references: Sequence[str], train_transcripts: Sequence[str]) -> float:
    """The word error rate of the best constant answer: one training transcript said for every
    utterance (what a model that ignores the audio could do at best)."""
    return min(word_error_rate(references, [t] * len(references)) for t in sorted(set(train_transcripts)))


def answer_all(
    model, samples: Sequence[SpeechSample], waves: Sequence[torch.Tensor], *, batch: int = 32
) -> list[str]:
    """Greedy answers of ``model`` to every utterance, read to the end of their first sentence
    (the answers are one sentence; reading to the first full stop, like ``--stop .`` in ``mm ask``,
    keeps a model that has not learned where to end from running on into the next one)."""
    return _answer_turns(model, [speech_messages(s, w)[:1] for s, w in zip(samples, waves)], batch=batch)


def text_task_all(model, task: str, sentences: Sequence[str], *, batch: int = 32) -> list[str]:
    """What the text model answers when the prompt of ``task`` (recognition or translation) comes
    with the words as *text* ("Repeat after me in English. The red circle."), read like
    :func:`answer_all`'s answers.

    A text-only turn gives the backbone's logits bit for bit, so this measures the frozen text
    model alone: speech reaches the backbone only as input embeddings, so recognising or
    translating speech can at best match the text model repeating or translating what it reads.
    """
    turns = [[{"role": "user", "content": f"{TASK_PROMPTS[task]} {t}"}] for t in sentences]
    return _answer_turns(model, turns, batch=batch)


@torch.no_grad()
def _answer_turns(model, turns: Sequence[list[dict[str, Any]]], *, batch: int) -> list[str]:
    pre = model.preprocessor
    tok = pre.tokenizer
    (full_stop,) = tok.encode(".")
    stops = (*tok.stop_ids, full_stop)
    answers = []
    for i in range(0, len(turns), batch):
        convs = list(turns[i : i + batch])
        new = model.generate(**pre.prompts(convs), max_new_tokens=48, stop_token_ids=stops)
        for ids in new.tolist():
            end = next((k for k, t in enumerate(ids) if t in stops), len(ids))
            keep = ids[: end + 1] if end < len(ids) and ids[end] == full_stop else ids[:end]
            answers.append(tok.decode(keep, skip_special=True).strip())
    return answers


def scale_adapter_output(model) -> float:
    """Start the speech adapter's outputs at the size of the backbone's token embeddings.

    The adapter's outputs take the place of token embeddings; a freshly initialised output layer
    makes them about 1/sqrt(3) per dimension, tens of times the size of the tiny backbone's
    embeddings, which the frozen layers then read as noise. Scaling the output layer so a
    unit-RMS input gives vectors of the mean embedding norm starts them in range (as the image
    placeholder rows start at the mean embedding). Returns the factor applied.
    """
    with torch.no_grad():
        target = model.backbone.embed_tokens.weight.float().norm(dim=-1).mean()
        weight = model.speech_adapter.out_proj.weight
        factor = float(target / weight.float().norm())
        weight.mul_(factor)
    return factor


# ---------------------------------------------------------------------------------------- the phase
def run_speech_demo(
    out: str | Path,
    start_model: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    settings: SpeechDemoSettings | None = None,
) -> dict[str, Any]:
    """Teach the model saved in ``start_model`` to hear; write the result to ``out/model-speech``.

    Returns the speech part of the demo report: ``speech_wer`` (and ``speech_wer_chance``),
    ``speech_qa_accuracy`` (and ``speech_qa_chance``), examples, the stages and the data.
    """
    from mm.datasets.shards import pack
    from mm.model.multimodal import MultimodalModel
    from mm.training.metrics import plot_loss_curves, read_metrics
    from mm.training.recipe import load_recipe
    from mm.training.trainer import Trainer

    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    started = time.perf_counter()

    # 1. speech, synthesised offline, written as files and packed into shards
    t0 = time.perf_counter()
    counts = {
        "asr": (settings.asr_train, settings.asr_eval),
        "ast": (settings.ast_train, settings.ast_eval),
        "qa": (settings.qa_train, settings.qa_eval),
    }
    counts = {task: n for task, n in counts.items() if task != "ast" or n[0] > 0}  # translation is optional
    train = {task: make_speech_samples(n, task, split="train", seed=seed) for task, (n, _) in counts.items()}
    evals = {task: make_speech_samples(n, task, split="eval", seed=seed) for task, (_, n) in counts.items()}
    eval_waves = {task: synthesize(samples) for task, samples in evals.items()}
    # The tasks in one shard folder, interleaved, so every batch mixes them: trained one after the
    # other, the second task undid the first (see "What limits it").
    mixed = [s for samples in train.values() for s in samples]
    random.Random(f"mm.demo.speech:mix:{seed}").shuffle(mixed)
    raw, shards = out / "raw" / "speech", out / "data" / "speech"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    waves = synthesize(mixed)
    write_speech_folder(mixed, waves, raw)
    result = pack(raw, shards, shard_bytes="4MB")
    data_info = {
        "speech": {
            "samples": result.samples,
            "shards": len(result.shards),
            "seconds": round(sum(w.numel() for w in waves) / 16000, 1),
            "per_task": {task: len(samples) for task, samples in train.items()},
        }
    }
    data_seconds = time.perf_counter() - t0

    # 2. the stages, from the given model with its speech adapter's output scaled to the embeddings
    start = MultimodalModel.from_pretrained(start_model)
    scale_adapter_output(start)
    start_dir = out / "speech-start"
    shutil.rmtree(start_dir, ignore_errors=True)
    start.save_pretrained(start_dir, copy_backbone=True)
    del start
    steps = {"speech-pretrain": settings.pretrain_steps, "speech-sft": settings.sft_steps}
    recipe = load_recipe("tiny-demo-speech").with_paths(
        START_MODEL=str(start_dir.resolve()), DATA=str((out / "data").resolve())
    )
    recipe = dataclasses.replace(
        recipe,
        stages=tuple(dataclasses.replace(s, steps=steps[s.name]) for s in recipe.stages if steps[s.name] > 0),
    )
    results = Trainer(recipe, output_dir=out / "runs", progress=progress).run()
    curves = {r.name: read_metrics(out / "runs" / r.name / "metrics.jsonl") for r in results}
    plot_loss_curves(curves, out / "plots" / "speech-stages.png")
    model_dir = out / "model-speech"
    shutil.rmtree(model_dir, ignore_errors=True)
    MultimodalModel.from_pretrained(results[-1].model_dir).save_pretrained(model_dir, copy_backbone=True)
    shutil.rmtree(start_dir, ignore_errors=True)

    # 3. evaluation on held-out pairs, phrasings, speeds and seeds
    t0 = time.perf_counter()
    model = MultimodalModel.from_pretrained(model_dir).eval()
    asr = answer_all(model, evals["asr"], eval_waves["asr"])
    qa = answer_all(model, evals["qa"], eval_waves["qa"])
    refs = [s.answer for s in evals["asr"]]
    repeated = text_task_all(model, "asr", refs)
    translation, translated = _translation_figures(model, train, evals, eval_waves)
    eval_seconds = time.perf_counter() - t0
    held = [i for i, s in enumerate(evals["asr"]) if s.heldout_phrasing]
    colours = [next(iter(named_colours(s.answer))) for s in evals["qa"]]
    right = [qa_correct(s, a) for s, a in zip(evals["qa"], qa)]
    return {
        **translation,
        "speech_wer": word_error_rate(refs, asr),
        "speech_wer_chance": chance_wer(refs, [s.answer for s in train["asr"]]),
        "speech_wer_heldout_phrasing": word_error_rate([refs[i] for i in held], [asr[i] for i in held]),
        "speech_asr_exact": sum(a == r for a, r in zip(asr, refs)) / len(refs),
        "speech_text_repeat_wer": word_error_rate(refs, repeated),
        "speech_text_repeat_examples": [{"text": r, "model": a} for r, a in zip(refs[:4], repeated)],
        "speech_qa_accuracy": sum(right) / len(right),
        "speech_qa_chance": max(colours.count(c) for c in set(colours)) / len(colours),
        "speech_qa_heldout_phrasing": _mean([r for r, s in zip(right, evals["qa"]) if s.heldout_phrasing]),
        "speech_qa_exact": sum(a == s.answer for a, s in zip(qa, evals["qa"])) / len(qa),
        "speech_eval_samples": {task: len(samples) for task, samples in evals.items()},
        "speech_examples": [
            {"task": s.task, "said": s.text, "answer": s.answer, "model": a}
            for s, a in [*zip(evals["asr"][:4], asr), *translated, *zip(evals["qa"][:4], qa)]
        ],
        "speech_data": data_info,
        "speech_stages": [
            {"name": r.name, "steps": r.steps, "seconds": round(r.seconds, 2), "final_loss": r.final_loss}
            for r in results
        ],
        "speech_seconds": {
            "data": round(data_seconds, 1),
            "eval": round(eval_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "speech_model_dir": str(model_dir),
    }


def _translation_figures(model, train, evals, eval_waves) -> tuple[dict[str, Any], list]:
    """The report's translation figures: BLEU of the spoken translations, its chance level and the
    text model translating the words as text; and the first (sample, answer) pairs. Nothing when
    the phase has no translation task."""
    if "ast" not in evals:
        return {}, []
    samples = evals["ast"]
    hyps = answer_all(model, samples, eval_waves["ast"])
    refs = [s.answer for s in samples]
    from_text = text_task_all(model, "ast", [s.text for s in samples])
    figures = {
        "speech_bleu": corpus_bleu(refs, hyps),
        "speech_bleu_chance": chance_bleu(refs, [s.answer for s in train["ast"]]),
        "speech_bleu_heldout_phrasing": corpus_bleu(
            [r for r, s in zip(refs, samples) if s.heldout_phrasing],
            [h for h, s in zip(hyps, samples) if s.heldout_phrasing],
        ),
        "speech_ast_exact": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
        "speech_text_translate_bleu": corpus_bleu(refs, from_text),
        "speech_text_translate_examples": [
            {"text": s.text, "answer": s.answer, "model": a} for s, a in zip(samples[:4], from_text)
        ],
    }
    return figures, list(zip(samples[:4], hyps))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# ---------------------------------------------------------------------------------------- report
def speech_summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the demo's printed summary (none when the report has no speech phase)."""
    if "speech_wer" not in r:
        return []
    return [
        (
            "speech recognition WER (held-out pairs)",
            f"{r['speech_wer']:.3f}  (chance {r['speech_wer_chance']:.2f}; lower is better; the text "
            f"model repeating the words as text: {r['speech_text_repeat_wer']:.2f})",
        ),
        *(
            [
                (
                    "speech translation BLEU (held-out pairs)",
                    f"{r['speech_bleu']:.1f}  (chance {r['speech_bleu_chance']:.1f}; the text model "
                    f"translating the words as text: {r['speech_text_translate_bleu']:.1f})",
                )
            ]
            if "speech_bleu" in r
            else []
        ),
        (
            "spoken QA accuracy (held-out phrasings)",
            f"{r['speech_qa_accuracy']:.3f}  (chance {r['speech_qa_chance']:.2f})",
        ),
        ("speech phase time", f"{r['speech_seconds']['total']:.0f} s"),
    ]


def speech_markdown(r: dict[str, Any]) -> str:
    """The speech section of ``report.md`` (empty when the report has no speech phase)."""
    if "speech_wer" not in r:
        return ""
    examples = "\n".join(
        f"| {e['task']} | {e['said']} | {e['answer']} | {e['model']} |" for e in r["speech_examples"]
    )
    t = r["speech_seconds"]
    n = r["speech_eval_samples"]
    translation_text = translation_rows = ""
    recognition_text = """Recognition through the frozen text model can be no better than the
text model repeating the words given as text (its row below). """
    if "speech_bleu" in r:
        translation_text = """*Translation* ("Translate the following sentence into French.")
says the same kind of sentences, and the answer is their French ("The green cross." -> "La croix
verte."), scored with corpus BLEU (sacreBLEU's default: 13a tokens, exp smoothing; chance: the
best single training translation said for every utterance), and recognition and translation
through the frozen text model can be no better than the text model repeating or translating the
words given as text (their rows below). """
        translation_rows = f"""
| speech translation BLEU | **{r["speech_bleu"]:.1f}** (chance {r["speech_bleu_chance"]:.1f}) |
| BLEU, held-out phrasing only | {r["speech_bleu_heldout_phrasing"]:.1f} |
| translation exact match | {r["speech_ast_exact"]:.3f} |
| text model translating the words as text, BLEU | {r["speech_text_translate_bleu"]:.1f} |"""
    counts = (
        f"{n['asr']} recognition, "
        + (f"{n['ast']} translation, " if "ast" in n else "")
        + f"{n['qa']} questions"
    )
    return f"""## Speech (experimental)

Speech was synthesised offline with hibari-tts's bundled voice at varied speeds and noise seeds.
*Recognition* ("Repeat after me in English.") uses a small vocabulary (four colours, four shapes):
every evaluation utterance says a colour-shape pair never said in training, half in a sentence
form never heard in training, so the word error rate measures recognising known words in new
combinations, not open-vocabulary transcription. {translation_text or recognition_text}*Spoken questions* ask the colour of things the
text model read about ("What colour is the sky?" -> "blue."), half in phrasings never heard in
training; an answer counts when it names the right colour and no other. Chance: the best single
training transcript said for every utterance (word error rate), and always naming the most common
colour (accuracy). Answers are read to their first full stop. `mm demo --speech` pre-trains the
text model with "Repeat after me" (and "Translate") turns, so that it can.

| | |
| --- | --- |
| speech recognition word error rate | **{r["speech_wer"]:.3f}** (chance {r["speech_wer_chance"]:.2f}; lower is better) |
| word error rate, held-out phrasing only | {r["speech_wer_heldout_phrasing"]:.3f} |
| recognition exact match | {r["speech_asr_exact"]:.3f} |
| text model repeating the words as text, word error rate | {r["speech_text_repeat_wer"]:.3f} |{translation_rows}
| spoken QA accuracy | **{r["speech_qa_accuracy"]:.3f}** (chance {r["speech_qa_chance"]:.2f}) |
| spoken QA accuracy, held-out phrasings only | {r["speech_qa_heldout_phrasing"]:.3f} |
| spoken QA exact answer | {r["speech_qa_exact"]:.3f} |
| evaluation utterances | {counts} |
| speech phase time | data {t["data"]:.1f} s, evaluation {t["eval"]:.1f} s, total {t["total"]:.1f} s |

| task | said | answer | model |
| --- | --- | --- | --- |
{examples}

"""
