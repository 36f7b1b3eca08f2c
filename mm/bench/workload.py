"""What ``mm bench`` runs: its sizes (Mllama configurations and workloads) and their FLOP counts.

Shapes: b batch, s text tokens, m vision tokens of one image (``T = tiles x tokens per tile``),
d model width, h heads, hd head dim, w vision width, V text vocabulary.

FLOP model (2 FLOPs per multiply-add, matmuls only; norms, softmax and element-wise work are
ignored; only real tokens count, never padding):

* Forward: every linear layer costs ``2 x params`` per token it sees; self-attention scores and
  values cost ``2 x h x hd x s(s+1)`` per sequence (causal: half the square); cross-attention
  ``4 x h x hd x s x m`` against ``m`` vision tokens; vision attention ``4 x w x T^2`` per image of
  ``T = tiles x tokens per tile``; the output head is needed only where the loss reads it (labelled
  positions) in training, and at the last position in prefill and decode.
* Backward: trainable parts (image encoder, projector, cross-attention blocks) cost twice their
  forward (input and weight gradients; the patch convolution only its weight gradient). Frozen
  backbone layers from the first layer that needs gradients onward cost their forward again for
  linear layers (input gradients only) and twice for attention scores (both operands need
  gradients); so does the output head. Frozen layers below that one cost no backward. That layer
  is the one the first cross-attention block sits in front of, unless an input embedding learns
  (mm's ``<|image|>`` placeholder row does): then it is layer 0, since the row's gradient passes
  through every layer. The train worker reports which case it measured.
* Decode token ``i`` costs the forward of one token with ``s + i`` cached keys.

Roofline of a decoded token (:func:`decode_bytes`): decoding one token of batch 1 is bound by
memory, so its floor is the bytes it must read over the machine's memory bandwidth. Counted, at the
dtype's width: every backbone layer's weights (attention and MLP projections, both norms), every
cross-attention block's weights except its key and value projections (their output for the image is
computed once at prefill and cached), the final norm, the output head (``V x d``) and one row of the
embedding table; plus the KV cache each step reads: ``2 x kvh x hd`` per cached position per backbone
layer (the step reads ``s + i`` positions for decode token ``i``) and the image's cached keys and
values in every cross-attention block (``2 x kvh x hd x T``). Activations, the cache write of the new
position and the logits are ignored (kilobytes against megabytes). That is what the fp32 computation
reads, and the yardstick both implementations are measured against. mm's greedy decoding on the
CPU in fp32 reads less (:func:`screened_decode_bytes`): its output head reads an int8 copy of the
``V x d`` matrix, a scale and two fp32 bound terms per row (``V x (d + 12)`` bytes with oneDNN's
product and its fp32 scales, ``V x (d + 10)`` with PyTorch's and its bf16 ones) and then the fp32
rows of a handful of candidates (ignored), in place of the fp32 matrix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DTYPE_BYTES",
    "SIZES",
    "SCREEN_ROW_BYTES",
    "WRITTEN_MARKER",
    "BenchSize",
    "decode_bytes",
    "decode_flops",
    "screened_decode_bytes",
    "train_step_flops",
]

# Bytes per element of each benchmark dtype.
DTYPE_BYTES = {"fp32": 4, "bf16": 2}

# Written into the checkpoint folder after the checkpoint is complete (size, dtype, parameter count).
WRITTEN_MARKER = "mm-bench-checkpoint.json"

_ASPECT_RATIOS_4 = [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]
_LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass(frozen=True, kw_only=True)
class BenchSize:
    """A benchmark size: the Mllama configuration (Hugging Face field names) and the workload.

    Args:
        name: what ``--size`` calls it.
        text: ``MllamaTextConfig`` fields (without RoPE).
        rope: RoPE parameters (``rope_parameters`` in transformers 5, ``rope_theta`` +
            ``rope_scaling`` before).
        vision: ``MllamaVisionConfig`` fields.
        train_lengths: token count of each training sample (the batch size is their number).
        tile_grid: tiles across and down of every image.
        prompt_tokens, new_tokens: the decode workload.
        repeats: default rounds (processes per implementation and figure).
        train_steps: timed train steps per process, after one warm-up step.
        decode_runs: timed generations per process, after one warm-up generation of the same length.
        matmul_n: side of the square matmuls that measure the machine's peak (CPU; CUDA uses 8192).
        matmul_trial_s: about how long each of the timed matmul loops runs.
        stream_elements: elements of each array of the memory-bandwidth copy and triad (CPU).
        packing: arguments of :func:`mm.bench.packing.packing_throughput` (default: its own).
        timeout_s: default limit for one worker process.
    """

    name: str
    text: dict[str, Any]
    rope: dict[str, Any]
    vision: dict[str, Any]
    train_lengths: tuple[int, ...] = (96, 117, 139, 160)
    tile_grid: tuple[int, int] = (2, 2)
    prompt_tokens: int = 64
    new_tokens: int = 32
    repeats: int = 2
    train_steps: int = 2
    decode_runs: int = 2
    matmul_n: int = 2048
    matmul_trial_s: float = 0.4
    stream_elements: int = 2**25
    packing: dict[str, Any] = field(default_factory=dict)
    timeout_s: float = 900.0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def tiles(self) -> int:
        return self.tile_grid[0] * self.tile_grid[1]

    def hf_text_config(self) -> dict[str, Any]:
        """``text_config`` for ``MllamaConfig`` in the installed transformers' RoPE spelling."""
        import transformers

        text = dict(self.text)
        if int(transformers.__version__.split(".")[0]) >= 5:
            text["rope_parameters"] = dict(self.rope)
        else:
            text["rope_theta"] = self.rope["rope_theta"]
            scaling = {k: v for k, v in self.rope.items() if k != "rope_theta"}
            text["rope_scaling"] = None if scaling.get("rope_type") == "default" else scaling
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text_config": self.text,
            "rope": self.rope,
            "vision_config": self.vision,
            "train_lengths": list(self.train_lengths),
            "tile_grid": list(self.tile_grid),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "notes": list(self.notes),
        }


