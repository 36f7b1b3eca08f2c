"""Published Llama 3 text model sizes, plus ``tiny`` for tests and the demo.

Sizes are those of Meta's released ``config.json`` / ``params.json`` files. Parameter counts
(shared tied embeddings counted once): 1.236B, 3.213B, 8.030B, 70.554B, 405.853B.
"""

from __future__ import annotations

from mm.text_backbone.config import RopeScaling, TextConfig

__all__ = ["TEXT_PRESETS"]

_LLAMA3_VOCAB = 128256
_BOS = 128000
_EOS = (128001, 128008, 128009)  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
_ROPE_31 = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)
_ROPE_32 = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_seq_len=8192)


def _llama3(**sizes) -> TextConfig:
    defaults = dict(
        vocab_size=_LLAMA3_VOCAB,
        norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=_ROPE_31,
        max_seq_len=131072,
        bos_token_id=_BOS,
        eos_token_ids=_EOS,
    )
    defaults.update(sizes)
    return TextConfig(**defaults)


TEXT_PRESETS: dict[str, TextConfig] = {
    "llama3.2-1b": _llama3(
        embed_dim=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        intermediate_dim=8192,
        rope_scaling=_ROPE_32,
        tie_embeddings=True,
    ),
    "llama3.2-3b": _llama3(
        embed_dim=3072,
        num_layers=28,
        num_heads=24,
        num_kv_heads=8,
        head_dim=128,
        intermediate_dim=8192,
        rope_scaling=_ROPE_32,
        tie_embeddings=True,
    ),
    "llama3.1-8b": _llama3(
        embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=8, intermediate_dim=14336
    ),
    "llama3.1-70b": _llama3(
        embed_dim=8192, num_layers=80, num_heads=64, num_kv_heads=8, intermediate_dim=28672
    ),
    "llama3.1-405b": _llama3(
        embed_dim=16384, num_layers=126, num_heads=128, num_kv_heads=8, intermediate_dim=53248
    ),
    # Llama 3 (not 3.1) used plain RoPE with an 8K context.
    "llama3-8b-text": _llama3(
        embed_dim=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_dim=14336,
        rope_scaling=None,
        max_seq_len=8192,
    ),
    # A few hundred thousand parameters over the byte-level tokenizer: tests and `mm demo`.
    "tiny": TextConfig(
        vocab_size=272,
        embed_dim=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=352,
        norm_eps=1e-5,
        rope_theta=10000.0,
        max_seq_len=2048,
        tie_embeddings=False,
        bos_token_id=256,
        eos_token_ids=(257, 264, 265),  # byte tokenizer: <|end_of_text|>, <|eom_id|>, <|eot_id|>
        pad_token_id=260,
    ),
}
