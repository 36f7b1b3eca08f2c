"""``mm demo``: the whole compositional recipe in miniature, offline, on a CPU.

1. Natively train a tiny Llama-3-architecture text backbone on a generated corpus (byte-level
   tokenizer; about half the documents carry one of their questions as a Llama 3 chat turn, so
   the backbone is a chat model, as the paper's adapters are trained on one) and save it like any
   text checkpoint.
2. Freeze it; record its digest and its perplexity on held-out text.
3. Run the image stages of the ``tiny-demo`` recipe on generated pictures of shapes (captions, then
   questions about colour, shape, count and position), through the real data path: PNG files ->
   ``mm data pack`` shards -> streaming -> the staged trainer.
4. Run the video stage (:mod:`mm.demo.video`): moving-shapes clips written as mp4, the frozen image
   encoder's frame tokens cached once (``mm data cache-features``), then only the temporal
   aggregator and the video cross-attention blocks learn; questions no single frame answers
   (direction of motion, which colour appeared first, how many shapes crossed the middle) are
   scored on held-out clips decoded from the mp4 files.
   With ``--speech`` (experimental), then the speech stages (:mod:`mm.demo.speech`): speech
   synthesised offline with hibari-tts, BEST-RQ pre-training of the speech encoder, then speech
   SFT for recognition and spoken questions, scored on held-out word combinations and phrasings.
5. Evaluate on held-out combinations (a red triangle never seen in training, ...), check that the
   text model is untouched after all stages (same digest, same perplexity), and write
   ``OUT/report.json``, ``OUT/report.md``, the loss plots, and the trained model in ``OUT/model``
   for ``mm ask`` / ``mm serve``.

``--quick`` is the same job with fewer steps and samples (CI runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import re
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from mm.demo.speech import SpeechDemoSettings, run_speech_demo, speech_markdown, speech_summary_rows
from mm.demo.video import VideoDemoSettings, run_video_demo

__all__ = ["DemoSettings", "run_demo", "run_demo_command"]


@dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """How much work each phase does (``FULL`` and ``QUICK``)."""

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
    #: With speech, the text model trains this many steps with ``speech_repeat_share`` of its
    #: documents replaced by "Repeat after me" turns and ``speech_translate_share`` by "Translate
    #: the following sentence into French." turns (:func:`sentence_turn`): a tiny model needs
    #: that long to learn to repeat (measured with half the documents repeat turns: 8 of 40
    #: sentences repeated after 1,000 steps, 40 of 40 after 2,000; with 30% repeat and 30%
    #: translation turns, 40 of 40 repeated and 40 of 40 translated after 2,000).
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


# ---------------------------------------------------------------------- 1. the text backbone
_QA_LINE = re.compile(r"^(?P<question>.*\?) (?P<answer>[^?]+)$")


def chat_document(doc: str, tokenizer, rng: random.Random) -> list[int] | None:
    """A question line of ``doc`` as a Llama 3 chat turn, or None when ``doc`` has none.

    The user message holds the question's paragraph (its other question lines left out) and the
    question; the assistant answers and ends its turn with ``<|eot_id|>``. Pre-training on such
    turns beside plain documents makes the demo backbone a chat model, as the paper's adapters are
    trained on one (sections 7.5, 8.1): a frozen base model never learns to end an answer, and the
    adapters cannot teach it.
    """
    from mm.text_backbone.chat_format import format_chat

    turns = []
    for paragraph in doc.split("\n\n"):
        lines = paragraph.split("\n")
        asked = [i for i, line in enumerate(lines) if _QA_LINE.match(line)]
        story = "\n".join(line for i, line in enumerate(lines) if i not in asked)
        turns += [(story, _QA_LINE.match(lines[i])) for i in asked]
    if not turns:
        return None
    story, qa = rng.choice(turns)
    user = f"{story}\n{qa['question']}" if story else qa["question"]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": qa["answer"]}]
    return format_chat(tokenizer, messages, add_generation_prompt=False).ids


def sentence_turn(tokenizer, rng: random.Random, task: str = "asr") -> list[int]:
    """A chat turn about a short description of a coloured shape: for ``task="asr"`` the user says
    "Repeat after me in English. <sentence>" and the assistant repeats the sentence; for
    ``task="ast"`` the user says "Translate the following sentence into French. <sentence>" and the
    assistant answers in French (:func:`mm.demo.speech.to_french`). Either way it ends its turn.

    Recognition and translation through a frozen text model can be no better than the text model
    doing the same with the words as text (speech reaches it only as input embeddings), and the
    paper's text model is an instruct model that can. A tiny model learns that only from such
    turns: the sentences use every phrasing and colour-shape pair of
    :data:`mm.demo.speech.ASR_TEMPLATES`, as text; what the speech stages hold out (pairs,
    phrasings, voices) is held out from *speech*.
    """
    from mm.demo.data import COLOURS, SHAPES
    from mm.demo.speech import ASR_PROMPT, ASR_TEMPLATES, AST_PROMPT, to_french
    from mm.text_backbone.chat_format import format_chat

    if task not in ("asr", "ast"):
        raise ValueError(f"task must be 'asr' or 'ast', got {task!r}")
    template = rng.choice(ASR_TEMPLATES.train + ASR_TEMPLATES.heldout)
    colour, shape = rng.choice(COLOURS), rng.choice(SHAPES)
    text = template.format(colour=colour, shape=shape)
    text = text[0].upper() + text[1:]
    prompt, answer = (ASR_PROMPT, text) if task == "asr" else (AST_PROMPT, to_french(template, colour, shape))
    messages = [{"role": "user", "content": f"{prompt} {text}"}, {"role": "assistant", "content": answer}]
    return format_chat(tokenizer, messages, add_generation_prompt=False).ids


def _token_stream(
    docs: list[str],
    tokenizer,
    *,
    chat_share: float = 0.5,
    repeat_share: float = 0.0,
    translate_share: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """The pre-training token stream: ``repeat_share`` of the documents replaced by a repeat turn
    and ``translate_share`` by a translation turn (:func:`sentence_turn`), the others as plain
    text, about ``chat_share`` of those with a question line as a chat turn instead
    (:func:`chat_document`)."""
    rng = random.Random(seed)
    turns = repeat_share + translate_share
    ids: list[int] = []
    for doc in docs:
        r = rng.random()
        if r < turns:
            ids.extend(sentence_turn(tokenizer, rng, "asr" if r < repeat_share else "ast"))
            continue
        turn = chat_document(doc, tokenizer, rng) if r < turns + chat_share * (1 - turns) else None
        ids.extend(turn if turn is not None else tokenizer.encode(doc, bos=True, eos=True))
    return torch.tensor(ids, dtype=torch.long)


def train_text_backbone(
    config,
    docs: list[str],
    *,
    steps: int,
    batch: int,
    seq_len: int,
    seed: int,
    progress: bool,
    repeat_share: float = 0.0,
    translate_share: float = 0.0,
):
    """Natively pre-train a :class:`~mm.text_backbone.TextBackbone` on ``docs`` (next-token LM;
    ``repeat_share`` / ``translate_share`` of the documents replaced by :func:`sentence_turn` chat
    turns)."""
    from mm.text_backbone import ByteTokenizer, TextBackbone

    torch.manual_seed(seed)
    tokenizer = ByteTokenizer()
    stream = _token_stream(
        docs, tokenizer, repeat_share=repeat_share, translate_share=translate_share, seed=seed
    )
    model = TextBackbone(config)
    for name, p in model.named_parameters():  # small init: a stable start for a tiny model
        if p.ndim >= 2:
            torch.nn.init.normal_(
                p,
                std=0.02
                if "o_proj" not in name and "down_proj" not in name
                else 0.02 / math.sqrt(2 * config.num_layers),
            )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
        ),
    )
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in tqdm(range(steps), desc="text backbone", disable=not progress, unit="step"):
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=gen)
        chunk = torch.stack([stream[s : s + seq_len + 1] for s in starts.tolist()])
        logits = model(chunk[:, :-1])
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), chunk[:, 1:].reshape(-1)
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    return model.freeze(), tokenizer, losses


@torch.no_grad()
def perplexity(forward, docs: list[str], tokenizer, seq_len: int = 256) -> float:
    """Token-level perplexity of ``docs`` under ``forward(ids) -> logits`` (documents cut at ``seq_len``)."""
    total, count = 0.0, 0
    for doc in docs:
        ids = torch.tensor([tokenizer.encode(doc, bos=True, eos=True)[: seq_len + 1]])
        logits = forward(ids[:, :-1]).float()
        total += float(torch.nn.functional.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(total / count)


# ---------------------------------------------------------------------- 2b. the image encoder
def pretrain_image_encoder(config, samples, *, steps: int, batch: int, seed: int, progress: bool):
    """Pre-train the demo's image encoder before any adapter exists.

    The paper starts from a contrastively pre-trained ViT-H/14 (section 7.2). The demo's stand-in is
    supervised attribute tagging on the training images: from the mean of the encoder's patch
    features, linear heads name the colour, shape and quadrant of a lone shape and the number of
    shapes. The heads are thrown away; only the encoder is kept.
    """
    from mm.datasets.image_processing import ImageProcessor
    from mm.demo.data import COLOURS, POSITIONS, SHAPES, quadrant
    from mm.encoders import ImageEncoder

    torch.manual_seed(seed)
    encoder = ImageEncoder(config)
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(encoder.output_dim, 4) for k in ("colour", "shape", "position", "count")}
    )
    opt = torch.optim.AdamW([*encoder.parameters(), *heads.parameters()], lr=1e-3, weight_decay=0.01)
    proc = ImageProcessor(tile_size=config.image_size, max_tiles=config.max_num_tiles)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="image encoder", disable=not progress, unit="step"):
        chunk = [samples[i] for i in torch.randint(0, len(samples), (batch,), generator=gen).tolist()]
        labels = {k: torch.full((batch,), -100) for k in heads}
        for i, s in enumerate(chunk):
            labels["count"][i] = len(s.scene.shapes) - 1
            if len(s.scene.shapes) == 1:
                item = s.scene.shapes[0]
                labels["colour"][i] = COLOURS.index(item.colour)
                labels["shape"][i] = SHAPES.index(item.shape)
                labels["position"][i] = POSITIONS.index(quadrant(item.x, item.y))
        images = proc([[s.image] for s in chunk])
        features = encoder(
            images.pixel_values, images.aspect_ratio_ids, images.aspect_ratio_mask
        )  # [b, 1, t, p, D]
        pooled = features.flatten(1, 3).mean(dim=1)  # [b, D]
        loss = sum(torch.nn.functional.cross_entropy(heads[k](pooled), labels[k]) for k in heads)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return encoder.eval(), losses


# ---------------------------------------------------------------------- 3. data
def caption(scene) -> str:
    """A plain-English description of a generated scene: what and where for a lone shape, how many
    (and of which colours) for several."""
    from mm.demo.data import quadrant

    shapes = scene.shapes
    if len(shapes) == 1:
        s = shapes[0]
        return f"A {s.colour} {s.shape} in the {quadrant(s.x, s.y)}."
    words = {2: "Two", 3: "Three", 4: "Four"}
    return f"{words[len(shapes)]} shapes."


def write_data(out: Path, settings: DemoSettings, seed: int) -> dict[str, Any]:
    """Generate training images, write them as files and pack them into shards."""
    from mm.datasets.shards import pack
    from mm.demo.data import make_image_qa, write_image_qa_folder

    raw, shards = out / "raw", out / "data"
    for folder in (raw, shards):
        shutil.rmtree(folder, ignore_errors=True)
    caps = make_image_qa(settings.caption_samples, split="train", seed=seed + 1)
    (raw / "captions").mkdir(parents=True)
    for i, sample in enumerate(caps):
        key = f"{i:06d}"
        sample.image.save(raw / "captions" / f"{key}.png")
        (raw / "captions" / f"{key}.txt").write_text(caption(sample.scene))
    qa = make_image_qa(settings.qa_samples, split="train", seed=seed + 2)
    write_image_qa_folder(qa, raw / "qa")
    info = {}
    for name in ("captions", "qa"):
        result = pack(raw / name, shards / name, shard_bytes="4MB")
        info[name] = {"samples": result.samples, "shards": len(result.shards)}
    return info


# ---------------------------------------------------------------------- 4. evaluation
@torch.no_grad()
def image_qa_accuracy(model, samples, *, batch: int = 32) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers, overall and per question kind."""
    from mm.demo.data import qa_messages

    pre = model.preprocessor
    right: Counter[str] = Counter()
    seen: Counter[str] = Counter()
    examples = []
    for i in range(0, len(samples), batch):
        chunk = samples[i : i + batch]
        convs = [qa_messages(s)[:1] for s in chunk]
        inputs = pre.prompts(convs)
        new = model.generate(**inputs, max_new_tokens=12)
        for s, ids in zip(chunk, new.tolist()):
            stop = [k for k, t in enumerate(ids) if t in pre.tokenizer.stop_ids]
            answer = pre.tokenizer.decode(ids[: stop[0]] if stop else ids, skip_special=True).strip()
            seen[s.kind] += 1
            right[s.kind] += answer == s.answer
            if len(examples) < 8:
                examples.append({"question": s.question, "answer": s.answer, "model": answer})
    per_kind = {k: right[k] / seen[k] for k in sorted(seen)}
    return {
        "accuracy": sum(right.values()) / max(1, sum(seen.values())),
        "per_kind": per_kind,
        "examples": examples,
    }


