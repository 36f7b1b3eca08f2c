"""The video stage of ``mm demo``: moving shapes, cached frame features, the video adapter.

After the image stages, the demo teaches its model to watch clips (Llama 3 paper, sections 7.2 and
7.4), through the real data path:

1. generate moving-shapes clips whose questions no single frame answers (direction of motion,
   which colour appeared first, how many shapes crossed the middle; :func:`mm.demo.video_data.make_video_qa`),
   a training split and an evaluation split whose every clip holds a colour-shape pair never seen
   in training; write them as H.264 mp4 files with PyAV and pack the training clips into shards;
2. run the model's frozen image encoder and projector once over the training shards
   (:func:`mm.training.cache_features.cache_features`, as ``mm data cache-features``);
3. train the ``video-adapter`` stage of the ``tiny-demo-video`` recipe on the cached shards: only
   the temporal aggregator and the video cross-attention blocks learn, 16 frames merged into 4
   ordered frames (groups of 4);
4. answer the evaluation questions by greedy generation from the mp4 files (decoded, sampled and
   encoded by the same path ``model.chat`` uses), through ``mm eval``'s ``video-qa`` task: exact match
   after VQAv2's answer normaliser (:func:`video_qa_accuracy`).

``quick`` is the same job on fewer clips and steps (CI runs it).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "VIDEO_FULL",
    "VIDEO_QUICK",
    "VideoDemoSettings",
    "cache_frame_features",
    "run_video_demo",
    "train_video_stage",
    "video_chance",
    "video_qa_accuracy",
    "write_video_data",
]


@dataclass(frozen=True, kw_only=True)
class VideoDemoSettings:
    """How much work the video phase does.

    Attributes:
        train_clips: generated training clips (one question each).
        eval_clips: generated evaluation clips (held-out colour-shape pairs in every one).
        steps: optimiser steps of the video stage.
        num_frames: frames per clip, sampled by the decoder and merged into one by the aggregator.
    """

    train_clips: int
    eval_clips: int
    steps: int
    num_frames: int = 16


VIDEO_FULL = VideoDemoSettings(train_clips=1500, eval_clips=300, steps=600)
VIDEO_QUICK = VideoDemoSettings(train_clips=400, eval_clips=120, steps=300)


def write_video_data(
    out: Path, settings: VideoDemoSettings, seed: int
) -> tuple[dict[str, Any], list, list[Path]]:
    """Generate the clips, write them as mp4 + json, and pack the training ones into shards.

    Returns:
        ``(info, eval_samples, eval_files)``: counts for the report, and the evaluation samples with
        their mp4 files.
    """
    from mm.datasets.shards import pack
    from mm.demo.video_data import make_video_qa, write_video_qa_folder

    raw, shards = out / "raw-video", out / "data" / "video"
    for folder in (raw, shards):
        shutil.rmtree(folder, ignore_errors=True)
    frames = settings.num_frames
    train = make_video_qa(settings.train_clips, split="train", seed=seed + 11, num_frames=frames)
    write_video_qa_folder(train, raw / "train")
    result = pack(raw / "train", shards, shard_bytes="1MB")
    evals = make_video_qa(settings.eval_clips, split="eval", seed=seed + 12, num_frames=frames)
    keys = write_video_qa_folder(evals, raw / "eval")
    files = [raw / "eval" / f"{key}.mp4" for key in keys]
    info = {
        "train_clips": len(train),
        "eval_clips": len(evals),
        "shards": len(result.shards),
        "bytes": result.bytes,
    }
    return info, evals, files


def video_qa_accuracy(model, samples, videos, *, out: Path, model_dir: Path) -> dict[str, Any]:
    """Accuracy of greedy answers to video questions, overall and per question kind, by ``mm eval``.

    The questions are written as an open-ended video QA set under ``out/eval-data/video-qa``
    (:func:`mm.demo.eval_sets.write_video_qa`) and scored by ``mm eval``'s ``video-qa`` task (exact
    match after VQAv2's answer normaliser), asked as the demo trains (the question alone:
    ``--prompt ""``); ``eval.json`` and ``eval.md`` go under ``out/eval/video-qa``.

    Args:
        model: the model (loaded from ``model_dir``), with its preprocessor (which decodes and samples
            the clips).
        samples: :class:`~mm.demo.video_data.VideoQASample` s.
        videos: per sample, its mp4 file.
        out: the demo's folder.
        model_dir: the folder ``model`` was loaded from (named in the reproducing command).

    Returns:
        ``accuracy``, ``per_kind`` (the mean per-sample score of each kind), ``examples`` (up to three
        questions of each kind, with their answers and the model's) and ``eval`` (the task, metric and
        ``mm eval`` command behind ``accuracy``).
    """
    from mm.demo.eval_sets import per_kind, score, write_video_qa

    data = write_video_qa(samples, videos, out / "eval-data" / "video-qa")
    scored = score(
        model, model_dir, "video-qa", data, out / "eval" / "video-qa", prompt="", max_new_tokens=12
    )
    answers = [r.prediction for r in scored.result.samples]
    right = [r.score for r in scored.result.samples]
    examples = []
    seen: Counter[str] = Counter()
    for s, answer in zip(samples, answers):
        seen[s.kind] += 1
        if len(examples) < 9 and seen[s.kind] <= 3:
            examples.append({"question": s.question, "answer": s.answer, "model": answer, "kind": s.kind})
    return {
        "accuracy": scored.result.score,
        "per_kind": per_kind([s.kind for s in samples], right),
        "examples": examples,
        "eval": scored.provenance(),
    }


def video_chance(samples) -> float:
    """Expected accuracy of guessing uniformly among each question's choices."""
    return sum(1 / len(s.choices) for s in samples) / max(1, len(samples))


