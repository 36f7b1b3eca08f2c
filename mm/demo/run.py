"""``mm demo``: the whole compositional recipe in miniature, offline, on a CPU.

1. Natively train a tiny Llama-3-architecture text backbone on a generated corpus (byte-level
   tokenizer; about half the documents carry one of their questions as a Llama 3 chat turn, so
   the backbone is a chat model, as the paper's adapters are trained on one) and save it like any
   text checkpoint (:mod:`mm.demo.text`).
2. Freeze it; record its digest and its perplexity on held-out text.
3. Run the image stages of the ``tiny-demo`` recipe on generated pictures of shapes (captions, then
   questions about colour, shape, count and position), through the real data path: PNG files ->
   ``mm data pack`` shards -> streaming -> the staged trainer (:mod:`mm.demo.image`).
   Then post-train the image model (:mod:`mm.demo.posttrain`): preference pairs about held-out
   pictures (the short correct answer preferred over a wrong, a verbose or an off-topic one), a
   reward model and DPO through the trainer, and rejection sampling with the reward model choosing
   among the DPO model's samples; the
   published model stays the image model (the video phase starts from it).
4. Run the video stage (:mod:`mm.demo.video`): moving-shapes clips written as mp4, the frozen image
   encoder's frame tokens cached once (``mm data cache-features``), then only the temporal
   aggregator and the video cross-attention blocks learn; questions no single frame answers
   (direction of motion, which colour appeared first, how many shapes crossed the middle) are
   scored on held-out clips decoded from the mp4 files.
   With ``--speech`` (experimental), then the speech stages (:mod:`mm.demo.speech`): speech
   synthesised offline with hibari-tts, BEST-RQ pre-training of the speech encoder, then speech
   SFT for recognition, translation into French and spoken questions, scored on held-out word
   combinations and phrasings.
5. Evaluate on held-out combinations (a red triangle never seen in training, ...), check that the
   text model is untouched after all stages (same digest, same perplexity), and write
   ``OUT/report.json``, ``OUT/report.md``, the loss plots, and the trained model in ``OUT/model``
   for ``mm ask`` / ``mm serve`` (:mod:`mm.demo.report`).

``--quick`` is the same job with fewer steps and samples (CI runs it).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm.demo.evaluate import perplexity
from mm.demo.image import ImagePhase, image_qa_accuracy, run_image_phase
from mm.demo.posttrain import POST_FULL, POST_QUICK, PosttrainSettings, run_posttrain_phase
from mm.demo.report import demo_report, summary, write_report
from mm.demo.speech import SpeechDemoSettings, run_speech_demo
from mm.demo.text import TextPhase, run_text_phase
from mm.demo.video import VideoDemoSettings, run_video_demo

__all__ = ["FULL", "QUICK", "DemoSettings", "run_demo", "run_demo_command", "unmet_requirements"]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """How much work the text and image phases do (:data:`FULL` and :data:`QUICK`).

    Attributes:
        text_docs: generated documents the text model is pre-trained on.
        text_steps: its optimiser steps.
        text_batch: sequences per step.
        text_seq_len: tokens per sequence.
        encoder_samples: generated pictures the image encoder is pre-trained on.
        encoder_steps: its optimiser steps.
        caption_samples: captioned pictures of the image stages.
        qa_samples: pictures with a question of the image stages.
        eval_samples: held-out pictures the final model is scored on.
        pretrain_steps: steps of the ``image-pretrain`` stage.
        anneal_steps: steps of the ``image-anneal`` stage.
        speech_text_steps: with speech, the text model's steps instead of ``text_steps``: a tiny
            model needs that long to learn to repeat and translate.
        speech_repeat_share: with speech, the share of its documents replaced by "Repeat after me"
            turns (:func:`~mm.demo.text.sentence_turn`).
        speech_translate_share: with speech, the share replaced by "Translate the following
            sentence into French." turns.
    """

    text_docs: int
    text_steps: int
    text_batch: int
    text_seq_len: int
    encoder_samples: int
    encoder_steps: int
    caption_samples: int
    qa_samples: int
    eval_samples: int
    pretrain_steps: int
    anneal_steps: int
    speech_text_steps: int = 2000
    speech_repeat_share: float = 0.3
    speech_translate_share: float = 0.3


FULL = DemoSettings(
    text_docs=4000,
    text_steps=600,
    text_batch=16,
    text_seq_len=160,
    encoder_samples=8000,
    encoder_steps=1200,
    caption_samples=3000,
    qa_samples=10000,
    eval_samples=400,
    pretrain_steps=1200,
    anneal_steps=400,
)
QUICK = DemoSettings(
    text_docs=1500,
    text_steps=150,
    text_batch=16,
    text_seq_len=160,
    encoder_samples=4000,
    encoder_steps=600,
    caption_samples=1200,
    qa_samples=6000,
    eval_samples=200,
    pretrain_steps=450,
    anneal_steps=200,
)


def run_demo(
    out: str | Path = "mm-demo",
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    settings: DemoSettings | None = None,
    video: bool = True,
    video_settings: VideoDemoSettings | None = None,
    speech: bool = False,
    speech_settings: SpeechDemoSettings | None = None,
    posttrain: bool = True,
    posttrain_settings: PosttrainSettings | None = None,
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the report (also written to ``out/report.json``).

    ``settings``, ``video_settings``, ``speech_settings`` and ``posttrain_settings`` override the
    amounts of work that ``quick`` picks (:data:`QUICK` / :data:`FULL`,
    :data:`~mm.demo.video.VIDEO_QUICK` / :data:`~mm.demo.video.VIDEO_FULL`,
    :data:`mm.demo.speech.QUICK` / :data:`mm.demo.speech.FULL`, :data:`~mm.demo.posttrain.POST_QUICK`
    / :data:`~mm.demo.posttrain.POST_FULL`); ``speech_settings`` also turns the speech phase on,
    ``posttrain_settings`` the post-training phase (``posttrain=False`` skips it).
    """
    from mm.training.trainer import summary_table

    if settings is None:
        settings = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    hear = speech or speech_settings is not None

    # 1-2. natively train the text backbone, save it like any text checkpoint, freeze it
    text = run_text_phase(
        out,
        docs=settings.text_docs,
        heldout_docs=200 if quick else 400,
        steps=settings.speech_text_steps if hear else settings.text_steps,
        repeat_share=settings.speech_repeat_share if hear else 0.0,
        translate_share=settings.speech_translate_share if hear else 0.0,
        batch=settings.text_batch,
        seq_len=settings.text_seq_len,
        seed=seed,
        progress=progress,
    )

    # 3. pre-train the image encoder on its own, then run the image stages on generated shapes
    image = run_image_phase(
        out,
        text.backbone_dir,
        encoder_samples=settings.encoder_samples,
        encoder_steps=settings.encoder_steps,
        caption_samples=settings.caption_samples,
        qa_samples=settings.qa_samples,
        pretrain_steps=settings.pretrain_steps,
        anneal_steps=settings.anneal_steps,
        seed=seed,
        progress=progress,
    )
    final_dir = image.model_dir

    # 3b. post-training on the image SFT model (mm.demo.posttrain); its models are not published
    post_report: dict[str, Any] = {"posttrain_stages": []}
    if posttrain or posttrain_settings is not None:
        post_report = run_posttrain_phase(
            out,
            image.model_dir,
            settings=posttrain_settings or (POST_QUICK if quick else POST_FULL),
            qa_samples=settings.eval_samples,
            seed=seed,
            progress=progress,
        )

    # 4. the video stage (mm.demo.video), on the model the image stages produced
    video_report: dict[str, Any] = {"stages": []}
    if video or video_settings is not None:
        video_report = run_video_demo(
            out, final_dir, quick=quick, seed=seed, progress=progress, settings=video_settings
        )
        final_dir = Path(video_report["model_dir"])

    # 4b. the speech stages (mm.demo.speech; experimental, opt-in), on the model the stages before produced
    speech_report: dict[str, Any] = {"speech_stages": []}
    if hear:
        speech_report = run_speech_demo(
            out, final_dir, quick=quick, seed=seed, progress=progress, settings=speech_settings
        )
        final_dir = Path(speech_report["speech_model_dir"])

    # 5. the "after" figures, on the final model as mm ask / mm serve load it; the report
    report = _final_report(
        out,
        final_dir,
        text=text,
        image=image,
        video_report=video_report,
        speech_report=speech_report,
        post_report=post_report,
        eval_samples=settings.eval_samples,
        quick=quick,
        seed=seed,
        started=started,
    )
    write_report(out, report)
    if progress:
        print(f"\n{summary_table(image.results)}\n\n{summary(report)}")
    return report