def _text(**sizes) -> dict[str, Any]:
    base = dict(
        vocab_size=128256,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128004,
        tie_word_embeddings=False,
    )
    return {**base, **sizes}


def _vision(**sizes) -> dict[str, Any]:
    base = dict(patch_size=14, max_num_tiles=4, norm_eps=1e-5, supported_aspect_ratios=_ASPECT_RATIOS_4)
    vision = {**base, **sizes}
    vision["vision_output_dim"] = vision["hidden_size"] * (1 + len(vision["intermediate_layers_indices"]))
    return vision


# The "small" model's sizes, shared by its Llama 3-vocabulary and 4,096-token forms.
_SMALL_TEXT = dict(
    hidden_size=512,
    num_hidden_layers=10,  # 8 self-attention + 2 cross-attention
    cross_attention_layers=[3, 8],
    num_attention_heads=8,
    num_key_value_heads=2,
    intermediate_size=1792,
)
_SMALL_VISION = _vision(
    hidden_size=256,
    num_hidden_layers=4,
    num_global_layers=2,
    attention_heads=4,
    intermediate_size=1024,
    image_size=112,  # 8 x 8 patches + class token per tile
    intermediate_layers_indices=[1, 3],
)

SIZES: dict[str, BenchSize] = {
    # For the test suite: seconds, not a measurement.
    "tiny": BenchSize(
        name="tiny",
        text=_text(
            vocab_size=512,
            hidden_size=64,
            num_hidden_layers=10,
            cross_attention_layers=[3, 8],
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=512,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        ),
        rope={"rope_type": "default", "rope_theta": 10000.0},
        vision=_vision(
            hidden_size=32,
            num_hidden_layers=4,
            num_global_layers=2,
            attention_heads=4,
            intermediate_size=64,
            image_size=28,
            intermediate_layers_indices=[1, 2],
        ),
        train_lengths=(12, 15, 17, 20),
        prompt_tokens=8,
        new_tokens=4,
        repeats=1,
        train_steps=1,
        decode_runs=1,
        matmul_n=256,
        matmul_trial_s=0.05,
        stream_elements=2**20,
        packing={"num_samples": 16, "batch_size": 4, "max_len": 300, "embed_dim": 64, "num_layers": 2},
        timeout_s=180.0,
    ),
    # About a minute on 2 CPU cores; Llama 3's real vocabulary, since the logits cost is felt.
    "small": BenchSize(
        name="small",
        text=_text(**_SMALL_TEXT),
        rope=_LLAMA3_ROPE,
        vision=_SMALL_VISION,
    ),
    # The same model with a 4,096-token vocabulary: the output head no longer dominates, so the rest of
    # the network shows (issue 21).
    "small-4k": BenchSize(
        name="small-4k",
        text=_text(
            **_SMALL_TEXT,
            vocab_size=4096,
            bos_token_id=4000,
            eos_token_id=4001,
            pad_token_id=4004,
        ),
        rope=_LLAMA3_ROPE,
        vision=_SMALL_VISION,
    ),
    # Llama 3.2 11B Vision's configuration, for a GPU.
    "11b": BenchSize(
        name="11b",
        text=_text(
            hidden_size=4096,
            num_hidden_layers=40,
            cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38],
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
        ),
        rope=_LLAMA3_ROPE,
        vision=_vision(
            hidden_size=1280,
            num_hidden_layers=32,
            num_global_layers=8,
            attention_heads=16,
            intermediate_size=5120,
            image_size=560,
            intermediate_layers_indices=[3, 7, 15, 23, 30],
        ),
        repeats=1,
        train_steps=4,
        decode_runs=3,
        timeout_s=3600.0,
    ),
}


