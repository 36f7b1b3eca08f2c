"""``mm ask``: one question to a saved model from the command line, answered as it is decoded.

Images, videos and speech are given as files; ``--speak`` also says the answer into a WAV file
(:mod:`mm.serving.speech_out`). Generation options left out take the model's saved defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from mm.model.chat import GenerationOptions, _options, chat_stream, complete

__all__ = ["ask_messages", "run_ask"]


def ask_messages(
    question: str,
    images: Sequence[Any] = (),
    system: str | None = None,
    *,
    videos: Sequence[Any] = (),
    audios: Sequence[Any] = (),
) -> list[dict[str, Any]]:
    """The conversation ``mm ask`` sends: an optional system message, then the videos, the images,
    the question and the speech (a spoken question may stand alone: empty ``question``)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    parts = [{"type": "video", "video": v} for v in videos]
    parts += [{"type": "image", "image": im} for im in images]
    if question or not audios:
        parts.append({"type": "text", "text": question})
    parts += [{"type": "audio", "audio": a} for a in audios]
    messages.append({"role": "user", "content": parts})
    return messages


def run_ask(args: argparse.Namespace) -> int:
    """``mm ask`` (arguments: :mod:`mm.cli`)."""
    from mm.datasets._media_file import check_media_path
    from mm.model.multimodal import MultimodalModel

    try:
        given = {
            "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "seed": args.seed,
        }
        given = {k: v for k, v in given.items() if v is not None}
        given["stop"] = tuple(args.stop)
        GenerationOptions(**given)  # bad options fail before the model is read
        if not args.question and not args.audio:
            raise ValueError("give a QUESTION, or ask it aloud with --audio FILE")
        if args.speak is not None:
            from mm.serving.speech_out import get_synthesizer

            get_synthesizer()  # fail before answering if speech output cannot work
        for kind, paths in (("image", args.image), ("video", args.video), ("audio", args.audio)):
            for path in paths or ():
                check_media_path(path, kind=kind, error=ValueError)  # before the model is read
        model = MultimodalModel.from_pretrained(args.model).eval()
        options = _options(model, None, given)  # what was not given: the model's saved defaults
        messages = ask_messages(args.question, args.image, args.system, videos=args.video, audios=args.audio)
        start = time.perf_counter()
        if args.json:
            c = complete(model, messages, options=options)
            answer = c.text
            out = {
                "answer": c.text,
                "finish_reason": c.finish_reason,
                "prompt_tokens": c.prompt_tokens,
                "tokens": c.completion_tokens,
                "seconds": round(time.perf_counter() - start, 4),
            }
        else:
            pieces = []
            for piece in chat_stream(model, messages, options=options):
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            answer = "".join(pieces)
        if args.speak is not None:
            from mm.serving.speech_out import speak

            path = speak(answer, args.speak)
            if args.json:
                out["speech"] = str(path)
        if args.json:
            print(json.dumps(out, ensure_ascii=False))
    except (ValueError, OSError) as e:  # bad options, model folder, media, or a prompt too long
        print(f"mm ask: {e}", file=sys.stderr)
        return 2
    return 0