def _final_report(
    out: Path,
    final_dir: Path,
    *,
    text: TextPhase,
    image: ImagePhase,
    video_report: dict[str, Any],
    speech_report: dict[str, Any],
    post_report: dict[str, Any],
    eval_samples: int,
    quick: bool,
    seed: int,
    started: float,
) -> dict[str, Any]:
    """Save the model in ``final_dir`` as ``out/model``, score it there (image questions on
    ``eval_samples`` held-out pictures; the backbone's digest and perplexity after every stage),
    and put the report together with what the phases returned."""
    from mm.demo.image_data import make_image_qa

    model = _publish(final_dir, out / "model")
    samples = make_image_qa(eval_samples, split="eval", seed=seed + 3)
    return demo_report(
        quick=quick,
        seed=seed,
        text=text,
        image=image,
        image_qa=image_qa_accuracy(model, samples, out, out / "model"),
        image_qa_eval_samples=len(samples),
        digest_after=model.backbone.digest(),
        ppl_after=perplexity(lambda ids: model(ids).logits, text.heldout, text.tokenizer),
        video=video_report,
        speech=speech_report,
        posttrain=post_report,
        parameters=model.component_parameters(),
        model_dir=out / "model",
        seconds=round(time.perf_counter() - started, 1),
    )


def _publish(final_dir: Path, model_dir: Path):
    """The model in ``final_dir`` saved with its backbone to ``model_dir`` (the folder ``mm ask``
    and ``mm serve`` take), and loaded back from there."""
    from mm.model.multimodal import MultimodalModel

    model = MultimodalModel.from_pretrained(final_dir).eval()
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, copy_backbone=True)
    return MultimodalModel.from_pretrained(model_dir).eval()


