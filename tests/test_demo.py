"""`mm demo` end to end at a few steps per phase: the pipeline, the report, and the saved model.

The accuracy the demo reaches is checked by CI's `mm demo --quick --require-accuracy` run (see
`.ci/run`), which trains for real; here only the mechanics and the promises are checked.
"""

from __future__ import annotations

import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mm.demo.data import make_image_qa, make_speech_samples, make_video_qa
from mm.demo.posttrain import PosttrainSettings
from mm.demo.posttrain_data import FLAWS, VERBOSE_TEMPLATES, make_preference_pairs, pair_prompt
from mm.demo.run import DemoSettings, run_demo
from mm.demo.speech import SpeechDemoSettings
from mm.demo.video import VideoDemoSettings
from mm.eval.speech import corpus_bleu, corpus_wer
from mm.eval.vqa import normalized_exact_match, vqa_accuracy
from mm.text_backbone import ByteTokenizer

MICRO = DemoSettings(
    text_docs=60,
    text_steps=4,
    text_batch=4,
    text_seq_len=64,
    encoder_samples=40,
    encoder_steps=3,
    caption_samples=24,
    qa_samples=48,
    eval_samples=8,
    pretrain_steps=4,
    anneal_steps=3,
    speech_text_steps=5,  # with speech, the text model trains this long (with "Repeat after me" turns)
)
VIDEO_MICRO = VideoDemoSettings(train_clips=8, eval_clips=4, steps=2)
SPEECH_MICRO = SpeechDemoSettings(
    asr_train=8, qa_train=8, asr_eval=4, qa_eval=4, ast_train=4, ast_eval=3, pretrain_steps=2, sft_steps=2
)
POST_MICRO = PosttrainSettings(
    train_pairs=8, heldout_pairs=4, reward_steps=2, dpo_steps=2, rejection_prompts=4, rejection_n=3
)


