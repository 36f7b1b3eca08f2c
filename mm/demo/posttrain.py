"""The post-training phase of ``mm demo``: a reward model, DPO and rejection sampling.

On the model the image stages produced (the image SFT model; Llama 3 paper, section 7.5), after
the image phase and before video:

1. **Pairs** (:mod:`mm.demo.posttrain_data`): a picture and a question; the short correct answer is
   chosen; a third of the pairs reject a wrong short answer, a third the correct answer in a long
   hedging sentence, and a third (asked in a wording the image stages never used, as users word
   questions) an answer that is true of the picture but beside the question, such as its caption:
   what the SFT model says to such wordings. Training pairs never show a held-out
   colour-shape-quadrant combination; every held-out pair does. Written as a manifest with PNG
   files and packed with ``mm data pack``.
2. **Reward model**: the ``reward-model`` stage of the ``tiny-demo-post`` recipe, through the
   trainer, from the SFT model: a fresh ``reward_head`` and the image adapter learn (the paper
   unfreezes the vision side of its vision reward model too; without the adapter the head only sees
   text features that cannot tell a wrong colour from a right one); the image encoder stays frozen to
   keep the phase cheap. ``reward_accuracy``: the share of held-out pairs whose chosen answer gets
   the higher reward from :meth:`~mm.MultimodalModel.score_batch` (``reward_chance`` 0.5).
3. **DPO**: the ``dpo`` stage of the same recipe, from the SFT model (not the reward model), on the
   same training pairs; only the image adapter learns, against a frozen reference.
   ``preference_rate_before`` / ``preference_rate_after``: the share of held-out pairs to which the
   SFT model / the DPO model gives the chosen answer the higher summed log-probability (every token
   of the answer, its closing ``<|eot_id|>`` included: the probability of answering exactly that).
   Image QA accuracy on the demo's held-out questions is measured before and after DPO (through
   ``mm eval``, as the demo's headline figure).
4. **Rejection sampling** (:func:`mm.training.rejection.rejection_sample`) on held-out image
   questions with reference answers, a third of them in the new wordings: the latest policy (the
   DPO model, as the paper's post-training rounds sample the best model of the round before) samples
   ``n`` answers per question (fixed temperature, top-p and seed) and **the reward model** keeps one.
   ``rejection_accuracy_before`` is the SFT model's greedy answers' accuracy (through ``mm eval``'s
   ``vqav2`` task), ``rejection_policy_greedy_accuracy`` the DPO model's, and
   ``rejection_accuracy_after`` the accuracy of the kept answers; the reference answers only score
   answers afterwards, as VQA accuracy (exact match after VQAv2's normaliser).
   ``rejection_best_possible`` is what a perfect reward model would keep.

Neither model is published: ``OUT/model`` remains the image, video (and speech) model, and the video
phase starts from the image SFT model as before. The trainer checks the backbone's digest after each
stage; the phase records the digest of both stages' models for the report.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "POST_FULL",
    "POST_QUICK",
    "PosttrainSettings",
    "answer_logprobs",
    "preference_rates",
    "reward_ranking",
    "run_posttrain_phase",
]


@dataclass(frozen=True, kw_only=True)
class PosttrainSettings:
    """How much work the post-training phase does.

    Attributes:
        train_pairs: generated training pairs (both stages train on them).
        heldout_pairs: held-out pairs the reward accuracy and preference rates are measured on.
        reward_steps: optimiser steps of the reward stage.
        dpo_steps: optimiser steps of the DPO stage.
        rejection_prompts: held-out image questions of rejection sampling.
        rejection_n: answers sampled per question.
        rejection_temperature: their sampling temperature.
        rejection_top_p: their nucleus mass (below 1 it drops the misspellings a byte-level model
            samples now and then, which a reward model trained on whole words has never seen and
            may score high: at 1.0 the pick was 0.90 against 0.94 at 0.8 in a trial).
        rejection_max_new_tokens: the longest answer, greedy or sampled, in tokens (bytes): room
            for a whole caption or hedging sentence, so the reward model judges what the policy
            would say rather than its first dozen characters.
    """

    train_pairs: int
    heldout_pairs: int
    reward_steps: int
    dpo_steps: int
    rejection_prompts: int
    rejection_n: int
    rejection_temperature: float = 1.0
    rejection_top_p: float = 0.8
    rejection_max_new_tokens: int = 48


POST_FULL = PosttrainSettings(
    train_pairs=6000, heldout_pairs=600, reward_steps=600, dpo_steps=400, rejection_prompts=400, rejection_n=8
)
POST_QUICK = PosttrainSettings(
    train_pairs=3000, heldout_pairs=300, reward_steps=300, dpo_steps=200, rejection_prompts=200, rejection_n=8
)


# --------------------------------------------------------------------------------------- measures
def _batches(items: Sequence[Any], size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _conversation(pair, answer: str) -> list[dict[str, Any]]:
    from mm.demo.posttrain_data import pair_prompt

    return [*pair_prompt(pair), {"role": "assistant", "content": answer}]


@torch.no_grad()
def answer_logprobs(
    model, conversations: Sequence[list[dict[str, Any]]], batch_size: int = 16
) -> list[float]:
    """The summed log-probability ``model`` gives the last (assistant) answer of each conversation:
    every labelled token of it, its closing ``<|eot_id|>`` included."""
    from mm.training.dpo import answer_logps

    was_training = model.training
    model.eval()
    out: list[float] = []
    try:
        for chunk in _batches(conversations, batch_size):
            batch = model.preprocessor.collate([model.preprocessor.encode(c) for c in chunk])
            inputs = {k: v.to(model.device) for k, v in batch.items()}
            labels = inputs.pop("labels")
            out += answer_logps(model(**inputs), labels).total.tolist()
    finally:
        model.train(was_training)
    return out


def preference_rates(model, pairs: Sequence[Any]) -> tuple[float, list[tuple[float, float]]]:
    """``(share of pairs whose chosen answer has the higher summed log-probability, per pair
    (log p(chosen), log p(rejected)))``."""
    chosen = answer_logprobs(model, [_conversation(p, p.chosen) for p in pairs])
    rejected = answer_logprobs(model, [_conversation(p, p.rejected) for p in pairs])
    values = list(zip(chosen, rejected))
    return sum(c > r for c, r in values) / len(values), values


def reward_ranking(
    model, pairs: Sequence[Any], batch_size: int = 16
) -> tuple[float, list[tuple[float, float]]]:
    """``(share of pairs ranked right by the reward model's score, per pair (reward of chosen,
    reward of rejected))``."""
    values = []
    for chunk in _batches(list(pairs), batch_size):
        chosen = model.score_batch([_conversation(p, p.chosen) for p in chunk])
        rejected = model.score_batch([_conversation(p, p.rejected) for p in chunk])
        values += list(zip(chosen, rejected))
    return sum(c > r for c, r in values) / len(values), values


def _per_flaw(pairs: Sequence[Any], values: Sequence[tuple[float, float]]) -> dict[str, float]:
    from mm.demo.eval_sets import per_kind

    return per_kind([p.flaw for p in pairs], [float(c > r) for c, r in values])


# ------------------------------------------------------------------------------------------- data
def write_pairs(out: Path, settings: PosttrainSettings, seed: int) -> tuple[dict[str, Any], list]:
    """Generate the training and held-out pairs, write them under ``out/raw-post`` and pack them into
    ``out/data/pairs`` and ``out/data/pairs-heldout``; returns ``(counts, held-out pairs)``."""
    from mm.datasets.shards import pack
    from mm.demo.posttrain_data import make_preference_pairs, write_preference_manifest

    raw = out / "raw-post"
    shutil.rmtree(raw, ignore_errors=True)
    info = {}
    heldout = []
    for name, split, n, offset in (
        ("pairs", "train", settings.train_pairs, 21),
        ("pairs-heldout", "eval", settings.heldout_pairs, 22),
    ):
        pairs = make_preference_pairs(n, split=split, seed=seed + offset)
        manifest = write_preference_manifest(pairs, raw / name)
        shards = out / "data" / name
        shutil.rmtree(shards, ignore_errors=True)
        result = pack(manifest, shards, shard_bytes="4MB")
        info[name] = {"samples": result.samples, "shards": len(result.shards)}
        if split == "eval":
            heldout = pairs
    return info, heldout


def _train(out: Path, sft_dir: Path, settings: PosttrainSettings, progress: bool) -> list[Any]:
    """The ``tiny-demo-post`` recipe's two stages, each from the SFT model (runs under ``out/runs``)."""
    from mm.training.recipe import load_recipe
    from mm.training.trainer import Trainer

    recipe = load_recipe("tiny-demo-post").with_paths(
        SFT_MODEL=str(sft_dir.resolve()), DATA=str((out / "data").resolve())
    )
    steps = {"reward-model": settings.reward_steps, "dpo": settings.dpo_steps}
    recipe = dataclasses.replace(
        recipe, stages=tuple(dataclasses.replace(s, steps=steps.get(s.name, s.steps)) for s in recipe.stages)
    )
    return Trainer(recipe, output_dir=out / "runs", progress=progress).run(replace=True)


