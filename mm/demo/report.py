"""The report of ``mm demo``: ``report.json``, ``report.md`` and the summary printed at the end.

The report is where the demo's figures live: every run writes what it measured (accuracies and
their chance levels, perplexity before and after, the backbone's digests, the loss and time of
every stage) to ``OUT/report.json``, whose keys other tools read (their meaning is kept), and
renders the same figures as ``OUT/report.md``. A phase that did not run leaves no keys and no
section.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from mm.demo.image import ImagePhase
    from mm.demo.text import TextPhase

__all__ = [
    "demo_report",
    "evaluations_markdown",
    "markdown",
    "posttrain_markdown",
    "posttrain_summary_rows",
    "speech_markdown",
    "speech_summary_rows",
    "summary",
    "video_markdown",
    "video_summary_rows",
    "write_report",
]


def demo_report(
    *,
    quick: bool,
    seed: int,
    text: TextPhase,
    image: ImagePhase,
    image_qa: dict[str, Any],
    image_qa_eval_samples: int,
    digest_after: str,
    ppl_after: float,
    video: dict[str, Any],
    speech: dict[str, Any],
    parameters: dict[str, Any],
    posttrain: dict[str, Any] | None = None,
    model_dir: Path,
    seconds: float,
) -> dict[str, Any]:
    """The demo's report (``report.json``) from what each phase returned and the final model's
    figures (``image_qa`` from :func:`~mm.demo.image.image_qa_accuracy`, ``digest_after`` and
    ``ppl_after`` of its backbone, its ``parameters`` per component). The backbone counts as
    unchanged when the final model's digest and that of every post-training model are the first."""
    posttrain = posttrain or {"posttrain_stages": []}
    post_digests = posttrain.get("posttrain_digests", {})
    return {
        "mode": "quick" if quick else "full",
        "seed": seed,
        "text_ppl_before": text.ppl_before,
        "text_ppl_after": ppl_after,
        "backbone_digest_before": text.digest_before,
        "backbone_digest_after": digest_after,
        "backbone_unchanged": text.digest_before == digest_after
        and all(d == text.digest_before for d in post_digests.values()),
        "image_qa_accuracy": image_qa["accuracy"],
        "image_qa_chance": 0.25,
        "image_qa_per_kind": image_qa["per_kind"],
        "image_qa_eval_samples": image_qa_eval_samples,
        "image_qa_examples": image_qa["examples"],
        # which mm eval task and metric produced each figure, and the command that reproduces it
        "evaluations": {
            "image_qa_accuracy": image_qa["eval"],
            **posttrain.get("posttrain_evaluations", {}),
            **video.get("video_evaluations", {}),
            **speech.get("speech_evaluations", {}),
        },
        **{k: v for k, v in posttrain.items() if k not in ("posttrain_stages", "posttrain_evaluations")},
        **{k: v for k, v in video.items() if k.startswith("video_") and k != "video_evaluations"},
        **{
            k: v
            for k, v in speech.items()
            if k.startswith("speech_")
            and k not in ("speech_stages", "speech_model_dir", "speech_evaluations")
        },
        "stages": [
            text.stage,
            *image.stages,
            *posttrain["posttrain_stages"],
            *video["stages"],
            *speech["speech_stages"],
        ],
        "data": image.data,
        "parameters": parameters,
        "model_dir": str(model_dir),
        "seconds": seconds,
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
    }


def write_report(out: Path, report: dict[str, Any]) -> None:
    """Write ``out/report.json`` and ``out/report.md``."""
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(markdown(report))