def run_demo_command(args: argparse.Namespace) -> int:
    """``mm demo`` (arguments: :mod:`mm.cli`): run, then check the ``--require-*`` figures."""
    if args.require_video_accuracy is not None and args.no_video:
        print("mm demo: --require-video-accuracy and --no-video contradict each other", file=sys.stderr)
        return 2
    for dest in _POSTTRAIN_REQUIREMENTS:  # the post-training figures exist only with that phase
        if getattr(args, dest) is not None and args.no_posttrain:
            print(
                f"mm demo: --{dest.replace('_', '-')} and --no-posttrain contradict each other",
                file=sys.stderr,
            )
            return 2
    for dest, *_ in _REQUIREMENTS:  # the speech figures exist only with --speech
        if dest.startswith("require_speech_") and getattr(args, dest) is not None and not args.speech:
            print(f"mm demo: --{dest.replace('_', '-')} needs --speech", file=sys.stderr)
            return 2
    report = run_demo(
        args.out,
        quick=args.quick,
        seed=args.seed,
        video=not args.no_video,
        speech=args.speech,
        posttrain=not args.no_posttrain,
    )
    ok = report["backbone_unchanged"] and report["text_ppl_before"] == report["text_ppl_after"]
    if not ok:
        print("mm demo: the backbone changed — this is a bug in mm", file=sys.stderr)
        return 1
    unmet = unmet_requirements(args, report)
    for message in unmet:
        print(f"mm demo: {message}", file=sys.stderr)
    return 1 if unmet else 0


#: ``mm demo``'s ``--require-*`` options: (option's dest, what it checks, the report's figure, the
#: report's chance level of it, whether lower is better).
_REQUIREMENTS = (
    ("require_accuracy", "image QA accuracy", "image_qa_accuracy", "image_qa_chance", False),
    ("require_video_accuracy", "video QA accuracy", "video_qa_accuracy", "video_qa_chance", False),
    ("require_speech_qa_accuracy", "spoken QA accuracy", "speech_qa_accuracy", "speech_qa_chance", False),
    ("require_speech_wer", "recognition word error rate", "speech_wer", "speech_wer_chance", True),
    ("require_speech_bleu", "speech translation BLEU", "speech_bleu", "speech_bleu_chance", False),
    ("require_reward_accuracy", "reward model ranking accuracy", "reward_accuracy", "reward_chance", False),
    (
        "require_preference_rate",
        "preference rate after DPO",
        "preference_rate_after",
        "preference_rate_before",
        False,
    ),
    (
        "require_rejection_accuracy",
        "accuracy of the reward model's pick",
        "rejection_accuracy_after",
        "rejection_accuracy_before",
        False,
    ),
)
#: ``--require-*-gain``: (option's dest, what, the "after" figure, the "before" figure); met when
#: after - before reaches the option's value.
_GAINS = (
    (
        "require_preference_gain",
        "DPO's preference rate gain",
        "preference_rate_after",
        "preference_rate_before",
    ),
    (
        "require_rejection_gain",
        "rejection sampling's accuracy gain",
        "rejection_accuracy_after",
        "rejection_accuracy_before",
    ),
)
#: ``--require-dpo-qa-drop D``: image QA accuracy after DPO is at most D below before it.
_POSTTRAIN_REQUIREMENTS = (
    "require_reward_accuracy",
    "require_preference_rate",
    "require_rejection_accuracy",
    "require_preference_gain",
    "require_rejection_gain",
    "require_dpo_qa_drop",
)


def unmet_requirements(args: argparse.Namespace, report: dict[str, Any]) -> list[str]:
    """What the demo's report fails of the ``--require-*`` options given (empty when it meets them)."""
    unmet = []
    for dest, what, key, chance, lower_is_better in _REQUIREMENTS:
        required = getattr(args, dest)
        if required is None:
            continue
        value = report[key]
        if value > required if lower_is_better else value < required:
            side = "above the allowed" if lower_is_better else "below the required"
            reference = "before" if chance.endswith("_before") else "chance"
            unmet.append(f"{what} {value:.3f} is {side} {required:.3f} ({reference} {report[chance]:.3f})")
    for dest, what, after, before in _GAINS:
        required = getattr(args, dest, None)
        if required is not None and report[after] - report[before] < required:
            unmet.append(
                f"{what} {report[after] - report[before]:+.3f} ({report[before]:.3f} -> {report[after]:.3f}) "
                f"is below the required {required:+.3f}"
            )
    drop = getattr(args, "require_dpo_qa_drop", None)
    if drop is not None:
        lost = report["image_qa_accuracy_before_dpo"] - report["image_qa_accuracy_after_dpo"]
        if lost > drop:
            unmet.append(
                f"image QA accuracy fell by {lost:.3f} with DPO ({report['image_qa_accuracy_before_dpo']:.3f} -> "
                f"{report['image_qa_accuracy_after_dpo']:.3f}), more than the allowed {drop:.3f}"
            )
    return unmet
