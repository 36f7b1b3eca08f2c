"""mm: give a frozen Llama 3 text model new senses (images, video, speech) without changing it.

Subpackages: ``mm.text_backbone``, ``mm.encoders``, ``mm.adapters``, ``mm.datasets``. The
composition (:class:`MultimodalModel`) lives here. Heavy names are imported on first use, so
``import mm.text_backbone`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY: dict[str, str] = {
    "MultimodalModel": "mm.model",
    "MultimodalOutput": "mm.model",
    "ModelConfig": "mm.model.config",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mm' has no attribute {name!r}")