def summary(r: dict[str, Any]) -> str:
    """The figures printed at the end of a run, one per line."""
    rows = [
        (
            "image QA accuracy (held-out combinations)",
            f"{r['image_qa_accuracy']:.3f}  (chance {r['image_qa_chance']:.2f})",
        ),
        *[(f"  {k}", f"{v:.3f}") for k, v in r["image_qa_per_kind"].items()],
        *posttrain_summary_rows(r),
        *video_summary_rows(r),
        *speech_summary_rows(r),
        ("text perplexity before / after", f"{r['text_ppl_before']:.4f} / {r['text_ppl_after']:.4f}"),
        ("backbone digest unchanged", "yes" if r["backbone_unchanged"] else "NO"),
        ("total time", f"{r['seconds']:.0f} s"),
        ("model", r["model_dir"]),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def markdown(r: dict[str, Any]) -> str:
    """``report.md``: the figures, the stages, the loss plots and examples of answers."""
    stages = "\n".join(
        f"| {s['name']} | {s['steps']} | {s['seconds']:.1f} | {s['final_loss']:.4f} |" for s in r["stages"]
    )
    kinds = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["image_qa_per_kind"].items())
    examples = "\n".join(
        f"| {e['question']} | {e['answer']} | {e['model']} |" for e in r["image_qa_examples"]
    )
    return f"""# mm demo report ({r["mode"]})

A tiny Llama-3-architecture text model was trained natively, frozen, and taught to see generated
shapes through gated cross-attention adapters. Evaluation uses colour/shape and shape/position
combinations never seen in training.

| | |
| --- | --- |
| image QA accuracy | **{r["image_qa_accuracy"]:.3f}** (chance {r["image_qa_chance"]:.2f}) |
| text perplexity before / after | {r["text_ppl_before"]:.4f} / {r["text_ppl_after"]:.4f} |
| backbone digest before | `{r["backbone_digest_before"]}` |
| backbone digest after | `{r["backbone_digest_after"]}` |
| total time | {r["seconds"]:.0f} s |

## Accuracy per question kind

| kind | accuracy |
| --- | --- |
{kinds}

{posttrain_markdown(r)}{video_markdown(r)}{speech_markdown(r)}{evaluations_markdown(r)}## Stages

| stage | steps | seconds | final loss |
| --- | --- | --- | --- |
{stages}

![text backbone](plots/text-backbone.png)
![image encoder](plots/image-encoder.png)
![image stages](plots/image-stages.png)
{"![post-training stages](plots/posttrain-stages.png)" if "reward_accuracy" in r else ""}
{"![video stage](plots/video-stage.png)" if "video_qa_accuracy" in r else ""}
{"![speech stages](plots/speech-stages.png)" if "speech_wer" in r else ""}

## Examples

| question | answer | model |
| --- | --- | --- |
{examples}
"""


def evaluations_markdown(r: dict[str, Any]) -> str:
    """The figures ``mm eval`` measured: task, metric and the command that reproduces each."""
    rows = "\n".join(
        f"| {figure} | {e['task']} | {e['metric']} | `{e['command']}` |"
        for figure, e in r.get("evaluations", {}).items()
    )
    return f"""## Measured by mm eval

The held-out sets are written under `eval-data/` in published layouts and scored by `mm eval`'s
code (results under `eval/`); each command reproduces its figure. Per-kind figures come from the
per-sample scores of `eval.json`.

| figure | task | metric | command |
| --- | --- | --- | --- |
{rows}

"""


def posttrain_summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the printed summary for the post-training phase (none when it did not run)."""
    if "reward_accuracy" not in r:
        return []
    return [
        (
            "reward model ranking accuracy (held-out pairs)",
            f"{r['reward_accuracy']:.3f}  (chance {r['reward_chance']:.2f})",
        ),
        (
            "DPO preference rate before -> after",
            f"{r['preference_rate_before']:.3f} -> {r['preference_rate_after']:.3f}",
        ),
        (
            "image QA accuracy before -> after DPO",
            f"{r['image_qa_accuracy_before_dpo']:.3f} -> {r['image_qa_accuracy_after_dpo']:.3f}",
        ),
        (
            "rejection sampling: SFT greedy -> DPO greedy -> picked",
            f"{r['rejection_accuracy_before']:.3f} -> {r['rejection_policy_greedy_accuracy']:.3f} -> "
            f"{r['rejection_accuracy_after']:.3f}  (best possible {r['rejection_best_possible']:.3f})",
        ),
        ("post-training time", f"{r['posttrain_seconds']['total']:.0f} s"),
    ]


def posttrain_markdown(r: dict[str, Any]) -> str:
    """The post-training section of ``report.md`` (empty when the phase did not run)."""
    if "reward_accuracy" not in r:
        return ""
    flaws = sorted(r["reward_accuracy_per_flaw"])
    per_flaw = "\n".join(
        f"| {f} | {r['reward_accuracy_per_flaw'][f]:.3f} | {r['preference_rate_per_flaw']['before'][f]:.3f} "
        f"| {r['preference_rate_per_flaw']['after'][f]:.3f} |"
        for f in flaws
    )
    examples = "\n".join(
        f"| {e['question']} | {e['chosen']} | {e['rejected']} | {e['reward'][0]:.2f} / {e['reward'][1]:.2f} |"
        for e in r["preference_examples"][:6]
    )

    def cell(text: str | None) -> str:  # sampled answers may hold anything
        return " ".join(str(text).split()).replace("|", "\\|")

    picks = "\n".join(
        f"| {e['question']} | {e['answer']} | {cell(e['greedy'])} | {cell(e['policy_greedy'])} | "
        f"{' / '.join(cell(a) for a in e['sampled'])} | {cell(e['kept'])} |"
        for e in r["rejection_examples"][:6]
    )
    s = r["rejection_settings"]
    t = r["posttrain_seconds"]
    return f"""## Post-training

