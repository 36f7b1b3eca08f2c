"""Rejection sampling (``mm sample``): N answers per prompt, scored, the best kept as new training data.

Llama 3 paper, section 7.2.2: for each prompt the model samples several answers, a reward model (or,
here, also a metric against the reference answer) scores them, and the best becomes an SFT sample; the
best and the worst may also become a preference sample for DPO (section 7.2.3).

Prompts come from an mm shard folder (read with :func:`mm.datasets.webdata.read_shard`, shards in
sorted order, samples in file order): a sample whose messages end with an assistant turn gives the
prompt (the turns before it) and its reference answer (the text of that turn); a sample ending with a
user turn is a prompt without a reference (scoring by a metric refuses it).

Generation uses the model's continuous batching (:class:`mm.model.batching.DecodeBatch`): up to
``batch_size`` answers decode together, each with a generator seeded from ``(seed, sample key, answer
index)`` alone (:func:`answer_seed`), so the answers depend neither on the batch size nor on where a run
was interrupted (tested).

``OUT`` holds

* ``progress.jsonl``: a ``{"settings": ...}`` line, then one line per finished prompt ``{"index",
  "key", "answers", "scores"}``, appended and ``fsync``-ed after every group of prompts scored
  together; ``--resume`` continues after the prompts it lists (a torn last line is dropped);
* ``sft/``: shards of SFT samples (the prompt + the best answer), written by
  :func:`mm.datasets.shards.pack` from a manifest and media staged in ``OUT/.sample-staging``;
* ``pairs/`` (with ``pairs``): preference samples ``{"messages", "chosen": best, "rejected": worst}``;
  prompts whose answers all score the same are skipped and counted;
* ``sample.json``, written last: ``prompts``, ``sft`` and ``pairs`` (samples written),
  ``skipped_blank`` (prompts whose answers were all blank), ``skipped_tied`` (pairs not written: all
  answers scored the same), ``mean_best`` and ``mean_first`` (mean score of the kept answer and of
  answer 0, over the prompts kept) and ``settings``. A folder with it holds a finished result, which a
  new run replaces only with ``overwrite``.

Reward scores are computed one prompt at a time (its ``n`` answers in one ``score_batch`` call), so they
too are independent of ``batch_size`` and of resuming, and the shards come out byte-identical.

Scores are "higher is better": a metric that is lower-is-better (``wer``) is negated. Ties go to the
first answer. Blank answers are never kept (they would not pack); a prompt with only blank answers is
skipped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mm._io import atomic_write_json

__all__ = [
    "METRICS",
    "Prompt",
    "RejectionError",
    "answer_seed",
    "read_prompts",
    "rejection_sample",
    "run_sample",
]

#: Metrics against the reference answer (mm.eval's functions; ``wer`` negated so higher is better).
METRICS = ("exact", "vqa", "anls", "relaxed", "wer", "bleu")
PROGRESS = "progress.jsonl"
SUMMARY = "sample.json"
STAGING = ".sample-staging"


class RejectionError(ValueError):
    """Input or an output folder that rejection sampling refuses (the message names the file and key)."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of the shards.

    Attributes:
        index: its place among all samples of the shards (sorted shards, file order).
        key: the sample's key.
        where: ``shard key KEY``, for messages.
        messages: the prompt (ending with a user turn); media parts name fields of ``media``.
        media: field -> the member's bytes.
        reference: the reference answer's text, or None.
    """

    index: int
    key: str
    where: str
    messages: list[dict[str, Any]]
    media: dict[str, bytes]
    reference: str | None


def answer_seed(seed: int, key: str, index: int) -> int:
    """The seed of answer ``index`` to prompt ``key``: a 63-bit hash of the three, the same everywhere."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def read_prompts(shards: str | os.PathLike | Sequence[str]) -> Iterator[Prompt]:
    """Every sample of ``shards`` as a :class:`Prompt`, in order.

    Raises:
        RejectionError: no shards, a corrupt shard or sample, or a sample whose prompt does not end with
            a user turn (each named by shard and key).
    """
    from mm.datasets.shards import SampleError
    from mm.datasets.webdata import DataCounters, expand_shards, normalize_sample, read_shard

    try:
        urls = expand_shards(shards)
    except (FileNotFoundError, ValueError) as e:
        raise RejectionError(f"{shards}: {e}") from None
    index = 0
    for url in urls:
        counters = DataCounters()
        for key, fields, problem in read_shard(url, counters):
            where = f"{url} key {key!r}"
            if problem is not None:
                raise RejectionError(f"{where}: {problem}")
            try:
                messages, media, _ = normalize_sample(fields)
            except SampleError as e:
                raise RejectionError(f"{where}: {e}") from None
            reference = None
            if messages[-1].get("role") == "assistant":
                reference = _text(messages[-1]["content"]).strip() or None
                messages = messages[:-1]
            if not messages or messages[-1].get("role") != "user":
                raise RejectionError(f"{where}: the prompt must end with a user turn")
            yield Prompt(index, key, where, messages, media, reference)
            index += 1
        if counters.bad_shards:
            raise RejectionError(f"{url}: unreadable or cut short ({counters.examples['unreadable shard']})")


