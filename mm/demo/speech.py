"""The speech phase of ``mm demo --speech``: the frozen text model learns to hear (Llama 3, section 8).

Experimental: its figures end well away from chance but far from perfect, and how fast the speech
encoder and adapter start to use the audio depends on their random initialisation, so they vary
from seed to seed more than the image and video figures do.

Speech reaches the frozen text model only through its input: the speech adapter's outputs take
the place of the ``<|audio|>`` placeholder's token embeddings. Recognition and translation through
it can therefore be no better than the text model repeating or translating the same words given
as text, and the paper's text model is an instruct model that can. A tiny model learns that only
from such turns, and only slowly, so with ``--speech`` the text phase replaces some of its
documents by "Repeat after me" and "Translate" turns and trains longer
(:func:`mm.demo.text.sentence_turn`); it learns to repeat these sentence forms, not text in general.

Starting from the model the video phase saved:

1. **Data** (:mod:`mm.demo.speech_data`): recognition, translation into French and spoken
   questions, synthesised offline, interleaved in one ``KEY.wav`` + ``KEY.json`` folder and packed
   into webdataset shards (the real data path: shards -> streaming -> audio decoding -> log-mel ->
   the staged trainer). The tasks share the encoder and adapter, and trained one after the other
   the second undid the first, so every batch mixes them.

2. **Stages** (``mm/recipes/tiny-demo-speech.yaml``): ``speech-pretrain`` (BEST-RQ, only the
   speech encoder learns), then ``speech-sft`` (next-token loss on the answers of all tasks; the
   speech encoder and adapter learn, the backbone is frozen). The adapter's output layer starts
   scaled to the size of the backbone's token embeddings (:func:`scale_adapter_output`). Each task
   is said in eight phrasings: the encoder tells apart what it heard in phrasings it was trained on
   far better than in new ones.

3. **Evaluation** (through ``mm eval``, :mod:`mm.demo.eval_sets`): greedy answers on the held-out
   utterances, to the model's stop token (at most :data:`ANSWER_TOKENS`); ``speech_wer`` is
   ``mm eval``'s ``asr`` task on a LibriSpeech folder of them (corpus WER after Whisper's English
   normaliser, jiwer), ``speech_qa_accuracy`` ``mm eval``'s ``speech-qa`` task on a JSON Lines set of
   the spoken questions (exact match after VQAv2's answer normaliser: "Blue." and "blue" are right,
   "It is blue." is not; until this was scored by ``mm eval`` it counted answers naming the right
   colour and no other, :func:`qa_correct`), with ``speech_qa_chance`` (always answering the most
   common colour)
   and ``speech_wer_chance`` (the best single training transcript said for every utterance, i.e.
   a model that ignores the audio). ``speech_text_repeat_wer`` is the same recognition turn with
   the words given as *text* ("Repeat after me in English. The red circle."): text-only turns give
   the backbone's logits bit for bit, so it measures the frozen text model alone, the bound that
   recognition through it cannot pass. ``speech_bleu`` is ``mm eval``'s ``ast`` task on a CoVoST 2
   TSV of the translations (corpus sacreBLEU, its defaults), with ``speech_bleu_chance`` (the best single training translation said for every
   utterance) and ``speech_text_translate_bleu`` (the text model translating the words as text).
   What the model gets wrong is mostly the words a held-out colour-shape pair never said together
   in training, and held-out sentence forms coming back as heard ones; translation's errors are
   recognition's, not the French.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mm.demo.scenes import COLOURS
from mm.demo.speech_data import (
    TASK_PROMPTS,
    SpeechSample,
    make_speech_samples,
    speech_messages,
    synthesize,
    write_speech_folder,
)
from mm.eval.speech import corpus_bleu, corpus_wer

__all__ = [
    "FULL",
    "QUICK",
    "SpeechDemoSettings",
    "ANSWER_TOKENS",
    "answer_all",
    "chance_bleu",
    "chance_wer",
    "named_colours",
    "qa_correct",
    "run_speech_demo",
    "scale_adapter_output",
    "speech_figures",
    "text_task_all",
    "train_speech_stages",
    "write_speech_data",
]

ANSWER_TOKENS = 48  # the longest answer to an utterance (one sentence)


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


# ---------------------------------------------------------------------------------------- scoring
def _words(text: str) -> list[str]:
    return "".join(c.lower() if c.isalnum() or c == "'" else " " for c in text).split()


def chance_bleu(references: Sequence[str], train_answers: Sequence[str]) -> float:
    """The BLEU (sacreBLEU, :func:`mm.eval.speech.corpus_bleu`) of the best constant answer: one
    training translation said for every utterance."""
    return max(corpus_bleu([t] * len(references), references) for t in sorted(set(train_answers)))


def named_colours(text: str) -> set[str]:
    """The colour words in ``text``."""
    return set(_words(text)) & set(COLOURS)


def qa_correct(sample: SpeechSample, answer: str) -> bool:
    """Whether a spoken-question answer names the right colour and no other one (the demo's metric
    before ``speech_qa_accuracy`` came from ``mm eval``'s ``speech-qa`` task, which asks for the
    answer itself: exact match after VQAv2's normaliser)."""
    return named_colours(answer) == named_colours(sample.answer)


def chance_wer(references: Sequence[str], train_transcripts: Sequence[str]) -> float:
    """The word error rate (Whisper-normalised, :func:`mm.eval.speech.corpus_wer`) of the best
    constant answer: one training transcript said for every utterance (what a model that ignores
    the audio could do at best)."""
    return min(corpus_wer([t] * len(references), references) for t in sorted(set(train_transcripts)))


def answer_all(model, samples: Sequence[SpeechSample], waves: Sequence[torch.Tensor]) -> list[str]:
    """Greedy answers of ``model`` to utterances given as waveforms, through ``mm eval``'s answer loop
    (:func:`mm.demo.eval_sets.answer_turns`); the report's figures come from ``mm eval``'s tasks."""
    from mm.demo.eval_sets import answer_turns

    turns = [speech_messages(s, w)[:1] for s, w in zip(samples, waves, strict=True)]
    return answer_turns(model, turns, max_new_tokens=ANSWER_TOKENS)


def text_task_all(model, task: str, sentences: Sequence[str]) -> list[str]:
    """What the text model answers when the prompt of ``task`` (recognition or translation) comes
    with the words as *text* ("Repeat after me in English. The red circle."), through ``mm eval``'s
    answer loop like :func:`answer_all`.

    A text-only turn gives the backbone's logits bit for bit, so this measures the frozen text
    model alone: speech reaches the backbone only as input embeddings, so recognising or
    translating speech can at best match the text model repeating or translating what it reads.
    """
    from mm.demo.eval_sets import answer_turns

    turns = [[{"role": "user", "content": f"{TASK_PROMPTS[task]} {t}"}] for t in sentences]
    return answer_turns(model, turns, max_new_tokens=ANSWER_TOKENS)


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

    Returns:
        The speech part of the demo report: the figures of :func:`speech_figures`,
        ``speech_data``, ``speech_stages``, ``speech_seconds`` and ``speech_model_dir``.
    """
    from mm.model.multimodal import MultimodalModel

    settings = settings or (QUICK if quick else FULL)
    out = Path(out)
    started = time.perf_counter()

    # 1. speech, synthesised offline, written as files and packed into shards
    counts = {
        "asr": (settings.asr_train, settings.asr_eval),
        "ast": (settings.ast_train, settings.ast_eval),
        "qa": (settings.qa_train, settings.qa_eval),
    }
    counts = {task: n for task, n in counts.items() if task != "ast" or n[0] > 0}  # translation is optional
    train = {task: make_speech_samples(n, task, split="train", seed=seed) for task, (n, _) in counts.items()}
    evals = {task: make_speech_samples(n, task, split="eval", seed=seed) for task, (_, n) in counts.items()}
    eval_waves = {task: synthesize(samples) for task, samples in evals.items()}
    data_info = write_speech_data(out, train, seed=seed)
    data_seconds = time.perf_counter() - started

    # 2. the stages, from the given model with its speech adapter's output scaled to the embeddings
    results, model_dir = train_speech_stages(out, start_model, settings, progress=progress)

    # 3. evaluation on held-out pairs, phrasings, speeds and seeds
    t0 = time.perf_counter()
    model = MultimodalModel.from_pretrained(model_dir).eval()
    figures = speech_figures(model, train, evals, eval_waves, out=out, model_dir=model_dir)
    return {
        **figures,
        "speech_data": data_info,
        "speech_stages": [
            {"name": r.name, "steps": r.steps, "seconds": round(r.seconds, 2), "final_loss": r.final_loss}
            for r in results
        ],
        "speech_seconds": {
            "data": round(data_seconds, 1),
            "eval": round(time.perf_counter() - t0, 1),
            "total": round(time.perf_counter() - started, 1),
        },
        "speech_model_dir": str(model_dir),
    }


def write_speech_data(out: Path, train: dict[str, list[SpeechSample]], *, seed: int) -> dict[str, Any]:
    """Synthesise the training utterances of every task, write them interleaved into one folder
    (``out/raw/speech``) and pack it into shards (``out/data/speech``): the tasks share the encoder
    and adapter, and every batch must mix them.

    Returns:
        The shards' samples, count and seconds of speech, and the samples per task, for the report.
    """
    from mm.datasets.shards import pack

    mixed = [s for samples in train.values() for s in samples]
    random.Random(f"mm.demo_speech:mix:{seed}").shuffle(mixed)  # the stream's name: as it always was
    raw, shards = out / "raw" / "speech", out / "data" / "speech"
    shutil.rmtree(raw, ignore_errors=True)
    shutil.rmtree(shards, ignore_errors=True)
    waves = synthesize(mixed)
    write_speech_folder(mixed, waves, raw)
    result = pack(raw, shards, shard_bytes="4MB")
    return {
        "speech": {
            "samples": result.samples,
            "shards": len(result.shards),
            "seconds": round(sum(w.numel() for w in waves) / 16000, 1),
            "per_task": {task: len(samples) for task, samples in train.items()},
        }
    }


def train_speech_stages(
    out: Path, start_model: str | Path, settings: SpeechDemoSettings, *, progress: bool
) -> tuple[list[Any], Path]:
    """Run the ``tiny-demo-speech`` recipe's stages (those given steps in ``settings``) from
    ``start_model``, its speech adapter's output scaled first (:func:`scale_adapter_output`); save
    the result with its backbone in ``out/model-speech``.

    Returns:
        The stages' :class:`~mm.training.trainer.StageResult` s and the saved model's folder.
    """
    from mm.model.multimodal import MultimodalModel
    from mm.training.metrics import plot_loss_curves, read_metrics
    from mm.training.recipe import load_recipe
    from mm.training.trainer import Trainer

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
    results = Trainer(recipe, output_dir=out / "runs", progress=progress).run(
        replace=True
    )  # a rerun starts afresh
    curves = {r.name: read_metrics(out / "runs" / r.name / "metrics.jsonl") for r in results}
    plot_loss_curves(curves, out / "plots" / "speech-stages.png")
    model_dir = out / "model-speech"
    shutil.rmtree(model_dir, ignore_errors=True)
    MultimodalModel.from_pretrained(results[-1].model_dir).save_pretrained(model_dir, copy_backbone=True)
    shutil.rmtree(start_dir, ignore_errors=True)
    return results, model_dir


def speech_figures(
    model,
    train: dict[str, list[SpeechSample]],
    evals: dict[str, list[SpeechSample]],
    eval_waves: dict[str, list[torch.Tensor]],
    *,
    out: Path,
    model_dir: Path,
) -> dict[str, Any]:
    """The report's speech figures: ``model`` (loaded from ``model_dir``) scored on the held-out
    utterances ``evals`` (spoken as ``eval_waves``), with chance levels from the ``train`` answers,
    the text model's own bound, and the first examples of each task.

    Recognition is written as a LibriSpeech folder under ``out/eval-data/speech-asr`` and scored by
    ``mm eval``'s ``asr`` task (corpus WER after Whisper's normaliser); translation as a CoVoST 2
    TSV under ``out/eval-data/speech-ast``, scored by ``ast`` (corpus sacreBLEU); spoken questions
    as a JSON Lines set under ``out/eval-data/speech-qa``, scored by ``speech-qa`` (exact match after
    VQAv2's normaliser, the audio alone as the turn); the results and their commands go under
    ``out/eval/``.
    """
    from mm.demo.eval_sets import score, write_librispeech, write_speech_qa

    data = write_librispeech(evals["asr"], eval_waves["asr"], out / "eval-data" / "speech-asr")
    recognition = score(
        model,
        model_dir,
        "asr",
        data,
        out / "eval" / "speech-asr",
        prompt=TASK_PROMPTS["asr"],
        max_new_tokens=ANSWER_TOKENS,
    )
    asr = [r.prediction for r in recognition.result.samples]
    questions = write_speech_qa(evals["qa"], eval_waves["qa"], out / "eval-data" / "speech-qa")
    spoken = score(
        model, model_dir, "speech-qa", questions, out / "eval" / "speech-qa", max_new_tokens=ANSWER_TOKENS
    )
    qa = [r.prediction for r in spoken.result.samples]
    right = [r.score for r in spoken.result.samples]
    refs = [s.answer for s in evals["asr"]]
    repeated = text_task_all(model, "asr", refs)
    translation, translated = _translation_figures(
        model, train, evals, eval_waves, out=out, model_dir=model_dir
    )
    evaluations = {
        "speech_wer": recognition.provenance(),
        **translation.pop("_eval", {}),
        "speech_qa_accuracy": spoken.provenance(),
    }
    held = [i for i, s in enumerate(evals["asr"]) if s.heldout_phrasing]
    colours = [next(iter(named_colours(s.answer))) for s in evals["qa"]]
    return {
        **translation,
        "speech_wer": recognition.result.score,
        "speech_wer_chance": chance_wer(refs, [s.answer for s in train["asr"]]),
        "speech_wer_heldout_phrasing": corpus_wer([asr[i] for i in held], [refs[i] for i in held]),
        "speech_asr_exact": sum(a == r for a, r in zip(asr, refs)) / len(refs),
        "speech_text_repeat_wer": corpus_wer(repeated, refs),
        "speech_text_repeat_examples": [{"text": r, "model": a} for r, a in zip(refs[:4], repeated)],
        "speech_qa_accuracy": spoken.result.score,
        "speech_qa_chance": max(colours.count(c) for c in set(colours)) / len(colours),
        "speech_qa_heldout_phrasing": _mean([r for r, s in zip(right, evals["qa"]) if s.heldout_phrasing]),
        "speech_qa_exact": sum(a == s.answer for a, s in zip(qa, evals["qa"])) / len(qa),
        "speech_eval_samples": {task: len(samples) for task, samples in evals.items()},
        "speech_examples": [
            {"task": s.task, "said": s.text, "answer": s.answer, "model": a}
            for s, a in [*zip(evals["asr"][:4], asr), *translated, *zip(evals["qa"][:4], qa)]
        ],
        "speech_evaluations": evaluations,
    }


def _translation_figures(
    model, train, evals, eval_waves, *, out: Path, model_dir: Path
) -> tuple[dict[str, Any], list]:
    """The report's translation figures: BLEU of the spoken translations (``mm eval``'s ``ast`` task
    on a CoVoST 2 TSV), its chance level and the text model translating the words as text; and the
    first (sample, answer) pairs. Nothing when the phase has no translation task."""
    from mm.demo.eval_sets import score, write_covost

    if "ast" not in evals:
        return {}, []
    samples = evals["ast"]
    data = write_covost(samples, eval_waves["ast"], out / "eval-data" / "speech-ast")
    scored = score(
        model,
        model_dir,
        "ast",
        data,
        out / "eval" / "speech-ast",
        prompt=TASK_PROMPTS["ast"],
        max_new_tokens=ANSWER_TOKENS,
    )
    hyps = [r.prediction for r in scored.result.samples]
    refs = [s.answer for s in samples]
    from_text = text_task_all(model, "ast", [s.text for s in samples])
    held = [i for i, s in enumerate(samples) if s.heldout_phrasing]
    figures = {
        "speech_bleu": scored.result.score,
        "speech_bleu_chance": chance_bleu(refs, [s.answer for s in train["ast"]]),
        "speech_bleu_heldout_phrasing": corpus_bleu([hyps[i] for i in held], [refs[i] for i in held]),
        "speech_ast_exact": sum(h == r for h, r in zip(hyps, refs)) / len(refs),
        "speech_text_translate_bleu": corpus_bleu(from_text, refs),
        "speech_text_translate_examples": [
            {"text": s.text, "answer": s.answer, "model": a} for s, a in zip(samples[:4], from_text)
        ],
        "_eval": {"speech_bleu": scored.provenance()},
    }
    return figures, list(zip(samples[:4], hyps))


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
