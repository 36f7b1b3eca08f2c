"""Configuration of the Llama 3 dense decoder, and its translation to and from checkpoint formats.

The field names are mm's own; the names used by Hugging Face (``config.json``) and by Meta
(``params.json``) appear only in the converters below.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mm._strict import check_fields
from mm._values import ConfigValueError, as_bool, as_float, as_int, check_values, optional

__all__ = ["RopeScaling", "TextConfig"]

_POSITIVE = as_int(minimum=1)
_POSITIVE_FLOAT = as_float(positive=True)


def _token_id(vocab_size: int):
    """An id of the base vocabulary: ``0 <= id < vocab_size``."""

    def rule(key: str, value: Any) -> int:
        value = as_int()(key, value)
        if not 0 <= value < vocab_size:
            raise ConfigValueError(f"must be a token id below vocab_size {vocab_size}, got {value}", key=key)
        return value

    return rule


def _token_ids(vocab_size: int):
    def rule(key: str, value: Any) -> tuple[int, ...]:
        if isinstance(value, str | bytes | Mapping) or not isinstance(value, list | tuple):
            raise ConfigValueError(f"must be a list of token ids, got {value!r}", key=key)
        return tuple(_token_id(vocab_size)(f"{key}[{i}]", v) for i, v in enumerate(value))

    return rule


@dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Llama 3.1 RoPE frequency scaling (``rope_type: llama3``).

    Low frequencies (wavelength above ``original_max_seq_len / low_freq_factor``) are divided by
    ``factor``, high frequencies kept, and the band between interpolated smoothly.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_seq_len: int = 8192

    def __post_init__(self) -> None:
        check_values(
            self,
            {
                "factor": _POSITIVE_FLOAT,
                "low_freq_factor": _POSITIVE_FLOAT,
                "high_freq_factor": _POSITIVE_FLOAT,
                "original_max_seq_len": _POSITIVE,
            },
        )
        if self.high_freq_factor <= self.low_freq_factor:  # the smooth band between them would be empty
            raise ConfigValueError(
                f"must be above low_freq_factor {self.low_freq_factor}, got {self.high_freq_factor}",
                key="high_freq_factor",
            )


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """Sizes of a Llama 3 / 3.1 / 3.2 dense decoder.

    Args:
        vocab_size: rows of the token embedding and the output head.
        embed_dim: model width ``d``.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than ``num_heads``).
        intermediate_dim: hidden width of the SwiGLU MLP.
        head_dim: per-head width; ``embed_dim // num_heads`` when not given.
        norm_eps: RMSNorm epsilon.
        rope_theta: RoPE base.
        rope_scaling: Llama 3.1 frequency scaling, or ``None`` for plain RoPE.
        max_seq_len: longest sequence the model is meant for.
        tie_embeddings: the output head shares the token embedding's weight.
        bos_token_id, eos_token_ids, pad_token_id: special ids the checkpoint declares.
    """

    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_dim: int
    head_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        """Types and ranges of every field (:mod:`mm._values`), then the checks that combine them.

        Every size is a positive int; ``norm_eps``, ``rope_theta`` positive numbers; special ids
        lie in the base vocabulary; ``head_dim`` is even (RoPE rotates pairs of channels).
        """
        check_values(self, {"vocab_size": _POSITIVE})
        token = _token_id(self.vocab_size)
        check_values(
            self,
            {
                "embed_dim": _POSITIVE,
                "num_layers": _POSITIVE,
                "num_heads": _POSITIVE,
                "num_kv_heads": _POSITIVE,
                "intermediate_dim": _POSITIVE,
                "head_dim": optional(_POSITIVE),
                "norm_eps": _POSITIVE_FLOAT,
                "rope_theta": _POSITIVE_FLOAT,
                "max_seq_len": _POSITIVE,
                "tie_embeddings": as_bool(),
                "bos_token_id": optional(token),
                "eos_token_ids": _token_ids(self.vocab_size),
                "pad_token_id": optional(token),
            },
        )
        scaling = self.rope_scaling
        if isinstance(scaling, Mapping):
            fields = check_fields(RopeScaling, scaling, "rope_scaling", error=ConfigValueError)
            try:
                scaling = RopeScaling(**fields)
            except ConfigValueError as e:
                raise e.within("rope_scaling") from None
            object.__setattr__(self, "rope_scaling", scaling)
        elif scaling is not None and not isinstance(scaling, RopeScaling):
            raise ConfigValueError(f"must be a mapping or None, got {scaling!r}", key="rope_scaling")
        if self.head_dim is None:
            if self.embed_dim % self.num_heads:
                raise ConfigValueError(
                    f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
                )
            object.__setattr__(self, "head_dim", self.embed_dim // self.num_heads)
        if self.head_dim % 2:
            raise ConfigValueError(
                f"must be even (RoPE rotates pairs of channels), got {self.head_dim}", key="head_dim"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigValueError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}"
            )

    # ------------------------------------------------------------------ presets and dicts
    @classmethod
    def preset(cls, name: str) -> TextConfig:
        """The published configuration called ``name`` (see ``mm.text_backbone.presets``)."""
        from mm.text_backbone.presets import TEXT_PRESETS

        if name not in TEXT_PRESETS:
            raise KeyError(f"unknown text preset {name!r}; known: {', '.join(sorted(TEXT_PRESETS))}")
        return TEXT_PRESETS[name]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TextConfig:
        """Strict inverse of :meth:`to_dict`: unknown and missing keys are errors."""
        data = check_fields(cls, data, "text config", required=True, error=ConfigValueError)
        return cls(**data)

    def replace(self, **changes: Any) -> TextConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ Hugging Face config.json
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> TextConfig:
        """Read a Hugging Face ``LlamaConfig`` dictionary (``config.json`` of ``model_type: llama``).

        Handles both the 4.x layout (``rope_theta`` + ``rope_scaling``) and the 5.x layout
        (``rope_parameters``).
        """
        params = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or params
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type == "llama3":
            rope_scaling = RopeScaling(
                factor=float(scaling["factor"]),
                low_freq_factor=float(scaling["low_freq_factor"]),
                high_freq_factor=float(scaling["high_freq_factor"]),
                original_max_seq_len=int(scaling["original_max_position_embeddings"]),
            )
        elif rope_type in ("default", None):
            rope_scaling = None
        else:
            raise ValueError(f"unsupported rope_type {rope_type!r}: mm implements 'default' and 'llama3'")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r}: Llama 3 uses 'silu'")
        if hf.get("attention_bias") or hf.get("mlp_bias"):
            raise ValueError("attention_bias / mlp_bias checkpoints are not Llama 3 models")
        eos = hf.get("eos_token_id")
        eos_ids = () if eos is None else (tuple(eos) if isinstance(eos, list | tuple) else (int(eos),))
        num_heads = int(hf["num_attention_heads"])
        pad = hf.get("pad_token_id")
        if isinstance(pad, int) and pad < 0:  # older Llama folders write -1 for "no padding token"
            pad = None
        return cls(
            vocab_size=int(hf["vocab_size"]),
            embed_dim=int(hf["hidden_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            intermediate_dim=int(hf["intermediate_size"]),
            head_dim=hf.get("head_dim"),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=rope_scaling,
            max_seq_len=int(hf.get("max_position_embeddings", 131072)),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=pad,
        )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """A ``config.json`` dictionary that ``transformers.LlamaForCausalLM`` reads (4.x and 5.x)."""
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            s = self.rope_scaling
            rope = {
                "rope_type": "llama3",
                "rope_theta": self.rope_theta,
                "factor": s.factor,
                "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_seq_len,
            }
        eos: Any = list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0]
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.embed_dim,
            "intermediate_size": self.intermediate_dim,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "max_position_embeddings": self.max_seq_len,
            "rope_theta": self.rope_theta,
            "rope_scaling": None if self.rope_scaling is None else rope,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos if self.eos_token_ids else None,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": dtype,
            "dtype": dtype,
        }

    # ------------------------------------------------------------------ Meta params.json
    @classmethod
    def from_meta(cls, params: Mapping[str, Any], *, vocab_size: int | None = None) -> TextConfig:
        """Read Meta's ``params.json`` (llama-models layout).

        ``vocab_size`` is used when ``params.json`` leaves it out or gives -1 (older releases).
        """
        dim = int(params["dim"])
        num_heads = int(params["n_heads"])
        hidden = int(2 * 4 * dim / 3)
        if params.get("ffn_dim_multiplier") is not None:
            hidden = int(float(params["ffn_dim_multiplier"]) * hidden)
        multiple_of = int(params.get("multiple_of", 256))
        hidden = multiple_of * math.ceil(hidden / multiple_of)
        vocab = int(params.get("vocab_size", -1))
        if vocab <= 0:
            if vocab_size is None:
                raise ValueError("params.json gives no vocab_size and none was passed")
            vocab = vocab_size
        scaling = None
        if params.get("use_scaled_rope"):
            scaling = RopeScaling(
                factor=float(params.get("rope_scaling_factor") or 8.0),
                low_freq_factor=float(params.get("low_freq_factor") or 1.0),
                high_freq_factor=float(params.get("high_freq_factor") or 4.0),
                original_max_seq_len=int(params.get("original_max_seq_len") or 8192),
            )
        return cls(
            vocab_size=vocab,
            embed_dim=dim,
            num_layers=int(params["n_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(params.get("n_kv_heads") or num_heads),
            intermediate_dim=hidden,
            norm_eps=float(params.get("norm_eps", 1e-5)),
            rope_theta=float(params.get("rope_theta", 500000.0)),
            rope_scaling=scaling,
            max_seq_len=int(params.get("max_seq_len", 131072)),
        )

    def to_meta(self) -> dict[str, Any]:
        """``params.json`` for this configuration.

        Meta derives the MLP width from ``dim``, ``ffn_dim_multiplier`` and ``multiple_of``; we write
        ``multiple_of = intermediate_dim`` and a multiplier that reproduces ``intermediate_dim`` exactly.
        ``max_seq_len`` is not written: Meta's ``Llama3.build`` passes it at run time beside the
        file's keys (``ModelArgs(max_seq_len=..., **params)``), so a file holding it cannot be loaded.
        """
        base = int(2 * 4 * self.embed_dim / 3)
        out: dict[str, Any] = {
            "dim": self.embed_dim,
            "n_layers": self.num_layers,
            "n_heads": self.num_heads,
            "n_kv_heads": self.num_kv_heads,
            "vocab_size": self.vocab_size,
            "multiple_of": self.intermediate_dim,
            "ffn_dim_multiplier": self.intermediate_dim / base,
            "norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "use_scaled_rope": self.rope_scaling is not None,
        }
        if self.rope_scaling is not None:
            out.update(
                rope_scaling_factor=self.rope_scaling.factor,
                low_freq_factor=self.rope_scaling.low_freq_factor,
                high_freq_factor=self.rope_scaling.high_freq_factor,
                original_max_seq_len=self.rope_scaling.original_max_seq_len,
            )
        if self.head_dim != self.embed_dim // self.num_heads:
            raise ValueError("Meta's layout cannot express a head_dim other than dim // n_heads")
        return out