# ------------------------------------------------------------------------------------------ scoring
def _metric(name: str) -> Callable[[str, str], float]:
    """``(answer, reference) -> score``, higher is better."""
    from mm.eval.anls import anls
    from mm.eval.chartqa import relaxed_correctness
    from mm.eval.speech import sample_wer, sentence_bleu
    from mm.eval.vqa import normalize_vqa_answer

    table: dict[str, Callable[[str, str], float]] = {
        "exact": lambda a, r: float(a.strip() == r.strip()),
        # VQA accuracy with the one reference standing for every human: normalised exact match.
        "vqa": lambda a, r: float(normalize_vqa_answer(a) == normalize_vqa_answer(r)),
        "anls": lambda a, r: anls(a.strip(), [r]),
        "relaxed": lambda a, r: relaxed_correctness(a.strip(), r.strip()),
        "wer": lambda a, r: -sample_wer(a, r),
        "bleu": lambda a, r: sentence_bleu(a, r),
    }
    return table[name]


def _with_bytes(prompt: Prompt) -> list[dict[str, Any]]:
    """The prompt's messages with media field names replaced by the members' bytes (as training does)."""
    from mm.training.data import _resolve_media

    return _resolve_media({"messages": prompt.messages, "media": prompt.media})


def _score(
    prompts: Sequence[Prompt], answers: Sequence[list[str]], reward_model, metric: str | None
) -> list[list[float]]:
    if metric is not None:
        fn = _metric(metric)
        return [[float(fn(a, p.reference)) for a in ans] for p, ans in zip(prompts, answers)]
    # One reward batch per prompt (its N answers): the scores, like the answers, then depend neither on
    # the batch size nor on which prompts happened to finish together.
    out = []
    for p, ans in zip(prompts, answers):
        prompt = _with_bytes(p)
        conversations = [[*prompt, {"role": "assistant", "content": a}] for a in ans]
        out.append([float(s) for s in reward_model.score_batch(conversations)])
    return out


def _pick(answers: Sequence[str], scores: Sequence[float]) -> tuple[int, int] | None:
    """``(best, worst)`` among the non-blank answers (ties: the first), or None when all are blank."""
    usable = [j for j, a in enumerate(answers) if a.strip()]
    if not usable:
        return None
    best = max(usable, key=lambda j: (scores[j], -j))
    worst = min(usable, key=lambda j: (scores[j], j))
    return best, worst


# --------------------------------------------------------------------------------------- generation
def _generate(
    model, prompts: Sequence[Prompt], n: int, options: Mapping[str, Any], seed: int, batch_size: int
) -> Iterator[list[tuple[Prompt, list[str]]]]:
    """Decode ``n`` answers per prompt, ``batch_size`` rows together; yield the prompts finished at each
    step with their answers (in answer order)."""
    from mm.model.chat import GenerationOptions, JoinError, decode_queue, encode_conversation

    texts: dict[tuple[int, int], str] = {}
    left = {i: n for i in range(len(prompts))}
    encoded: dict[int, Any] = {}

    def sample_for(key: tuple[int, int]):
        i = key[0]
        if i not in encoded:
            try:
                encoded[i] = encode_conversation(model, _with_bytes(prompts[i]))
            except ValueError as e:
                raise RejectionError(f"{prompts[i].where}: {e}") from None
        return encoded[i]

    rows = [(i, j) for i in range(len(prompts)) for j in range(n)]
    try:
        for done in decode_queue(
            model,
            rows,
            batch_size=batch_size,
            sample_for=sample_for,
            options_for=lambda key: GenerationOptions(
                **options, seed=answer_seed(seed, prompts[key[0]].key, key[1])
            ),
        ):
            finished = []
            for (i, j), text in done:
                texts[(i, j)] = text
                left[i] -= 1
                if left[i] == 0:
                    encoded.pop(i, None)
                    finished.append((prompts[i], [texts.pop((i, k)) for k in range(n)]))
            if finished:
                yield finished
    except JoinError as e:
        raise RejectionError(f"{prompts[e.keys[0][0]].where}: {e}") from None


