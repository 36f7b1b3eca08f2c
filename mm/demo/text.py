"""The text phase of ``mm demo``: natively pre-train a tiny text model, save it, freeze it.

The paper's adapters are trained on a natively pre-trained text model that is never changed
afterwards (Llama 3 paper, sections 3 and 7). The demo's stand-in is a tiny Llama-3-architecture
model over the byte-level tokenizer, pre-trained on the generated corpus
(:func:`mm.demo.text_data.make_text_corpus`) and saved like any text checkpoint; the phase then
loads it back frozen and records what every later stage must leave unchanged: its digest and its
perplexity on held-out text.

About half the documents carry one of their question lines as a Llama 3 chat turn instead
(:func:`chat_document`), so the backbone is a chat model, as the paper's adapters are trained on
one (sections 7.5, 8.1): a frozen base model never learns to end an answer, and the adapters
cannot teach it. With speech, some documents are replaced by "Repeat after me" and "Translate"
turns (:func:`sentence_turn`), and the model trains longer: recognition and translation through a
frozen text model can be no better than the text model doing the same with the words as text.
"""

from __future__ import annotations

import math
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from mm.demo.evaluate import perplexity
from mm.training.optim import lr_factor

__all__ = [
    "TextPhase",
    "chat_document",
    "run_text_phase",
    "sentence_turn",
    "token_stream",
    "train_text_backbone",
]

_QA_LINE = re.compile(r"^(?P<question>.*\?) (?P<answer>[^?]+)$")


def chat_document(doc: str, tokenizer, rng: random.Random) -> list[int] | None:
    """A question line of ``doc`` as a Llama 3 chat turn, or None when ``doc`` has none.

    The user message holds the question's paragraph (its other question lines left out) and the
    question; the assistant answers and ends its turn with ``<|eot_id|>``.
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
    assistant answers in French (:func:`mm.demo.speech_data.to_french`). Either way it ends its turn.

    The paper's text model is an instruct model that can repeat and translate; a tiny model learns
    that only from such turns. The sentences use every phrasing and colour-shape pair of
    :data:`mm.demo.speech_data.ASR_TEMPLATES`, as text; what the speech stages hold out (pairs,
    phrasings, voices) is held out from *speech*.
    """
    from mm.demo.scenes import COLOURS, SHAPES
    from mm.demo.speech_data import ASR_PROMPT, ASR_TEMPLATES, AST_PROMPT, to_french
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


def token_stream(
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
    turns).

    Returns:
        ``(backbone, tokenizer, losses)``: the frozen model, its byte-level tokenizer and the loss
        of every step.
    """
    from mm.text_backbone import ByteTokenizer, TextBackbone

    torch.manual_seed(seed)
    tokenizer = ByteTokenizer()
    stream = token_stream(
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
    # The stages' schedule (mm.training.optim): linear warm-up, then cosine decay to 10%.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, steps=steps, warmup=warmup, min_ratio=0.1)
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


@dataclass(frozen=True)
class TextPhase:
    """What the text phase leaves for the stages after it and for the report.

    Attributes:
        backbone_dir: the saved text checkpoint (``OUT/backbone``).
        tokenizer: its tokenizer.
        heldout: the held-out documents perplexity is measured on.
        ppl_before: their perplexity under the frozen backbone.
        digest_before: the frozen backbone's digest.
        stage: the phase as the report lists stages (name, steps, seconds, final loss).
    """

    backbone_dir: Path
    tokenizer: Any
    heldout: list[str]
    ppl_before: float
    digest_before: str
    stage: dict


def run_text_phase(
    out: Path,
    *,
    docs: int,
    heldout_docs: int,
    steps: int,
    batch: int,
    seq_len: int,
    repeat_share: float,
    translate_share: float,
    seed: int,
    progress: bool,
) -> TextPhase:
    """Pre-train the text model on ``docs`` generated documents, save it to ``out/backbone``, plot
    its loss, and load it back frozen to record its digest and its perplexity on ``heldout_docs``
    held-out documents."""
    from mm.demo.text_data import heldout_text, make_text_corpus
    from mm.model.config import ModelConfig
    from mm.text_backbone import TextBackbone
    from mm.training.metrics import plot_loss_curves

    t0 = time.perf_counter()
    config = ModelConfig.preset("tiny-demo").text
    backbone, tokenizer, losses = train_text_backbone(
        config,
        make_text_corpus(docs, seed=seed),
        steps=steps,
        repeat_share=repeat_share,
        translate_share=translate_share,
        batch=batch,
        seq_len=seq_len,
        seed=seed,
        progress=progress,
    )
    backbone_dir = out / "backbone"
    shutil.rmtree(backbone_dir, ignore_errors=True)
    backbone.save_pretrained(backbone_dir)
    tokenizer.save(backbone_dir)
    seconds = time.perf_counter() - t0
    plot_loss_curves(
        {"text backbone": [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]},
        out / "plots" / "text-backbone.png",
    )

    backbone = TextBackbone.from_pretrained(backbone_dir).freeze()
    heldout = heldout_text(heldout_docs, seed=seed + 100)
    digest = backbone.digest()
    ppl = perplexity(backbone, heldout, tokenizer)
    if progress:
        print(
            f"text backbone: {sum(p.numel() for p in backbone.parameters()):,} parameters, "
            f"held-out perplexity {ppl:.3f}, digest {digest[:16]}…"
        )
    return TextPhase(
        backbone_dir=backbone_dir,
        tokenizer=tokenizer,
        heldout=heldout,
        ppl_before=ppl,
        digest_before=digest,
        stage={
            "name": "text-backbone",
            "steps": len(losses),
            "seconds": round(seconds, 2),
            "final_loss": losses[-1],
        },
    )