# ---------------------------------------------------------------------- FLOP model
def _shapes(size: BenchSize) -> dict[str, int]:
    t, v = size.text, size.vision
    d, h = t["hidden_size"], t["num_attention_heads"]
    grid = v["image_size"] // v["patch_size"]
    return {
        "d": d,
        "h": h,
        "hd": d // h,
        "kvh": t["num_key_value_heads"],
        "inter": t["intermediate_size"],
        "vocab": t["vocab_size"],
        "w": v["hidden_size"],
        "mlp_v": v["intermediate_size"],
        "layers_v": v["num_hidden_layers"] + v["num_global_layers"],
        "patch": v["patch_size"],
        "p": grid * grid + 1,  # tokens per tile: patches + class token
        "out_v": v["vision_output_dim"],
    }


def _backbone_layout(size: BenchSize) -> tuple[int, list[int]]:
    """Backbone depth and the backbone index each cross-attention block sits in front of."""
    cross = sorted(size.text["cross_attention_layers"])
    return size.text["num_hidden_layers"] - len(cross), [m - k for k, m in enumerate(cross)]


def _image_flops(size: BenchSize) -> tuple[float, float]:
    """Forward FLOPs of one image through encoder, projector and every block's keys/values; and
    the part of it spent in the patch convolution."""
    x = _shapes(size)
    tokens = size.tiles * x["p"]  # T
    w = x["w"]
    layer = tokens * 2 * (4 * w * w + 2 * w * x["mlp_v"]) + 4 * w * tokens * tokens
    conv = 2 * 3 * x["patch"] ** 2 * w * size.tiles * (x["p"] - 1)
    projector = 2 * x["out_v"] * x["d"] * tokens
    _, blocks = _backbone_layout(size)
    kv = len(blocks) * 2 * 2 * x["d"] * x["kvh"] * x["hd"] * tokens
    return x["layers_v"] * layer + conv + projector + kv, conv


def _text_flops(size: BenchSize, s: int, past: int = 0) -> tuple[list[tuple[float, float]], float]:
    """Per backbone layer ``(linear, attention)`` forward FLOPs of ``s`` new tokens after ``past``
    cached ones, and the forward FLOPs of all cross-attention blocks for those tokens."""
    x = _shapes(size)
    d, h, hd, kvh, inter = x["d"], x["h"], x["hd"], x["kvh"], x["inter"]
    depth, blocks = _backbone_layout(size)
    linear = 2 * s * (2 * d * h * hd + 2 * d * kvh * hd + 3 * d * inter)
    # Query i (0-based among the new) sees past + i + 1 keys: sum = s * past + s(s+1)/2.
    attention = 4 * h * hd * (s * past + s * (s + 1) / 2)
    m = size.tiles * x["p"]
    cross = len(blocks) * (2 * s * (2 * d * h * hd + 3 * d * inter) + 4 * h * hd * s * m)
    return [(linear, attention)] * depth, cross