# ---------------------------------------------------------------------- the job
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
) -> dict[str, Any]:
    """Run the demo into ``out`` and return the report (also written to ``out/report.json``).

    ``settings`` and ``video_settings`` override the amounts of work that ``quick`` picks
    (:data:`QUICK` / :data:`FULL`, :data:`~mm.demo.video.VIDEO_QUICK` / :data:`~mm.demo.video.VIDEO_FULL`).
    """
    from mm.demo.data import heldout_text, make_image_qa, make_text_corpus
    from mm.model.multimodal import MultimodalModel
    from mm.model.presets import MODEL_PRESETS
    from mm.text_backbone import TextBackbone
    from mm.training.metrics import plot_loss_curves, read_metrics
    from mm.training.recipe import load_recipe
    from mm.training.trainer import Trainer, summary_table

    if settings is None:
        settings = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = print if progress else (lambda *a, **k: None)

    # 1. natively train the text backbone, save it like any text checkpoint
    t0 = time.perf_counter()
    text_config = MODEL_PRESETS["tiny-demo"]().text
    docs = make_text_corpus(settings.text_docs, seed=seed)
    hear = speech or speech_settings is not None
    backbone, tokenizer, text_losses = train_text_backbone(
        text_config,
        docs,
        steps=settings.speech_text_steps if hear else settings.text_steps,
        repeat_share=settings.speech_repeat_share if hear else 0.0,
        translate_share=settings.speech_translate_share if hear else 0.0,
        batch=settings.text_batch,
        seq_len=settings.text_seq_len,
        seed=seed,
        progress=progress,
    )
    backbone_dir = out / "backbone"
    shutil.rmtree(backbone_dir, ignore_errors=True)
    backbone.save_pretrained(backbone_dir)
    tokenizer.save(backbone_dir)
    text_seconds = time.perf_counter() - t0
    plot_loss_curves(
        {"text backbone": [{"step": i + 1, "loss": v} for i, v in enumerate(text_losses)]},
        out / "plots" / "text-backbone.png",
    )

    # 2. freeze: digest and held-out perplexity of the saved backbone
    backbone = TextBackbone.from_pretrained(backbone_dir).freeze()
    held = heldout_text(200 if quick else 400, seed=seed + 100)
    digest_before = backbone.digest()
    ppl_before = perplexity(backbone, held, tokenizer)
    say(
        f"text backbone: {sum(p.numel() for p in backbone.parameters()):,} parameters, "
        f"held-out perplexity {ppl_before:.3f}, digest {digest_before[:16]}…"
    )

    # 3. pre-train the image encoder on its own, then run the image stages on generated shapes
    t0 = time.perf_counter()
    encoder_config = MODEL_PRESETS["tiny-demo"]().image_encoder
    encoder_samples = make_image_qa(settings.encoder_samples, split="train", seed=seed + 4)
    encoder, encoder_losses = pretrain_image_encoder(
        encoder_config, encoder_samples, steps=settings.encoder_steps, batch=32, seed=seed, progress=progress
    )
    encoder_file = out / "image-encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, encoder_file)
    encoder_seconds = time.perf_counter() - t0
    plot_loss_curves(
        {"image encoder": [{"step": i + 1, "loss": v} for i, v in enumerate(encoder_losses)]},
        out / "plots" / "image-encoder.png",
    )
    data_info = write_data(out, settings, seed)
    recipe = load_recipe("tiny-demo").with_paths(
        BACKBONE=str(backbone_dir.resolve()),
        ENCODER=str(encoder_file.resolve()),
        DATA=str((out / "data").resolve()),
    )
    steps = {"image-pretrain": settings.pretrain_steps, "image-anneal": settings.anneal_steps}
    recipe = dataclasses.replace(
        recipe, stages=tuple(dataclasses.replace(s, steps=steps.get(s.name, s.steps)) for s in recipe.stages)
    )
    trainer = Trainer(recipe, output_dir=out / "runs", progress=progress)
    results = trainer.run()

    final_dir = Path(results[-1].model_dir)

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

    # 5. evaluate and report (the "after" figures: after every stage)
    model = MultimodalModel.from_pretrained(final_dir).eval()
    model_dir = out / "model"
    shutil.rmtree(model_dir, ignore_errors=True)
    model.save_pretrained(model_dir, copy_backbone=True)
    model = MultimodalModel.from_pretrained(model_dir).eval()
    eval_samples = make_image_qa(settings.eval_samples, split="eval", seed=seed + 3)
    qa = image_qa_accuracy(model, eval_samples)
    digest_after = model.backbone.digest()
    ppl_after = perplexity(lambda ids: model(ids).logits, held, tokenizer)
    curves = {r.name: read_metrics(out / "runs" / r.name / "metrics.jsonl") for r in results}
    plot_loss_curves(curves, out / "plots" / "image-stages.png")
    report = {
        "mode": "quick" if quick else "full",
        "seed": seed,
        "text_ppl_before": ppl_before,
        "text_ppl_after": ppl_after,
        "backbone_digest_before": digest_before,
        "backbone_digest_after": digest_after,
        "backbone_unchanged": digest_before == digest_after,
        "image_qa_accuracy": qa["accuracy"],
        "image_qa_chance": 0.25,
        "image_qa_per_kind": qa["per_kind"],
        "image_qa_eval_samples": len(eval_samples),
        "image_qa_examples": qa["examples"],
        **{k: v for k, v in video_report.items() if k.startswith("video_")},
        **{
            k: v
            for k, v in speech_report.items()
            if k.startswith("speech_") and k not in ("speech_stages", "speech_model_dir")
        },
        "stages": [
            {
                "name": "text-backbone",
                "steps": len(text_losses),
                "seconds": round(text_seconds, 2),
                "final_loss": text_losses[-1],
            },
            {
                "name": "image-encoder",
                "steps": settings.encoder_steps,
                "seconds": round(encoder_seconds, 2),
                "final_loss": encoder_losses[-1],
            },
            *[
                {"name": r.name, "steps": r.steps, "seconds": round(r.seconds, 2), "final_loss": r.final_loss}
                for r in results
            ],
            *video_report["stages"],
            *speech_report["speech_stages"],
        ],
        "data": data_info,
        "parameters": model.component_parameters(),
        "model_dir": str(model_dir),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "report.md").write_text(_markdown(report))
    say("")
    say(summary_table(results))
    say("")
    say(_summary(report))
    return report


