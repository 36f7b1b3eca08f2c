"""Model folders: mm's own (adapters plus a reference to the backbone), Hugging Face's Llama 3.2
Vision (``mllama``) layout and Meta's (``consolidated.*.pth``), both ways, and weight averaging."""

from mm.checkpoint.average import average_models
from mm.checkpoint.meta import export_meta, load_meta
from mm.checkpoint.mllama import export_mllama, load_mllama
from mm.checkpoint.native import load_multimodal, save_multimodal

__all__ = [
    "average_models",
    "export_meta",
    "export_mllama",
    "load_meta",
    "load_mllama",
    "load_multimodal",
    "save_multimodal",
]
