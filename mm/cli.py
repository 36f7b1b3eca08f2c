"""The ``mm`` command: argument parsing only.

Each subcommand's work lives in its package and is imported when that subcommand runs, so
``mm --help`` (and any parse error) loads neither torch nor the model code: the few defaults shown
here come from small modules (:mod:`mm.serving.limits`, :mod:`mm.bench.workload`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

__all__ = ["build_parser", "main"]


def _command(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """The function ``module.function``, imported when the command runs."""

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), function)(args)

    run.__qualname__ = f"{module}.{function}"
    return run


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


# ---------------------------------------------------------------------------------------- commands
def _demo(sub) -> None:
    p = sub.add_parser("demo", help="the whole recipe in miniature: train a text model, then teach it to see")
    p.add_argument("--out", default="mm-demo", help="output folder (default: mm-demo)")
    p.add_argument(
        "--quick", action="store_true", help="fewer steps and samples (about 5 minutes on 2 cores)"
    )
    p.add_argument("--seed", type=int, default=0)
    requirements = (
        ("--require-accuracy", "A", "the held-out image QA accuracy reaches A (for CI)"),
        ("--require-video-accuracy", "A", "the held-out video QA accuracy reaches A (for CI; chance 0.25)"),
        (
            "--require-speech-qa-accuracy",
            "A",
            "with --speech: the held-out spoken QA accuracy reaches A (for CI)",
        ),
        (
            "--require-speech-wer",
            "W",
            "with --speech: the held-out recognition word error rate is at most W (for CI)",
        ),
        (
            "--require-speech-bleu",
            "B",
            "with --speech: the held-out speech translation BLEU (0-100) reaches B (for CI)",
        ),
        (
            "--require-reward-accuracy",
            "A",
            "the reward model ranks A of the held-out pairs right (chance 0.5)",
        ),
        (
            "--require-preference-rate",
            "A",
            "after DPO, the policy prefers the chosen answer of A of the held-out pairs",
        ),
        ("--require-preference-gain", "G", "DPO raises that preference rate by at least G"),
        (
            "--require-rejection-accuracy",
            "A",
            "the reward model's pick among sampled answers is right on A of the questions",
        ),
        ("--require-rejection-gain", "G", "that accuracy is at least G above the greedy answers'"),
        ("--require-dpo-qa-drop", "D", "image QA accuracy after DPO is at most D below before it"),
    )
    for flag, metavar, what in requirements:
        p.add_argument(flag, type=float, default=None, metavar=metavar, help=f"exit non-zero unless {what}")
    p.add_argument("--no-video", action="store_true", help="skip the video stage")
    p.add_argument(
        "--no-posttrain",
        action="store_true",
        help="skip the post-training phase (reward model, DPO, rejection sampling on the image model)",
    )
    p.add_argument(
        "--speech",
        action="store_true",
        help=(
            "also run the speech stages on speech synthesised offline (experimental; about 12 minutes "
            "more with --quick, as the text model then also learns to repeat and translate text, which "
            "recognition and translation through it need; see the report)"
        ),
    )
    p.set_defaults(func=_command("mm.demo.run", "run_demo_command"))


def _ask(sub) -> None:
    p = sub.add_parser(
        "ask",
        help="answer a question about images, videos or speech with a saved model",
        description=(
            "Ask a saved mm model (or a Llama 3.2 Vision folder) a question, optionally about images "
            "and videos, or ask it aloud (--audio); the answer streams to stdout, and --speak also "
            "says it into a WAV file."
        ),
    )
    p.add_argument(
        "--model", required=True, help="folder written by save_pretrained (e.g. mm demo's OUT/model)"
    )
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image (repeatable)")
    p.add_argument(
        "--video",
        action="append",
        default=[],
        metavar="FILE",
        help="a video: mp4, webm, mkv or mov (repeatable; shown before the images)",
    )
    p.add_argument(
        "--audio",
        action="append",
        default=[],
        metavar="FILE",
        help="speech: wav, flac, mp3, ogg, webm or m4a (repeatable; a spoken question needs no QUESTION)",
    )
    p.add_argument(
        "--speak",
        default=None,
        metavar="OUT.wav",
        help="also say the answer into this WAV file (24 kHz, offline, hibari-tts's bundled voice)",
    )
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="default: the model's saved default, else 256"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 is greedy; default: the model's saved default, else 0",
    )
    p.add_argument("--top-p", type=float, default=None, help="default: the model's saved default, else 1")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("question", nargs="?", default="", help="the question (optional with --audio)")
    p.set_defaults(func=_command("mm.serving.ask", "run_ask"))


def _serve(sub) -> None:
    from mm.serving.limits import ServerLimits

    d = ServerLimits()
    p = sub.add_parser(
        "serve",
        help="serve a saved model over the OpenAI Chat Completions protocol",
        description=(
            "Serve a saved mm model: POST /v1/chat/completions, GET /v1/models, GET /health, and a "
            "page to ask aloud at GET /demo."
        ),
    )
    p.add_argument(
        "--model", required=True, help="folder written by save_pretrained (e.g. mm demo's OUT/model)"
    )
    p.add_argument("--model-id", default=None, help="the id clients name (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--no-warm-up",
        action="store_true",
        help="take requests at once, without first answering a short one of each input the model reads "
        "(then the first request pays for what a process builds once)",
    )
    p.add_argument(
        "--allow-media-domain",
        action="append",
        default=[],
        metavar="HOST",
        help="fetch http(s) image URLs from this exact host (repeatable); data: URIs are always accepted",
    )
    limits = p.add_argument_group("limits (past one a request gets 400, 413 or 429 naming it)")
    for flag, value, what in (
        ("--max-image-pixels", d.max_image_pixels, "per image"),
        ("--max-images", d.max_images, "per request"),
        ("--max-videos", d.max_videos, "per request"),
        ("--max-audios", d.max_audios, "audio clips per request"),
        ("--max-request-bytes", d.max_request_bytes, "per request body"),
        ("--max-media-bytes", d.max_media_bytes, "per encoded image or video"),
        ("--max-tokens", d.max_tokens, "new tokens per request"),
        ("--max-concurrent-requests", d.max_concurrent_requests, "in flight"),
        ("--max-batch-size", d.max_batch_size, "decoded together"),
    ):
        limits.add_argument(flag, type=int, default=value, help=f"{what} (%(default)s)")
    limits.add_argument(
        "--media-timeout",
        type=float,
        default=d.media_timeout_s,
        help="seconds per image download (%(default)s)",
    )
    limits.add_argument(
        "--request-timeout",
        type=float,
        default=d.request_timeout_s,
        help="seconds a client has to send a request's headers and body; then 408 (%(default)s)",
    )
    limits.add_argument(
        "--max-join-wait",
        type=float,
        default=d.max_join_wait_s,
        help="seconds a ready request may wait for others still arriving or being prepared, to be "
        "prefilled with them; 0: never (%(default)s)",
    )
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=_command("mm.serving.app", "run_serve"))


def _bench(sub) -> None:
    from mm.bench.workload import SIZES

    p = sub.add_parser("bench", help="benchmark mm against Hugging Face's Llama 3.2 Vision")
    p.add_argument("--size", choices=sorted(SIZES), default="small", help="model and workload size")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=_positive, help="rounds of one process per implementation and figure")
    p.add_argument("--steps", type=_positive, help="timed train steps per process (after a warm-up step)")
    p.add_argument("--runs", type=_positive, help="timed generations per decode process")
    p.add_argument("--figures", default="train,decode", help="comma-separated subset of train,decode,serve")
    p.add_argument(
        "--serve",
        action="store_true",
        help="also measure mm serve: aggregate tokens/s and time to first token at 1, 4, 8, 16 clients",
    )
    p.add_argument("--threads", type=_positive, help="torch threads in every worker (default: torch's)")
    p.add_argument("--timeout", type=float, help="seconds allowed to each worker process")
    p.add_argument(
        "--workdir",
        help="where to write the checkpoint (default: a temporary folder); one an earlier run finished "
        "there for the same size and dtype is reused",
    )
    p.add_argument("--out", help="write the results JSON here (default: mm-bench-SIZE-DEVICE-DTYPE.json)")
    p.set_defaults(func=_command("mm.bench.run", "run_bench_command"))


def _info(sub) -> None:
    p = sub.add_parser("info", help="components of a preset with parameter counts and memory")
    p.add_argument("--preset", required=True, help="e.g. llama3.1-8b, llama3.2-11b-vision, llama3-405b, tiny")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_command("mm.model.info", "run_info"))


def _train(sub) -> None:
    p = sub.add_parser("train", help="run the stages of a recipe (YAML file or shipped name)")
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped one (e.g. tiny-demo)")
    p.add_argument("--stage", action="append", default=[], help="run only this stage (repeatable)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue each stage from its latest checkpoint (which must belong to the same run: same stage "
        "settings, seed and starting model)",
    )
    p.add_argument(
        "--replace",
        action="store_true",
        help="discard what an earlier run left in the stages' folders (checkpoints, model, metrics) and start "
        "over; without it a stage folder holding checkpoints is an error",
    )
    p.add_argument("--output-dir", help="where stages write (default: the recipe's output_dir)")
    p.add_argument(
        "--var", action="append", default=[], metavar="NAME=VALUE", help="replace ${NAME} in recipe paths"
    )
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP on several processes")
    p.set_defaults(func=_command("mm.training.commands", "run_train"))


def _data(sub) -> None:
    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="DATA_COMMAND")
    q = data_sub.add_parser(
        "pack",
        help="write webdataset shards from a folder, a JSONL manifest or a published dataset layout",
        description=(
            "Without --from, SRC is a folder of files grouped by key or a JSONL manifest. With --from FORMAT, "
            "SRC is a published layout: llava (LLaVA conversation .json/.jsonl), sharegpt (messages + images), "
            "hf (Hugging Face datasets saved locally: save_to_disk folder, .parquet or .arrow, read offline), "
            "video-qa (LLaVA-Video / Video-ChatGPT .json), librispeech (folder of *.trans.txt + .flac), "
            "commonvoice (language folder with SPLIT.tsv + clips/), covost (CoVoST 2 .tsv over Common Voice "
            "clips), wds (img2dataset webdataset .tar shards). Every sample is checked as a pack checks it; "
            "a bad record is named by file and record / line / row and nothing is written."
        ),
    )
    q.add_argument(
        "src", help="a folder of files or a .jsonl manifest; with --from, the dataset file or folder"
    )
    q.add_argument("out", help="output folder for shard-NNNNNN.tar and manifest.json")
    q.add_argument("--shard-size", default="64MB", help="target shard size (e.g. 64MB, 1GiB)")
    q.add_argument("--overwrite", action="store_true", help="replace an earlier pack in OUT")
    q.add_argument(
        "--allow-outside-source",
        action="store_true",
        help="read files outside SRC (the manifest's folder): links leading out, absolute and '..' paths",
    )
    q.add_argument(
        "--from",
        dest="from_format",
        metavar="FORMAT",
        choices=("llava", "sharegpt", "hf", "video-qa", "librispeech", "commonvoice", "covost", "wds"),
        help="read SRC as a published layout: llava, sharegpt, hf, video-qa, librispeech, commonvoice, covost, wds",
    )
    q.add_argument(
        "--media-root",
        metavar="DIR",
        help="llava, sharegpt, video-qa: the folder media paths are relative to (default: SRC's folder); "
        "covost: the Common Voice clips folder (default: clips/ beside the TSV)",
    )
    q.add_argument("--split", help="hf, commonvoice, covost: the split to read (default: train)")
    q.add_argument(
        "--column",
        action="append",
        default=[],
        metavar="ROLE=COLUMN",
        help="hf: the column for a role (messages, images, question, answer, audio, text); repeatable",
    )
    q.add_argument(
        "--prompt",
        help="librispeech, commonvoice, hf speech: the user prompt (default 'Repeat after me in English.'); "
        "covost: default 'Translate the following sentence into LANGUAGE.'; wds: default 'Describe the image.'",
    )
    q.set_defaults(func=_command("mm.training.commands", "run_pack"))

    q = data_sub.add_parser(
        "cache-features",
        help="run the frozen image encoder once over video shards and store the frame tokens",
        description=(
            "Write shards in which every video is replaced by its frame tokens (image encoder + "
            "projector output, one safetensors member per video) so a video stage trains without "
            "decoding or encoding pixels. The trainer refuses features made by another encoder or "
            "with other frame settings."
        ),
    )
    q.add_argument("model", help="the mm model folder the video stage starts from")
    q.add_argument("src", help="video shards: a folder, a pattern (shard-{000..009}.tar) or a URL")
    q.add_argument("out", help="output folder for the cached shards and manifest.json")
    q.add_argument(
        "--num-frames", type=int, default=None, help="frames per clip (default: the model's, else 16)"
    )
    q.add_argument("--batch-size", type=int, default=8, help="videos encoded at once (default: 8)")
    q.add_argument(
        "--device", default=None, help="where the encoder runs (default: cuda if available, else cpu)"
    )
    q.add_argument(
        "--dtype",
        choices=("bfloat16", "float16", "float32"),
        default=None,
        help="storage dtype of the tokens (default: the model's, which reproduces the pixel path exactly)",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an earlier cache in OUT")
    q.set_defaults(func=_command("mm.training.cache_features", "run_cache_features"))


def _average(sub) -> None:
    p = sub.add_parser("average", help="average the weights of trained models (model soup)")
    p.add_argument("models", nargs="+", help="mm model folders on the same backbone")
    p.add_argument("--out", required=True, help="folder for the averaged model")
    p.set_defaults(func=_command("mm.checkpoint.average", "run_average"))


def _sample(sub) -> None:
    p = sub.add_parser(
        "sample",
        help="rejection sampling: N answers per prompt, scored, the best kept as SFT (and DPO) shards",
        description=(
            "For each sample of a shard folder (its last assistant turn, if any, is the reference answer), "
            "sample N answers, score them with a reward model or a metric against the reference, and write "
            "OUT/sft (prompt + best answer) and with --pairs OUT/pairs (best as chosen, worst as rejected) as "
            "shards, plus OUT/sample.json. Each answer is seeded from (seed, key, answer index): the same "
            "answers at any batch size and when resumed."
        ),
    )
    p.add_argument(
        "model", help="the policy: a folder written by save_pretrained or a Llama 3.2 Vision folder"
    )
    p.add_argument("shards", help="folder of .tar shards holding the prompts")
    p.add_argument("out", help="output folder (progress.jsonl, sft/, pairs/, sample.json)")
    p.add_argument("--n", type=_positive, default=4, help="answers per prompt (default: 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default: 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default: 0.9)")
    p.add_argument("--seed", type=int, default=0, help="with each key and answer index, seeds the answers")
    scorer = p.add_mutually_exclusive_group(required=True)
    scorer.add_argument("--reward", metavar="MODEL", default=None, help="score with this reward model's head")
    scorer.add_argument(
        "--metric",
        choices=("exact", "vqa", "anls", "relaxed", "wer", "bleu"),
        default=None,
        help="score against each prompt's reference answer with this metric",
    )
    p.add_argument("--pairs", action="store_true", help="also write preference samples (best vs worst)")
    p.add_argument("--batch-size", type=_positive, default=8, help="answers decoding together (default: 8)")
    p.add_argument("--max-new-tokens", type=_positive, default=256, help="answer length limit (default: 256)")
    p.add_argument("--resume", action="store_true", help="continue an unfinished run in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in OUT")
    p.add_argument(
        "--device", default=None, help="where the models run (default: cuda if available, else cpu)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_command("mm.training.rejection", "run_sample"))


def _eval(sub) -> None:
    from mm.eval.tasks import TASK_NAMES

    p = sub.add_parser(
        "eval",
        help="answer a benchmark from its published files and score it with its official metric",
        description=(
            "Answer a benchmark read from its published files (nothing is downloaded) with a saved model, "
            "greedily and in batches, and score it with the benchmark's official metric. Writes "
            "OUT/eval.json ({task, score, metric, n, samples: [{id, prediction, score}]}) and OUT/eval.md. "
            "Tasks and layouts: vqav2 (questions JSON or folder; --answers ANNOTATIONS), textvqa "
            "(TextVQA_0.5.1_val.json), docvqa (val_v1.0.json), chartqa (test_human.json + png/), mcq "
            "(MMMU / AI2D parquet), video-mcq (Video-MME / PerceptionTest JSON), video-qa (open-ended, "
            "ActivityNet-QA / MSRVTT-QA style JSON + videos/), asr (a LibriSpeech split folder), ast (a "
            "CoVoST 2 TSV + clips/), speech-qa (spoken questions, AudioBench / VoiceBench style JSON or "
            "JSONL + audio), text (lm-eval style multiple-choice JSONL; "
            "also checks that text prompts give the backbone's log-likelihoods and answers exactly)."
        ),
    )
    p.add_argument("model", help="folder written by save_pretrained, or a Llama 3.2 Vision folder")
    p.add_argument("task", choices=TASK_NAMES, help="the benchmark's kind")
    p.add_argument("data", help="the benchmark's file or folder, in its published layout")
    p.add_argument("--out", required=True, help="folder for eval.json and eval.md")
    p.add_argument("--batch-size", type=_positive, default=8, help="samples decoding together (default: 8)")
    p.add_argument("--limit", type=_positive, default=None, help="score only the first N samples")
    p.add_argument(
        "--max-new-tokens",
        type=_positive,
        default=None,
        help="answer length limit (default: the task's: 16 for VQA/ChartQA/video-qa, 32 for DocVQA, "
        "choices and speech-qa, 256 for asr/ast, 32 for the text regression's answers)",
    )
    p.add_argument(
        "--answers",
        default=None,
        metavar="FILE",
        help="vqav2: the annotations file (default: found beside DATA)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="vqav2: the split of a folder (val2014); asr: LibriSpeech split folder (test-clean); mcq: "
        "parquet files NAME-*.parquet (validation); ast: rows of the TSV's split column",
    )
    p.add_argument(
        "--media",
        default=None,
        metavar="DIR",
        help="folder of the images, videos or clips (default: the format's usual place beside DATA)",
    )
    p.add_argument(
        "--prompt",
        default=None,
        help="the instruction instead of the task's default (asr: 'Repeat after me in English.', ast: "
        "'Translate the following sentence into English.', video-qa: 'Answer the question using a "
        "single word or phrase.' ('' asks the question alone), speech-qa: none, the audio alone; see "
        "the README)",
    )
    p.add_argument(
        "--device", default=None, help="where the model runs (default: cuda if available, else cpu)"
    )
    p.add_argument(
        "--dtype", choices=("bfloat16", "float16", "float32"), default=None, help="default: the saved dtype"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_command("mm.eval.run", "run_eval"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mm",
        description="Give a frozen Llama 3 text model new senses without changing a single weight of it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_demo, _ask, _serve, _bench, _info, _train, _data, _average, _sample, _eval):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