The image model was then post-trained on preference pairs (Llama 3 section 7.5): a picture and a
question, the short correct answer preferred over a wrong short answer (a third of the pairs), the
correct answer buried in a long hedging sentence (a third), or, for a question worded as the image
stages never worded one, an answer true of the picture but beside the question, such as its
caption (a third: what the image model says to such wordings). Every held-out pair holds a
colour-shape-quadrant combination never seen in training. A reward model (the image adapter and a
scalar head, from the image model) and DPO (the image adapter, from the image model, against the
frozen image model) trained on the same pairs. The published model is still the image model.

| | |
| --- | --- |
| reward model ranking accuracy | **{r["reward_accuracy"]:.3f}** (chance {r["reward_chance"]:.2f}, {r["preference_heldout_pairs"]} held-out pairs) |
| DPO preference rate, before -> after | **{r["preference_rate_before"]:.3f} -> {r["preference_rate_after"]:.3f}** |
| DPO median log-probability margin (chosen - rejected), before -> after | {r["preference_margin_before"]:.2f} -> {r["preference_margin_after"]:.2f} |
| image QA accuracy, before -> after DPO | {r["image_qa_accuracy_before_dpo"]:.3f} -> {r["image_qa_accuracy_after_dpo"]:.3f} ({r["image_qa_dpo_samples"]} questions) |
| rejection sampling accuracy, image model's greedy answers -> reward model's pick | **{r["rejection_accuracy_before"]:.3f} -> {r["rejection_accuracy_after"]:.3f}** (best possible {r["rejection_best_possible"]:.3f}) |
| the sampled policy's (DPO model's) own greedy answers | {r["rejection_policy_greedy_accuracy"]:.3f} |
| post-training time | training {t["train"]:.1f} s, measures {t["measure"]:.1f} s, rejection sampling {t["rejection"]:.1f} s |

The preference rate is the share of held-out pairs whose chosen answer the policy gives the higher
summed log-probability (the image model before, the DPO model after). Rejection sampling: on
{s["prompts"]} held-out questions (a third in the new wordings) the latest policy, the DPO model,
sampled {s["n"]} answers each (temperature {s["temperature"]}, top-p {s["top_p"]}, seed {s["seed"]}); the reward
model, not the reference, picked one; the references then score the greedy answers and the picks
(VQA accuracy). "Best possible": the share of questions with a right answer among the samples.

| rejected answer | reward accuracy | preference before | preference after |
| --- | --- | --- | --- |
{per_flaw}

| question | chosen | rejected | reward chosen / rejected |
| --- | --- | --- | --- |
{examples}

| question | answer | image model, greedy | DPO model, greedy | DPO model's samples | picked |
| --- | --- | --- | --- | --- | --- |
{picks}

"""


def video_summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the printed summary for the video phase (none when it did not run)."""
    if "video_qa_accuracy" not in r:
        return []
    return [
        (
            "video QA accuracy (held-out clips)",
            f"{r['video_qa_accuracy']:.3f}  (chance {r['video_qa_chance']:.2f})",
        ),
        *[(f"  {k}", f"{v:.3f}") for k, v in r["video_qa_per_kind"].items()],
        ("video phase time", f"{r['video_timings']['total_s']:.0f} s"),
    ]


def video_markdown(r: dict[str, Any]) -> str:
    """The video section of ``report.md`` (empty when the video phase did not run)."""
    if "video_qa_accuracy" not in r:
        return ""
    kinds = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["video_qa_per_kind"].items())
    examples = "\n".join(
        f"| {e['question']} | {e['answer']} | {e['model']} |" for e in r["video_qa_examples"]
    )
    t = r["video_timings"]
    return f"""## Video

The model then learned to watch moving shapes through a temporal aggregator and video
cross-attention (16 frames merged into 4 ordered frames); every evaluation clip holds a
colour-shape pair never seen in training, and no single frame answers its question.

| | |
| --- | --- |
| video QA accuracy | **{r["video_qa_accuracy"]:.3f}** (chance {r["video_qa_chance"]:.2f}, {r["video_qa_eval_samples"]} clips) |

| kind | accuracy |
| --- | --- |
{kinds}

Video phase: clips {t["clips_s"]:.1f} s, frame features cached once {t["cache_features_s"]:.1f} s,
video stage {t["train_s"]:.1f} s, evaluation {t["eval_s"]:.1f} s.

| question | answer | model |
| --- | --- | --- |
{examples}

"""


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
colour (accuracy). Answers run to the model's stop token. `mm demo --speech` pre-trains the
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