def cache_frame_features(
    out: Path, image_model_dir: Path, settings: VideoDemoSettings, *, progress: bool
) -> int:
    """Run the frozen image encoder and projector of ``image_model_dir`` once over the training
    shards under ``out/data/video`` (as ``mm data cache-features``), writing the frame tokens to
    ``out/data/video-features``; returns the number of videos cached."""
    from mm.training.cache_features import cache_features

    cached = cache_features(
        image_model_dir,
        out / "data" / "video",
        out / "data" / "video-features",
        num_frames=settings.num_frames,
        batch_size=64,
        device="cpu",
        progress=progress,
        overwrite=True,
    )
    return cached.videos


def train_video_stage(
    out: Path, image_model_dir: Path, settings: VideoDemoSettings, *, seed: int, progress: bool
) -> tuple[Any, int]:
    """Train the ``video-adapter`` stage of the ``tiny-demo-video`` recipe on the cached frame
    features under ``out/data`` (``settings.steps`` steps, ``settings.num_frames`` frames per clip),
    starting from ``image_model_dir``; plot its loss.

    Returns:
        The stage's :class:`~mm.training.trainer.StageResult` and the frames it merges into one.
    """
    from mm.training.metrics import plot_loss_curves, read_metrics
    from mm.training.recipe import load_recipe
    from mm.training.trainer import Trainer

    recipe = load_recipe("tiny-demo-video").with_paths(
        IMAGE_MODEL=str(image_model_dir), DATA=str((out / "data").resolve())
    )
    stage = dataclasses.replace(
        recipe.stages[0],
        steps=settings.steps,
        seed=seed,
        video=dataclasses.replace(recipe.stages[0].video, num_frames=settings.num_frames),
    )
    recipe = dataclasses.replace(recipe, stages=(stage,), seed=seed)
    (result,) = Trainer(recipe, output_dir=out / "runs", progress=progress).run(
        replace=True
    )  # a rerun starts afresh
    plot_loss_curves(
        {stage.name: read_metrics(out / "runs" / stage.name / "metrics.jsonl")},
        out / "plots" / "video-stage.png",
    )
    return result, stage.video.group_size


def run_video_demo(
    out: str | Path,
    image_model_dir: str | Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    settings: VideoDemoSettings | None = None,
) -> dict[str, Any]:
    """Run the video phase of the demo into ``out`` on the model the image stages produced.

    Args:
        out: the demo's folder (clips under ``raw-video/``, shards under ``data/``, the stage under
            ``runs/video-adapter/``, the loss plot under ``plots/``).
        image_model_dir: the mm model folder after the image stages (it must have a video adapter,
            as the ``tiny-demo`` preset does).
        quick: fewer clips and steps.
        seed: the seed of clips and training.
        progress: progress bars and messages.
        settings: overrides ``VIDEO_QUICK`` / ``VIDEO_FULL``.

    Returns:
        ``video_qa_accuracy``, ``video_qa_chance``, ``video_qa_per_kind``, ``video_qa_eval_samples``,
        ``video_qa_examples``, ``video_evaluations`` (``{"video_qa_accuracy": {task, metric,
        command}}``), ``stages`` (the video stage, as the demo report lists stages),
        ``video_timings`` (seconds per phase), ``video_data`` and ``model_dir`` (the trained model).
    """
    from mm.model.multimodal import MultimodalModel

    settings = settings or (VIDEO_QUICK if quick else VIDEO_FULL)
    out, image_model_dir = Path(out), Path(image_model_dir).resolve()
    say = print if progress else (lambda *a, **k: None)
    started = time.perf_counter()

    # 1. clips -> mp4 + json -> shards
    data_info, eval_samples, eval_files = write_video_data(out, settings, seed)
    clips_seconds = time.perf_counter() - started

    # 2. frame tokens of the frozen image encoder + projector, once
    t0 = time.perf_counter()
    data_info["cached_videos"] = cache_frame_features(out, image_model_dir, settings, progress=progress)
    cache_seconds = time.perf_counter() - t0

    # 3. the video stage: aggregator + video cross-attention only
    result, _ = train_video_stage(out, image_model_dir, settings, seed=seed, progress=progress)

    # 4. held-out evaluation from the mp4 files, through the serving path
    t0 = time.perf_counter()
    model = MultimodalModel.from_pretrained(result.model_dir).eval()
    qa = video_qa_accuracy(model, eval_samples, eval_files, out=out, model_dir=Path(result.model_dir))
    eval_seconds = time.perf_counter() - t0
    report = {
        "video_qa_accuracy": qa["accuracy"],
        "video_qa_chance": video_chance(eval_samples),
        "video_qa_per_kind": qa["per_kind"],
        "video_qa_eval_samples": len(eval_samples),
        "video_qa_examples": qa["examples"],
        # which mm eval task and metric produced the figure, and the command that reproduces it
        "video_evaluations": {"video_qa_accuracy": qa["eval"]},
        "stages": [
            {
                "name": result.name,
                "steps": result.steps,
                "seconds": round(result.seconds, 2),
                "final_loss": result.final_loss,
            }
        ],
        "video_timings": {
            "clips_s": round(clips_seconds, 2),
            "cache_features_s": round(cache_seconds, 2),
            "train_s": round(result.seconds, 2),
            "eval_s": round(eval_seconds, 2),
            "total_s": round(time.perf_counter() - started, 2),
        },
        "video_data": data_info,
        "model_dir": result.model_dir,
    }
    say(
        f"video QA accuracy (held-out colour-shape pairs) {qa['accuracy']:.3f} "
        f"(chance {report['video_qa_chance']:.2f}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in qa["per_kind"].items())
    )
    return report
