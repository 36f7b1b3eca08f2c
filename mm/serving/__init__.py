"""Serving a saved model: the OpenAI-compatible server (``mm serve``), spoken answers, the ``/demo``
page, and ``mm ask``.

* :mod:`mm.serving.limits` — :class:`ServerLimits`, the published limits (no heavy imports: ``mm
  serve --help`` prints their defaults).
* :mod:`mm.serving.protocol` — the Chat Completions protocol: requests checked against it and the
  limits (:func:`parse_chat_request`, :class:`RequestError` with its HTTP status), the media caps,
  and the response bodies and stream events.
* :mod:`mm.serving.engine` — :class:`Engine`, the worker thread that owns the model: admission,
  queue, dynamic batching, each row's deltas to its own request.
* :mod:`mm.serving.app` — :func:`create_app` (the FastAPI routes), :func:`serve` and ``mm serve``.
* :mod:`mm.serving.speech_out` — spoken answers, offline, with hibari-tts's bundled voice.
* :mod:`mm.serving.web_demo` — the ``/demo`` page.
* :mod:`mm.serving.ask` — ``mm ask``.

Importing this package loads neither torch nor FastAPI: the names of the modules that need them are
imported on first use.
"""

from __future__ import annotations

import importlib

from mm.serving.limits import ServerLimits
from mm.serving.protocol import ChatRequest, RequestError, parse_chat_request

_LAZY: dict[str, str] = {
    "Engine": "mm.serving.engine",
    "create_app": "mm.serving.app",
    "limits_from_args": "mm.serving.app",
    "run_serve": "mm.serving.app",
    "serve": "mm.serving.app",
    "BUNDLED_VOICE": "mm.serving.speech_out",
    "TTS_SAMPLE_RATE": "mm.serving.speech_out",
    "SpeechSynthesizer": "mm.serving.speech_out",
    "VoiceError": "mm.serving.speech_out",
    "bundled_voices": "mm.serving.speech_out",
    "check_voice": "mm.serving.speech_out",
    "get_synthesizer": "mm.serving.speech_out",
    "speak": "mm.serving.speech_out",
    "wav_bytes": "mm.serving.speech_out",
    "demo_page": "mm.serving.web_demo",
    "ask_messages": "mm.serving.ask",
    "run_ask": "mm.serving.ask",
}

__all__ = ["ChatRequest", "RequestError", "ServerLimits", "parse_chat_request", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mm.serving' has no attribute {name!r}")