def _summary(r: dict[str, Any]) -> str:
    rows = [
        (
            "image QA accuracy (held-out combinations)",
            f"{r['image_qa_accuracy']:.3f}  (chance {r['image_qa_chance']:.2f})",
        ),
        *[(f"  {k}", f"{v:.3f}") for k, v in r["image_qa_per_kind"].items()],
        *_video_summary_rows(r),
        *speech_summary_rows(r),
        ("text perplexity before / after", f"{r['text_ppl_before']:.4f} / {r['text_ppl_after']:.4f}"),
        ("backbone digest unchanged", "yes" if r["backbone_unchanged"] else "NO"),
        ("total time", f"{r['seconds']:.0f} s"),
        ("model", r["model_dir"]),
    ]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(width)}  {b}" for a, b in rows)


def _markdown(r: dict[str, Any]) -> str:
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

{_video_markdown(r)}{speech_markdown(r)}## Stages

| stage | steps | seconds | final loss |
| --- | --- | --- | --- |
{stages}

![text backbone](plots/text-backbone.png)
![image encoder](plots/image-encoder.png)
![image stages](plots/image-stages.png)
{"![video stage](plots/video-stage.png)" if "video_qa_accuracy" in r else ""}
{"![speech stages](plots/speech-stages.png)" if "speech_wer" in r else ""}

## Examples

| question | answer | model |
| --- | --- | --- |
{examples}
"""


def _video_summary_rows(r: dict[str, Any]) -> list[tuple[str, str]]:
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


def _video_markdown(r: dict[str, Any]) -> str:
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


def run_demo_command(args: argparse.Namespace) -> int:
    """``mm demo`` (arguments: :mod:`mm.cli`): run, then check the ``--require-*`` figures."""
    if args.require_video_accuracy is not None and args.no_video:
        print("mm demo: --require-video-accuracy and --no-video contradict each other", file=sys.stderr)
        return 2
    for dest, *_ in _REQUIREMENTS:  # the speech figures exist only with --speech
        if dest.startswith("require_speech_") and getattr(args, dest) is not None and not args.speech:
            print(f"mm demo: --{dest.replace('_', '-')} needs --speech", file=sys.stderr)
            return 2
    report = run_demo(args.out, quick=args.quick, seed=args.seed, video=not args.no_video, speech=args.speech)
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
            unmet.append(f"{what} {value:.3f} is {side} {required:.3f} (chance {report[chance]:.3f})")
    return unmet