def train_step_flops(size: BenchSize, *, backward_from: int | None = None) -> float:
    """Model FLOPs of one train step (see the module docstring).

    Args:
        backward_from: first backbone layer that needs gradients; by default the one the first
            cross-attention block sits in front of (0 when the placeholder embedding learns).
    """
    x = _shapes(size)
    _, blocks = _backbone_layout(size)
    start = blocks[0] if backward_from is None else backward_from
    image, conv = _image_flops(size)
    total = len(size.train_lengths) * (3 * image - conv)
    for n in size.train_lengths:
        layers, cross = _text_flops(size, n)
        total += 3 * cross
        for i, (linear, attention) in enumerate(layers):
            total += (2 * linear + 3 * attention) if i >= start else (linear + attention)
    labelled = sum(n // 4 for n in size.train_lengths)
    return total + 2 * 2 * x["d"] * x["vocab"] * labelled


def decode_flops(size: BenchSize) -> tuple[float, float]:
    """Model FLOPs of prefill (image, prompt, logits of the last position) and of the decode steps
    that follow the first new token."""
    x = _shapes(size)
    head = 2 * x["d"] * x["vocab"]
    image, _ = _image_flops(size)
    layers, cross = _text_flops(size, size.prompt_tokens)
    prefill = image + cross + sum(a + b for a, b in layers) + head
    decode = 0.0
    for i in range(size.new_tokens - 1):
        layers, cross = _text_flops(size, 1, past=size.prompt_tokens + i)
        decode += cross + sum(a + b for a, b in layers) + head
    return prefill, decode


def _weight_elements_per_decoded_token(size: BenchSize) -> int:
    """Elements of the weights one decoded token reads (see the module docstring)."""
    x = _shapes(size)
    d, h, hd, kvh, inter = x["d"], x["h"], x["hd"], x["kvh"], x["inter"]
    depth, blocks = _backbone_layout(size)
    layer = 2 * d * h * hd + 2 * d * kvh * hd + 3 * d * inter + 2 * d  # q, k, v, o, MLP, two norms
    # Cross-attention block: q, o, MLP, two norms, q/k norms, two gates (k, v: cached image keys/values).
    block = 2 * d * h * hd + 3 * d * inter + 2 * d + 2 * hd + 2
    return depth * layer + len(blocks) * block + d + x["vocab"] * d + d  # final norm, head, embedding row


def decode_bytes(size: BenchSize, dtype: str = "fp32") -> dict[str, float]:
    """Bytes each decoded token (batch 1, after the first) must read, averaged over the workload's
    decode steps: ``weights`` + ``kv_cache`` (self-attention) + ``cross_kv`` (image keys/values) =
    ``total`` (see the module docstring)."""
    x = _shapes(size)
    width = DTYPE_BYTES[dtype]
    depth, blocks = _backbone_layout(size)
    steps = size.new_tokens - 1
    # Decode token i (1..steps) attends over the prompt and the i tokens up to and including itself.
    positions = sum(size.prompt_tokens + i for i in range(1, steps + 1)) / steps
    per_position = 2 * x["kvh"] * x["hd"] * depth
    out = {
        "weights": float(_weight_elements_per_decoded_token(size) * width),
        "kv_cache": positions * per_position * width,
        "cross_kv": float(len(blocks) * 2 * x["kvh"] * x["hd"] * size.tiles * x["p"] * width),
        "mean_positions": positions,
    }
    out["total"] = out["weights"] + out["kv_cache"] + out["cross_kv"]
    return out


# Bytes each row of mm's greedy screen holds beside its d int8 values, by product
# (mm.text_backbone.greedy_head): its scale and two fp32 bound terms.
SCREEN_ROW_BYTES = {"onednn": 4 + 8, "int8pack": 2 + 8}


def screened_decode_bytes(size: BenchSize, kernel: str | None) -> float:
    """Bytes mm's greedy decoding reads per token on the CPU in fp32: :func:`decode_bytes` with the
    output head's ``4 V d`` replaced by the screen's ``V (d + SCREEN_ROW_BYTES[kernel])`` (see the
    module docstring); with no screen (``kernel`` None), the fp32 bytes."""
    x = _shapes(size)
    v, d = x["vocab"], x["d"]
    if kernel is None:
        return decode_bytes(size, "fp32")["total"]
    return decode_bytes(size, "fp32")["total"] - 4 * v * d + v * (d + SCREEN_ROW_BYTES[kernel])