def test_demo_pipeline_keeps_the_backbone_and_saves_a_servable_model(tmp_path, capsys):
    report = run_demo(
        tmp_path / "out",
        settings=MICRO,
        video_settings=VIDEO_MICRO,
        speech_settings=SPEECH_MICRO,
        posttrain_settings=POST_MICRO,
        progress=False,
    )
    for key in (
        "reward_accuracy",
        "reward_chance",
        "preference_rate_before",
        "preference_rate_after",
        "rejection_accuracy_before",
        "rejection_accuracy_after",
        "image_qa_accuracy_after_dpo",
        "text_ppl_before",
        "text_ppl_after",
        "backbone_digest_before",
        "backbone_digest_after",
        "image_qa_accuracy",
        "image_qa_chance",
        "video_qa_accuracy",
        "video_qa_chance",
        "video_qa_per_kind",
        "video_timings",
        "speech_wer",
        "speech_wer_chance",
        "speech_qa_accuracy",
        "speech_qa_chance",
        "stages",
    ):
        assert key in report
    assert report["backbone_digest_before"] == report["backbone_digest_after"]
    assert report["text_ppl_before"] == report["text_ppl_after"]  # exactly: the same logits
    names = [s["name"] for s in report["stages"]]
    assert names == [
        "text-backbone",
        "image-encoder",
        "image-pretrain",
        "image-anneal",
        "reward-model",
        "dpo",
        "video-adapter",
        "speech-pretrain",
        "speech-sft",
    ]
    assert [s["steps"] for s in report["stages"]] == [5, 3, 4, 3, 2, 2, 2, 2, 2]
    assert report["video_qa_eval_samples"] == 4 and report["video_data"]["cached_videos"] == 8
    assert report["speech_eval_samples"] == {"asr": 4, "ast": 3, "qa": 4}
    assert (
        report["speech_data"]["speech"]["samples"] == 20
    )  # the three tasks, interleaved in one shard folder
    assert report["speech_data"]["speech"]["per_task"] == {"asr": 8, "ast": 4, "qa": 8}
    _assert_figures_follow_from_the_answers(report)
    _assert_posttrain_figures_follow_from_the_models(report, tmp_path / "out")

    out = tmp_path / "out"
    _assert_mm_eval_reproduces_the_figures(report, out, tmp_path / "again", capsys)
    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report))
    plots = ("text-backbone", "image-encoder", "image-stages", "video-stage", "speech-stages")
    for f in ("report.md", *(f"plots/{p}.png" for p in plots)):
        assert (out / f).is_file(), f
    # Every trainer stage (all but the text backbone and image encoder pre-training) wrote its loss
    # curve, metrics and a checkpoint; the data went through shards.
    for stage in names[2:]:
        assert (out / "runs" / stage / "loss.png").is_file()
    assert "video QA accuracy" in (out / "report.md").read_text()
    assert report["data"]["qa"]["samples"] == 48 and report["data"]["captions"]["samples"] == 24

    # The saved model answers through `mm ask` (the README's second command).
    (sample,) = make_image_qa(1, split="eval", seed=5)
    sample.image.save(tmp_path / "q.png")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mm.cli",
            "ask",
            "--model",
            str(out / "model"),
            "--image",
            str(tmp_path / "q.png"),
            "--max-new-tokens",
            "6",
            "--json",
            sample.question,
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    answer = json.loads(done.stdout)
    assert isinstance(answer["answer"], str) and answer["tokens"] <= 6

    # ... and about a video (the held-out clips the demo wrote), through `mm ask --video`.
    from mm.cli import main

    clip = sorted((out / "raw-video" / "eval").glob("*.mp4"))[0]
    argv = ["ask", "--model", str(out / "model"), "--video", str(clip), "--max-new-tokens", "6", "--json"]
    assert main([*argv, "Which way does the shape move?"]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 6

    # ... and to a spoken question (a recording the speech phase synthesised), through `mm ask --audio`.
    spoken = sorted((out / "raw" / "speech").glob("qa-*.wav"))[0]
    argv = ["ask", "--model", str(out / "model"), "--audio", str(spoken), "--max-new-tokens", "6", "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["tokens"] <= 6

    # Text-only logits of the saved model are the backbone's, bit for bit.
    from mm import MultimodalModel

    model = MultimodalModel.from_pretrained(out / "model")
    ids = torch.tensor([model.preprocessor.tokenizer.encode("A red circle in the top left.", bos=True)])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.backbone(ids))


def _assert_figures_follow_from_the_answers(report):
    """The micro run evaluates so few samples that the report's examples list every one: its
    examples must be the generated evaluation samples, in order, and its figures what their answers
    score, recomputed here by hand. The chance levels and the losses of the demo's own training
    loops are pinned (seed 0): a refactor must give the same."""
    images = make_image_qa(MICRO.eval_samples, split="eval", seed=3)
    clips = make_video_qa(VIDEO_MICRO.eval_clips, split="eval", seed=12)
    said = {
        t: make_speech_samples(n, t, split="eval", seed=0) for t, n in (("asr", 4), ("ast", 3), ("qa", 4))
    }
    image = [(e["question"], e["answer"], e["model"]) for e in report["image_qa_examples"]]
    video = [(e["question"], e["answer"], e["kind"], e["model"]) for e in report["video_qa_examples"]]
    spoken = [(e["task"], e["said"], e["answer"], e["model"]) for e in report["speech_examples"]]
    repeated = [(e["text"], e["model"]) for e in report["speech_text_repeat_examples"]]
    translated = [(e["text"], e["answer"], e["model"]) for e in report["speech_text_translate_examples"]]
    assert {
        "image": [x[:2] for x in image],
        "video": [x[:3] for x in video],
        "speech": [x[:3] for x in spoken],
        "repeated": [x[0] for x in repeated],
        "translated": [x[:2] for x in translated],
    } == {
        "image": [(s.question, s.answer) for s in images],
        "video": [(s.question, s.answer, s.kind) for s in clips],
        "speech": [(s.task, s.text, s.answer) for t in said for s in said[t]],
        "repeated": [s.answer for s in said["asr"]],
        "translated": [(s.text, s.answer) for s in said["ast"]],
    }

    def share(flags):
        flags = list(flags)
        return sum(flags) / len(flags)

    def vqa(answer, model):  # ten copies of the answer: mm eval's vqav2 task scores each question so
        return vqa_accuracy(model, [answer] * 10)

    answers = {t: [x[3] for x in spoken if x[0] == t] for t in said}
    refs = {t: [s.answer for s in said[t]] for t in said}
    expected = {
        "image_qa_accuracy": share(vqa(a, m) for _, a, m in image),
        **{
            f"image_qa_per_kind.{k}": share(vqa(a, m) for s, (_, a, m) in zip(images, image) if s.kind == k)
            for k in sorted({s.kind for s in images})
        },
        # mm eval's video-qa and speech-qa tasks: exact match after VQAv2's answer normaliser
        "video_qa_accuracy": share(normalized_exact_match(m, [a]) for _, a, _, m in video),
        **{
            f"video_qa_per_kind.{k}": share(
                normalized_exact_match(m, [a]) for _, a, kind, m in video if kind == k
            )
            for k in {x[2] for x in video}
        },
        "video_qa_chance": 0.25,
        "speech_wer": corpus_wer(answers["asr"], refs["asr"]),
        "speech_asr_exact": share(a == r for a, r in zip(answers["asr"], refs["asr"])),
        "speech_text_repeat_wer": corpus_wer([m for _, m in repeated], refs["asr"]),
        "speech_bleu": corpus_bleu(answers["ast"], refs["ast"]),
        "speech_ast_exact": share(a == r for a, r in zip(answers["ast"], refs["ast"])),
        "speech_text_translate_bleu": corpus_bleu([m for _, _, m in translated], refs["ast"]),
        "speech_qa_accuracy": share(
            normalized_exact_match(a, [s.answer]) for s, a in zip(said["qa"], answers["qa"])
        ),
        "speech_qa_exact": share(a == r for a, r in zip(answers["qa"], refs["qa"])),
        "speech_qa_chance": 0.5,  # two of the four questions are about blue things
        "speech_wer_chance": 11 / 17,  # the best single training transcript
        "speech_bleu_chance": 15.762360150052935,  # the best single training translation
        "text-backbone final loss": 4.2545952796936035,
        "image-encoder final loss": 5.076735973358154,
    }
    got = {
        **{k: v for k, v in report.items() if k in expected},
        **{f"image_qa_per_kind.{k}": v for k, v in report["image_qa_per_kind"].items()},
        **{f"video_qa_per_kind.{k}": v for k, v in report["video_qa_per_kind"].items()},
        **{f"{s['name']} final loss": s["final_loss"] for s in report["stages"][:2]},
    }
    assert got == pytest.approx(expected, rel=1e-4)  # the losses: to float error across machines


def _logp(model, messages, answer):
    """log p(answer tokens, then <|eot_id|>) from the model's full logits, by hand."""
    tok = model.preprocessor.tokenizer
    prompt = model.preprocessor.encode([*messages, {"role": "assistant", "content": answer}])
    ids = torch.tensor(prompt.ids)
    answer_ids = [*tok.encode(answer, bos=False), tok.special_tokens["<|eot_id|>"]]
    n = len(answer_ids)
    assert ids[-n:].tolist() == answer_ids  # the conversation ends with the answer and its eot
    batch = model.preprocessor.collate([prompt])
    batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits[0].double()  # [s, V]
    logprobs = torch.log_softmax(logits[-n - 1 : -1], dim=-1)
    return float(logprobs[torch.arange(n), torch.tensor(answer_ids)].sum())


def _assert_posttrain_figures_follow_from_the_models(report, out):
    """The post-training figures: the examples list every held-out pair and question of the micro
    run; the rewards are the saved reward model's, the log-probabilities the image model's and the
    DPO model's (recomputed by hand from their logits), the rates and accuracies what those give,
    and the kept answer of rejection sampling the one the reward model scored highest."""
    from mm import MultimodalModel
    from mm.eval.vqa import normalize_vqa_answer

    pairs = make_preference_pairs(POST_MICRO.heldout_pairs, split="eval", seed=22)
    examples = report["preference_examples"]
    assert [(e["question"], e["chosen"], e["rejected"], e["flaw"]) for e in examples] == [
        (p.sample.question, p.chosen, p.rejected, p.flaw) for p in pairs
    ]
    runs = out / "runs"
    reward = MultimodalModel.from_pretrained(runs / "reward-model" / "model").eval()
    sft = MultimodalModel.from_pretrained(runs / "image-anneal" / "model").eval()
    dpo = MultimodalModel.from_pretrained(runs / "dpo" / "model").eval()
    for p, e in zip(pairs, examples):
        prompt = pair_prompt(p)
        got = [reward.score([*prompt, {"role": "assistant", "content": a}]) for a in (p.chosen, p.rejected)]
        assert e["reward"] == pytest.approx(got, abs=1e-4)
        for model, key in ((sft, "logp_before"), (dpo, "logp_after")):
            assert e[key] == pytest.approx(
                [_logp(model, prompt, a) for a in (p.chosen, p.rejected)], abs=1e-3
            )
    assert {d for d in report["posttrain_digests"].values()} == {report["backbone_digest_before"]}

    def share(flags):
        flags = list(flags)
        return sum(flags) / len(flags)

    def better(values):
        return values[0] > values[1]

    questions = make_image_qa(POST_MICRO.rejection_prompts, split="eval", seed=23, heldout_phrasings=True)
    picks = report["rejection_examples"]
    assert [(e["question"], e["answer"]) for e in picks] == [(s.question, s.answer) for s in questions]
    for e in picks:  # the reward model chose: the highest reward among the non-blank samples, first on ties
        usable = [j for j, a in enumerate(e["sampled"]) if a.strip()]
        best = max(usable, key=lambda j: (e["rewards"][j], -j))
        assert e["kept"] == e["sampled"][best].strip() and len(e["sampled"]) == POST_MICRO.rejection_n

    def right(answer, reference):
        return normalize_vqa_answer(answer) == normalize_vqa_answer(reference)

    expected = {
        "reward_accuracy": share(better(e["reward"]) for e in examples),
        "reward_chance": 0.5,
        "preference_rate_before": share(better(e["logp_before"]) for e in examples),
        "preference_rate_after": share(better(e["logp_after"]) for e in examples),
        "rejection_accuracy_before": share(right(e["greedy"], e["answer"]) for e in picks),
        "rejection_policy_greedy_accuracy": share(right(e["policy_greedy"], e["answer"]) for e in picks),
        "rejection_accuracy_after": share(right(e["kept"], e["answer"]) for e in picks),
        "preference_margin_before": statistics.median(
            e["logp_before"][0] - e["logp_before"][1] for e in examples
        ),
        "preference_margin_after": statistics.median(
            e["logp_after"][0] - e["logp_after"][1] for e in examples
        ),
        "rejection_best_possible": share(any(right(a, e["answer"]) for a in e["sampled"]) for e in picks),
        **{
            f"reward_accuracy_per_flaw.{f}": share(better(e["reward"]) for e in examples if e["flaw"] == f)
            for f in FLAWS
        },
    }
    got = {
        **{k: report[k] for k in expected if k in report},
        **{f"reward_accuracy_per_flaw.{f}": v for f, v in report["reward_accuracy_per_flaw"].items()},
    }
    assert got == pytest.approx(expected)
    # the trainer's own held-out ranking accuracy of the reward stage (summary.json) is the same figure
    assert report["reward_stage_heldout_accuracy"] == pytest.approx(report["reward_accuracy"])
    assert "## Post-training" in (out / "report.md").read_text()
    assert (out / "plots" / "posttrain-stages.png").is_file()


def test_preference_pairs_prefer_the_short_correct_answer_over_a_wrong_verbose_or_off_topic_one(tmp_path):
    from mm.datasets.shards import pack
    from mm.datasets.webdata import DataCounters, read_shard
    from mm.demo.posttrain_data import write_preference_manifest
    from mm.demo.scenes import CHOICES, QUESTIONS, caption, is_novel

    pairs = make_preference_pairs(60, split="train", seed=4)
    assert pairs == make_preference_pairs(60, split="train", seed=4)  # the same arguments, the same pairs
    assert [p.flaw for p in pairs] == [FLAWS[i % 3] for i in range(60)]  # a third of each flaw
    seen_captions = 0
    for p in pairs:
        assert p.chosen == p.sample.answer and p.chosen in p.sample.choices  # short and right
        wordings = QUESTIONS[p.sample.kind]
        # only the off-topic pairs are asked in wordings the image stages never used
        assert p.sample.question in (wordings.heldout if p.flaw == "off-topic" else wordings.train)
        if p.flaw == "wrong":  # as short, another answer of the same kind (a neighbouring count)
            assert p.rejected in p.sample.choices and p.rejected != p.chosen
            if p.sample.kind == "count":
                assert abs(int(p.rejected) - int(p.chosen)) == 1
        elif p.flaw == "verbose":  # the right answer among many words
            assert p.rejected in {t.format(answer=p.chosen) for t in VERBOSE_TEMPLATES}
            assert len(p.rejected.split()) >= 10 > len(p.chosen.split()) + 2
        else:  # true of the picture, but not an answer of the kind asked: a caption or another kind's answer
            first = p.sample.scene.shapes[0]
            assert p.rejected not in p.sample.choices
            assert p.rejected == caption(p.sample.scene) or p.rejected in {first.colour, first.shape} | set(
                CHOICES["position"]
            )
            seen_captions += p.rejected == caption(p.sample.scene)
        assert not is_novel(p.sample.scene)
    assert 0 < seen_captions < 20
    assert all(is_novel(p.sample.scene) for p in make_preference_pairs(12, split="eval", seed=4))

    manifest = write_preference_manifest(pairs[:6], tmp_path / "raw")
    result = pack(manifest, tmp_path / "shards")
    assert result.samples == 6
    records = []
    for shard in sorted((tmp_path / "shards").glob("*.tar")):
        for _, fields, problem in read_shard(str(shard), DataCounters()):
            assert problem is None
            records.append(json.loads(fields["json"]))
    assert [(r["chosen"], r["rejected"], r["meta"]["flaw"]) for r in records] == [
        (p.chosen, p.rejected, p.flaw) for p in pairs[:6]
    ]
    assert all(r["messages"][-1]["role"] == "user" for r in records)
    with pytest.raises(FileExistsError):
        write_preference_manifest(pairs[:1], tmp_path / "raw")


def _assert_mm_eval_reproduces_the_figures(report, out, again, capsys):
    """Every figure the report says `mm eval` measured comes back exactly from its command, run
    through the CLI into another folder: the same score, the same per-sample answers and scores."""
    from mm.cli import main

    post = (
        "image_qa_accuracy_before_dpo",
        "image_qa_accuracy_after_dpo",
        "rejection_accuracy_before",
        "rejection_policy_greedy_accuracy",
    )
    open_qa = {"video_qa_accuracy": "video-qa", "speech_qa_accuracy": "speech-qa"}
    assert set(report["evaluations"]) == {"image_qa_accuracy", "speech_wer", "speech_bleu", *post, *open_qa}
    tasks = {
        "image_qa_accuracy": "vqav2",
        "speech_wer": "asr",
        "speech_bleu": "ast",
        **open_qa,
        **dict.fromkeys(post, "vqav2"),
    }
    for figure, provenance in report["evaluations"].items():
        assert provenance["task"] == tasks[figure]
        argv = shlex.split(provenance["command"])
        assert argv[:2] == ["mm", "eval"] and argv[3] == tasks[figure]
        # the DPO model answers after DPO and is the policy rejection sampling samples; the image model before
        dpo = figure in ("image_qa_accuracy_after_dpo", "rejection_policy_greedy_accuracy")
        assert Path(argv[2]).parts[-3:-1] == (("runs", "dpo") if dpo else ("runs", "image-anneal")) or (
            not dpo and figure in ("image_qa_accuracy", "speech_wer", "speech_bleu", *open_qa)
        )
        first = json.loads((Path(argv[argv.index("--out") + 1]) / "eval.json").read_text())
        argv[argv.index("--out") + 1] = str(again / figure)
        assert main([*argv[1:], "--no-progress", "--device", "cpu"]) == 0, capsys.readouterr().err
        capsys.readouterr()
        second = json.loads((again / figure / "eval.json").read_text())
        assert second["score"] == report[figure] == first["score"]  # exactly
        assert second["metric"] == provenance["metric"]
        assert second["samples"] == first["samples"] and len(first["samples"]) > 0
    # the per-kind figures are the per-sample scores of the image set's eval.json, grouped by kind
    images = make_image_qa(MICRO.eval_samples, split="eval", seed=3)
    scores = [
        x["score"] for x in json.loads((again / "image_qa_accuracy" / "eval.json").read_text())["samples"]
    ]
    kinds = sorted({s.kind for s in images})
    assert report["image_qa_per_kind"] == {
        k: sum(v for s, v in zip(images, scores) if s.kind == k) / sum(s.kind == k for s in images)
        for k in kinds
    }


def test_demo_refuses_contradicting_requirements_before_training(tmp_path, capsys):
    from mm.cli import main

    out = tmp_path / "never-written"
    assert main(["demo", "--out", str(out), "--require-speech-qa-accuracy", "0.5"]) == 2
    assert "--require-speech-qa-accuracy needs --speech" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--require-speech-wer", "0.6"]) == 2
    assert "--require-speech-wer needs --speech" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--require-speech-bleu", "30"]) == 2
    assert "--require-speech-bleu needs --speech" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--no-video", "--require-video-accuracy", "0.4"]) == 2
    assert "contradict" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--no-posttrain", "--require-rejection-gain", "0.05"]) == 2
    assert "--require-rejection-gain and --no-posttrain contradict" in capsys.readouterr().err
    assert not out.exists()


def test_sentence_turns_repeat_or_translate_the_words_and_answer_with_them():
    import random

    from mm.demo.scenes import COLOURS, SHAPES
    from mm.demo.speech_data import ASR_PROMPT, AST_PROMPT, FRENCH_TEMPLATES, to_french
    from mm.demo.text import sentence_turn, token_stream

    def capital(text):
        return text[0].upper() + text[1:]

    french = {
        capital(t.format(colour=c, shape=s)): to_french(t, c, s)
        for t in FRENCH_TEMPLATES
        for c in COLOURS
        for s in SHAPES
    }
    tok = ByteTokenizer()
    rng = random.Random(0)
    for task, prompt in (("asr", ASR_PROMPT), ("ast", AST_PROMPT)):
        for _ in range(20):
            text = tok.decode(sentence_turn(tok, rng, task))
            said = text.split(f"{prompt} ", 1)[1].split("<|eot_id|>", 1)[0]
            answer = said if task == "asr" else french[said]  # every turn says one of the sentences
            assert text.endswith(f"<|start_header_id|>assistant<|end_header_id|>\n\n{answer}<|eot_id|>")
    with pytest.raises(ValueError, match="task must be"):
        sentence_turn(tok, rng, "qa")

    docs = ["A red circle is at the top left.\nWhat colour is the circle? red"] * 80

    def what_the_documents_became(**shares):
        """(repeat turns, translation turns, question chat turns, plain documents) in the stream."""
        ids = token_stream(docs, tok, seed=1, **shares)
        assert torch.equal(ids, token_stream(docs, tok, seed=1, **shares))  # deterministic
        text = tok.decode(ids.tolist())
        assert text.count("<|begin_of_text|>") == len(docs)  # each document became one sequence
        repeat, translate = text.count(ASR_PROMPT), text.count(AST_PROMPT)
        chat = text.count("<|start_header_id|>user") - repeat - translate
        return repeat, translate, chat, text.count("What colour is the circle? red")

    # Every document becomes exactly one of the four, in the shares asked for (seed 1 draws these).
    assert what_the_documents_became() == (0, 0, 31, 49)
    assert what_the_documents_became(repeat_share=0.5) == (40, 0, 23, 17)
    assert what_the_documents_became(repeat_share=0.3, translate_share=0.3) == (18, 34, 18, 10)


def test_demo_requirements_name_each_unmet_figure_with_its_chance():
    from mm.cli import build_parser
    from mm.demo.run import unmet_requirements

    report = {
        "image_qa_accuracy": 0.9,
        "image_qa_chance": 0.25,
        "video_qa_accuracy": 0.4,
        "video_qa_chance": 0.25,
        "speech_qa_accuracy": 0.7,
        "speech_qa_chance": 0.3,
        "speech_wer": 0.62,
        "speech_wer_chance": 0.77,
        "speech_bleu": 35.0,
        "speech_bleu_chance": 9.5,
    }
    argv = ["demo", "--speech", "--require-accuracy", "0.75", "--require-video-accuracy", "0.45"]
    args = build_parser().parse_args(
        [
            *argv,
            "--require-speech-qa-accuracy",
            "0.6",
            "--require-speech-wer",
            "0.5",
            "--require-speech-bleu",
            "40",
        ]
    )
    assert unmet_requirements(args, report) == [
        "video QA accuracy 0.400 is below the required 0.450 (chance 0.250)",
        "recognition word error rate 0.620 is above the allowed 0.500 (chance 0.770)",
        "speech translation BLEU 35.000 is below the required 40.000 (chance 9.500)",
    ]
    post = {
        "reward_accuracy": 0.9,
        "reward_chance": 0.5,
        "preference_rate_before": 0.7,
        "preference_rate_after": 0.78,
        "rejection_accuracy_before": 0.6,
        "rejection_accuracy_after": 0.65,
        "image_qa_accuracy_before_dpo": 0.8,
        "image_qa_accuracy_after_dpo": 0.76,
    }
    strict = [
        "demo",
        "--require-reward-accuracy",
        "0.95",
        "--require-preference-gain",
        "0.1",
        "--require-rejection-gain",
        "0.05",
        "--require-rejection-accuracy",
        "0.7",
        "--require-dpo-qa-drop",
        "0.03",
    ]
    assert unmet_requirements(build_parser().parse_args(strict), {**report, **post}) == [
        "reward model ranking accuracy 0.900 is below the required 0.950 (chance 0.500)",
        "accuracy of the reward model's pick 0.650 is below the required 0.700 (before 0.600)",
        "DPO's preference rate gain +0.080 (0.700 -> 0.780) is below the required +0.100",
        "image QA accuracy fell by 0.040 with DPO (0.800 -> 0.760), more than the allowed 0.030",
    ]
    lenient = ["demo", "--require-preference-gain", "0.08", "--require-dpo-qa-drop", "0.05"]
    assert unmet_requirements(build_parser().parse_args(lenient), {**report, **post}) == []
    met = build_parser().parse_args([*argv[:4], "--require-speech-wer", "0.62"])  # equal is met
    assert unmet_requirements(met, report) == []
    assert unmet_requirements(build_parser().parse_args(["demo"]), report) == []