# ------------------------------------------------------------------------------------ evaluation
def greedy_image_qa(
    model, model_dir: Path, samples: Sequence[Any], folder: Path, max_new_tokens: int = 12
) -> dict[str, Any]:
    """Greedy answers to image questions scored by ``mm eval``'s ``vqav2`` task, as the demo's image
    QA figure is (the set written under ``folder/data``, results under ``folder/eval``).

    Returns:
        ``accuracy``, ``answers`` and ``scores`` (per sample, in order) and ``eval`` (task, metric,
        command).
    """
    from mm.demo.eval_sets import score, write_vqav2

    data = write_vqav2(samples, folder / "data")
    scored = score(model, model_dir, "vqav2", data, folder / "eval", prompt="", max_new_tokens=max_new_tokens)
    return {
        "accuracy": scored.result.score,
        "answers": [r.prediction for r in scored.result.samples],
        "scores": [r.score for r in scored.result.samples],
        "eval": scored.provenance(),
    }


def _rejection(
    out: Path, models: dict[str, tuple[Any, Path]], reward_model, settings: PosttrainSettings, seed, progress
):
    """Greedy accuracy of the SFT and DPO models, and accuracy of the reward model's pick among answers
    the DPO model sampled, on the same held-out questions (module docstring). ``models`` maps
    ``"sft"`` and ``"dpo"`` to ``(model, its folder)``."""
    from mm.datasets.shards import pack
    from mm.demo.image_data import make_image_qa, qa_messages
    from mm.eval.vqa import normalize_vqa_answer
    from mm.training.rejection import read_prompts, rejection_sample

    samples = make_image_qa(settings.rejection_prompts, split="eval", seed=seed + 23, heldout_phrasings=True)
    raw, shards, sampled = out / "raw-post" / "rejection", out / "data" / "rejection", out / "rejection"
    shutil.rmtree(shards, ignore_errors=True)
    # A manifest, not a KEY.png + KEY.json folder: rejection_sample stages media under their field
    # names, and a folder's image field ("png") has no extension to pack again.
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    keys = [f"{i:06d}" for i in range(len(samples))]
    rows = []
    for key, s in zip(keys, samples):
        s.image.save(raw / f"{key}.png", format="PNG")
        rows.append(json.dumps({"key": key, "messages": qa_messages(s, f"{key}.png")}))
    (raw / "questions.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    pack(raw / "questions.jsonl", shards, shard_bytes="4MB")
    greedy, policy_greedy = (
        greedy_image_qa(*models[name], samples, out / "eval" / folder, settings.rejection_max_new_tokens)
        for name, folder in (("sft", "rejection-greedy"), ("dpo", "rejection-policy-greedy"))
    )
    rejection_sample(
        models["dpo"][0],
        shards,
        sampled,
        n=settings.rejection_n,
        temperature=settings.rejection_temperature,
        top_p=settings.rejection_top_p,
        seed=seed,
        reward_model=reward_model,
        batch_size=32,
        max_new_tokens=settings.rejection_max_new_tokens,
        progress=progress,
        overwrite=True,
    )
    kept = {p.key: p.reference or "" for p in read_prompts(sampled / "sft")}  # the answer it kept
    lines = (sampled / "progress.jsonl").read_text().splitlines()[1:]
    rows = {r["key"]: r for r in map(json.loads, lines)}

    def right(answer: str, s) -> bool:
        return normalize_vqa_answer(answer) == normalize_vqa_answer(s.answer)

    return {
        "rejection_accuracy_before": greedy["accuracy"],
        "rejection_policy": "dpo",
        "rejection_policy_greedy_accuracy": policy_greedy["accuracy"],
        "rejection_accuracy_after": sum(right(kept.get(k, ""), s) for k, s in zip(keys, samples))
        / len(samples),
        # the share of questions with a right answer among the sampled ones: what a perfect reward
        # model would reach
        "rejection_best_possible": sum(
            any(right(a, s) for a in rows[k]["answers"]) for k, s in zip(keys, samples)
        )
        / len(samples),
        "rejection_settings": {
            "prompts": len(samples),
            "n": settings.rejection_n,
            "temperature": settings.rejection_temperature,
            "top_p": settings.rejection_top_p,
            "seed": seed,
            "max_new_tokens": settings.rejection_max_new_tokens,
        },
        "rejection_examples": [
            {
                "question": s.question,
                "answer": s.answer,
                "greedy": g,
                "policy_greedy": pg,
                "sampled": rows[k]["answers"],
                "rewards": rows[k]["scores"],
                "kept": kept.get(k),
            }
            for s, g, pg, k in zip(samples, greedy["answers"], policy_greedy["answers"], keys)
        ],
        "evaluations": {
            "rejection_accuracy_before": greedy["eval"],
            "rejection_policy_greedy_accuracy": policy_greedy["eval"],
        },
    }


# ------------------------------------------------------------------------------------------ phase
def run_posttrain_phase(
    out: Path,
    sft_dir: Path,
    *,
    settings: PosttrainSettings,
    qa_samples: int,
    seed: int,
    progress: bool,
) -> dict[str, Any]:
    """Run the phase (module docstring) on the SFT model in ``sft_dir``, image QA before and after DPO
    on the demo's first ``qa_samples`` held-out questions (those of its headline figure); returns the report's keys
    (``reward_*``, ``preference_*``, ``rejection_*``, ``image_qa_accuracy_*_dpo``,
    ``posttrain_*``), its ``posttrain_stages`` and ``posttrain_evaluations``."""
    from mm.demo.image_data import make_image_qa
    from mm.model.multimodal import MultimodalModel
    from mm.training.metrics import plot_loss_curves, read_metrics

    t0 = time.perf_counter()
    data, heldout = write_pairs(out, settings, seed)
    results = _train(out, sft_dir, settings, progress)
    plot_loss_curves(
        {r.name: read_metrics(out / "runs" / r.name / "metrics.jsonl") for r in results},
        out / "plots" / "posttrain-stages.png",
    )
    by_name = {r.name: r for r in results}
    reward_dir, dpo_dir = Path(by_name["reward-model"].model_dir), Path(by_name["dpo"].model_dir)
    t_train = time.perf_counter()

    sft = MultimodalModel.from_pretrained(sft_dir).eval()
    reward_model = MultimodalModel.from_pretrained(reward_dir).eval()
    dpo = MultimodalModel.from_pretrained(dpo_dir).eval()
    reward_accuracy, rewards = reward_ranking(reward_model, heldout)
    before, logps_before = preference_rates(sft, heldout)
    after, logps_after = preference_rates(dpo, heldout)
    questions = make_image_qa(qa_samples, split="eval", seed=seed + 3)
    qa_before = greedy_image_qa(sft, sft_dir, questions, out / "eval" / "image-qa-before-dpo")
    qa_after = greedy_image_qa(dpo, dpo_dir, questions, out / "eval" / "image-qa-after-dpo")
    t_measure = time.perf_counter()
    rejection = _rejection(
        out, {"sft": (sft, sft_dir), "dpo": (dpo, dpo_dir)}, reward_model, settings, seed, progress
    )
    t_rejection = time.perf_counter()

    stage_eval = json.loads((out / "runs" / "reward-model" / "summary.json").read_text()).get("eval", {})
    return {
        "reward_accuracy": reward_accuracy,
        "reward_chance": 0.5,
        "reward_accuracy_per_flaw": _per_flaw(heldout, rewards),
        "reward_stage_heldout_accuracy": stage_eval.get("heldout_accuracy"),
        "preference_rate_before": before,
        "preference_rate_after": after,
        "preference_rate_per_flaw": {
            "before": _per_flaw(heldout, logps_before),
            "after": _per_flaw(heldout, logps_after),
        },
        "preference_heldout_pairs": len(heldout),
        # the median over held-out pairs of log p(chosen) - log p(rejected): how strongly, not only
        # how often, the policy prefers the chosen answer
        "preference_margin_before": statistics.median(c - r for c, r in logps_before),
        "preference_margin_after": statistics.median(c - r for c, r in logps_after),
        "image_qa_accuracy_before_dpo": qa_before["accuracy"],
        "image_qa_accuracy_after_dpo": qa_after["accuracy"],
        "image_qa_dpo_samples": len(questions),
        **{k: v for k, v in rejection.items() if k != "evaluations"},
        "preference_examples": [
            {
                "question": p.sample.question,
                "chosen": p.chosen,
                "rejected": p.rejected,
                "flaw": p.flaw,
                "reward": list(r),
                "logp_before": list(b),
                "logp_after": list(a),
            }
            for p, r, b, a in zip(heldout, rewards, logps_before, logps_after)
        ],
        "posttrain_data": data,
        "posttrain_digests": {"reward-model": reward_model.backbone.digest(), "dpo": dpo.backbone.digest()},
        "posttrain_seconds": {
            "train": round(t_train - t0, 1),
            "measure": round(t_measure - t_train, 1),
            "rejection": round(t_rejection - t_measure, 1),
            "total": round(t_rejection - t0, 1),
        },
        "posttrain_stages": [
            {"name": r.name, "steps": r.steps, "seconds": round(r.seconds, 2), "final_loss": r.final_loss}
            for r in results
        ],
        "posttrain_evaluations": {
            "image_qa_accuracy_before_dpo": qa_before["eval"],
            "image_qa_accuracy_after_dpo": qa_after["eval"],
            **rejection["evaluations"],
        },
    }