# ------------------------------------------------------------------------------------------ progress
def _read_progress(path: Path, settings: Mapping[str, Any]) -> dict[int, dict[str, Any]]:
    """The finished prompts a progress file lists; a torn last line (an interrupted write) is cut off."""
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):
        raw = raw[: raw.rfind(b"\n") + 1]
        with open(path, "r+b") as f:
            f.truncate(len(raw))
    lines = raw.decode("utf-8").splitlines()
    try:
        saved = json.loads(lines[0])["settings"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        raise RejectionError(f"{path}:1: not a progress file of mm sample") from None
    if saved != dict(settings):
        differ = sorted(k for k in {*(saved or {}), *settings} if (saved or {}).get(k) != settings.get(k))
        raise RejectionError(f"{path}: saved with other settings ({', '.join(differ)}); use --overwrite")
    done = {}
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            done[int(row["index"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise RejectionError(f"{path}:{number}: not a progress line") from None
    return done


def _append(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    with open(path, "ab") as f:
        f.write(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


# -------------------------------------------------------------------------------------------- output
def _stage_media(prompt: Prompt, staging: Path) -> list[dict[str, Any]]:
    """The prompt's messages with media parts naming copies of the members under ``staging/media``."""
    from mm.datasets.shards import check_messages, rewrite_media

    folder = f"media/{prompt.index:09d}"
    mapping = {}
    for kind, ref in check_messages(prompt.messages):
        name = ref.lower()
        # A folder sample's member is named by its extension alone ("png"): keep a name.
        staged = name if "." in name else f"{kind}.{name}"
        target = staging / folder / staged
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(prompt.media[name])
        mapping[ref] = f"{folder}/{staged}"
    return rewrite_media(prompt.messages, mapping)


def _write_output(out: Path, prompts: Sequence[Prompt], done: Mapping[int, Mapping], pairs: bool) -> dict:
    from mm.datasets.shards import pack

    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    counts = {"sft": 0, "pairs": 0, "skipped_blank": 0, "skipped_tied": 0}
    best_scores, first_scores = [], []
    written: list[Path] = []
    try:
        with (
            open(staging / "sft.jsonl", "w", encoding="utf-8") as sft,
            open(staging / "pairs.jsonl", "w", encoding="utf-8") as prefs,
        ):
            for prompt in prompts:
                row = done[prompt.index]
                picked = _pick(row["answers"], row["scores"])
                if picked is None:
                    counts["skipped_blank"] += 1
                    continue
                best, worst = picked
                scores = row["scores"]
                best_scores.append(scores[best])
                first_scores.append(scores[0])
                messages = _stage_media(prompt, staging)
                meta = {"score": scores[best], "answer": best, "n": len(scores)}
                answer = {"role": "assistant", "content": row["answers"][best]}
                sft.write(
                    json.dumps({"key": prompt.key, "messages": [*messages, answer], "meta": meta}) + "\n"
                )
                counts["sft"] += 1
                if pairs:
                    chosen, rejected = row["answers"][best], row["answers"][worst]
                    if scores[best] == scores[worst] or chosen == rejected:
                        counts["skipped_tied"] += 1
                        continue
                    pair = {"key": prompt.key, "messages": messages, "chosen": chosen, "rejected": rejected}
                    prefs.write(json.dumps(pair) + "\n")
                    counts["pairs"] += 1
        for name, n in (("sft", counts["sft"]), ("pairs", counts["pairs"] if pairs else 0)):
            if n:
                pack(staging / f"{name}.jsonl", out / name, overwrite=True)
                written.append(out / name)
    except BaseException:
        for path in written:
            shutil.rmtree(path, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    counts["mean_best"] = sum(best_scores) / len(best_scores) if best_scores else None
    counts["mean_first"] = sum(first_scores) / len(first_scores) if first_scores else None
    return counts


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a finished or unfinished earlier run unless told; with ``overwrite`` remove it."""
    finished = (out / SUMMARY).exists()
    started = (out / PROGRESS).exists()
    if overwrite:
        for name in (SUMMARY, PROGRESS):
            (out / name).unlink(missing_ok=True)
        for name in ("sft", "pairs", STAGING):
            shutil.rmtree(out / name, ignore_errors=True)
    elif finished:
        raise RejectionError(f"{out} holds a finished result ({SUMMARY}); pass --overwrite to replace it")
    elif started and not resume:
        raise RejectionError(f"{out} holds an unfinished run ({PROGRESS}); pass --resume or --overwrite")


def rejection_sample(
    model,
    shards: str | os.PathLike | Sequence[str],
    out: str | os.PathLike,
    *,
    n: int,
    temperature: float,
    top_p: float,
    seed: int,
    reward_model=None,
    metric: str | None = None,
    pairs: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    progress: bool = True,
    resume: bool = False,
    overwrite: bool = False,
    on_saved: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Sample ``n`` answers per prompt, score them, keep the best; write shards for SFT (and DPO).

    Args:
        model: the policy, a :class:`~mm.MultimodalModel` with a preprocessor, in eval mode.
        shards: the prompts' shard folder (or paths / patterns, :func:`~mm.datasets.webdata.expand_shards`).
        out: the output folder (module docstring).
        n: answers per prompt (at least 1).
        temperature: sampling temperature (> 0 for distinct answers).
        top_p: nucleus mass in ``(0, 1]``.
        seed: with the sample key and answer index, seeds each answer (:func:`answer_seed`).
        reward_model: a model with ``score_batch(list_of_messages) -> list[float]`` (messages end with
            the answer), or None.
        metric: one of :data:`METRICS`, scored against each prompt's reference, or None (exactly one of
            ``reward_model`` and ``metric``).
        pairs: also write preference samples (best as chosen, worst as rejected) into ``out/pairs``.
        batch_size: answers decoding together (a reward batch is one prompt's ``n`` answers).
        max_new_tokens: answer length limit.
        progress: show a progress bar.
        resume: continue an unfinished run in ``out``.
        overwrite: replace an earlier run in ``out``.
        on_saved: called with the number of finished prompts after each save of the progress file.

    Returns:
        The summary written to ``out/sample.json``.

    Raises:
        RejectionError: bad settings or input (no samples, no reference for a metric, duplicate keys, a
            prompt too long...) before anything is written to ``out``, or an earlier run in ``out``.
    """
    from tqdm.auto import tqdm

    for name, value in (("n", n), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise RejectionError(f"{name} must be an integer of at least 1, got {value!r}")
    if not temperature >= 0:
        raise RejectionError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise RejectionError(f"top_p must be in (0, 1], got {top_p!r}")
    if (reward_model is None) == (metric is None):
        raise RejectionError("score with exactly one of a reward model and a metric")
    if metric is not None and metric not in METRICS:
        raise RejectionError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if reward_model is not None and not callable(getattr(reward_model, "score_batch", None)):
        raise RejectionError("the reward model has no score_batch (its config needs a reward head)")
    out = Path(out)
    prompts = list(read_prompts(shards))
    if not prompts:
        raise RejectionError(f"{shards}: no samples")
    seen: dict[str, str] = {}
    for p in prompts:
        if p.key in seen:
            raise RejectionError(f"{p.where}: key {p.key!r} is also used by {seen[p.key]}")
        seen[p.key] = p.where
        if metric is not None and p.reference is None:
            raise RejectionError(
                f"{p.where}: no reference answer (the sample ends with a user turn); metric {metric!r} needs one"
            )
    settings = {
        "n": n,
        "temperature": temperature,
        "top_p": top_p,
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "scorer": f"metric:{metric}" if metric else "reward model",
        "pairs": pairs,
    }
    _prepare_out(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROGRESS
    done = _read_progress(path, settings) if path.exists() else {}
    for index, row in done.items():
        if index >= len(prompts) or prompts[index].key != row.get("key"):
            raise RejectionError(
                f"{path}: prompt {index} is not {row.get('key')!r} in {shards}; use --overwrite"
            )
    if not path.exists():
        _append(path, [{"settings": settings}])
    todo = [p for p in prompts if p.index not in done]
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
    with tqdm(
        total=len(prompts), initial=len(done), desc="sample", unit="prompt", disable=not progress
    ) as bar:
        for finished in _generate(model, todo, n, options, seed, batch_size):
            group = [p for p, _ in finished]
            answers = [a for _, a in finished]
            scores = _score(group, answers, reward_model, metric)
            rows = [
                {"index": p.index, "key": p.key, "answers": a, "scores": s}
                for p, a, s in zip(group, answers, scores)
            ]
            _append(path, rows)
            done.update((r["index"], r) for r in rows)
            bar.update(len(rows))
            if on_saved is not None:
                on_saved(len(done))
    counts = _write_output(out, prompts, done, pairs)
    summary = {
        "prompts": len(prompts),
        **counts,
        "settings": {**settings, "batch_size": batch_size, "shards": str(shards)},
    }
    atomic_write_json(out / SUMMARY, summary)
    return summary


def _load(path: str, device: str | None):
    import torch

    from mm.model import MultimodalModel

    model = MultimodalModel.from_pretrained(path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def run_sample(args: argparse.Namespace) -> int:
    """``mm sample`` (arguments: :mod:`mm.cli`)."""
    try:
        model = _load(args.model, args.device)
        reward = None if args.reward is None else _load(args.reward, args.device)
        summary = rejection_sample(
            model,
            args.shards,
            args.out,
            n=args.n,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            reward_model=reward,
            metric=args.metric,
            pairs=args.pairs,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            progress=not args.no_progress,
            resume=args.resume,
            overwrite=args.overwrite,
        )
    except (ValueError, OSError) as e:
        print(f"mm sample: {e}", file=sys.stderr)
        return 2
    print(
        f"{summary['prompts']} prompts: {summary['sft']} SFT samples, {summary['pairs']} pairs "
        f"(skipped: {summary['skipped_blank']} blank, {summary['skipped_tied']} tied) -> {args.out}"
    )
    return 0
