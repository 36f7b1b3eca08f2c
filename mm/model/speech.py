"""The speech path of the multimodal model (Llama 3 paper, section 8).

Shapes: a audio clips, F log-mel frames, F' encoder frames (40 ms), F'' adapter frames (80 ms),
b batch, s tokens, d model width.

Log-mel features go through the Conformer speech encoder and the speech adapter; the adapter's
outputs replace the runs of ``<|audio|>`` placeholders in the token embeddings (one run per clip, as
long as the adapter's output — the preprocessor emits exactly that many), so speech and text tokens
interact directly inside the frozen backbone. Nothing is added between the backbone's layers.
"""

from __future__ import annotations

import torch

from mm.adapters.speech_adapter import SpeechAdapter, splice_audio
from mm.datasets.inputs import AudioInputs
from mm.encoders.conformer import ConformerEncoder
from mm.model.config import ModelConfig

__all__ = ["build_speech_modules", "splice_speech"]


def build_speech_modules(config: ModelConfig) -> tuple[ConformerEncoder, SpeechAdapter]:
    return ConformerEncoder(config.speech.encoder), SpeechAdapter(config.speech.adapter)


def splice_speech(model, embeds: torch.Tensor, input_ids: torch.Tensor, audio: AudioInputs) -> torch.Tensor:
    """Token embeddings ``[b, s, d]`` with each ``<|audio|>`` run replaced by its clip's adapter output.

    Args:
        embeds: token embeddings ``[b, s, d]``.
        input_ids: ``[b, s]``; clip ``k`` (in reading order) fills the ``k``-th placeholder run.
        audio: the clips' log-mel features ``[a, F, 80]`` and lengths ``[a]``.
    """
    if model.speech_encoder is None:
        raise ValueError("this model has no speech encoder")
    features, lengths = audio.features, audio.frame_lengths()
    hidden, hidden_lengths = model.speech_encoder(features.to(embeds.dtype), lengths)  # [a, F', d_enc]
    out, out_lengths = model.speech_adapter(hidden, hidden_lengths)  # [a, F'', d]
    clips = [out[i, : int(n)] for i, n in enumerate(out_lengths.tolist())]
    return splice_audio(embeds, input_ids, model.config.audio_token_id, clips)
