"""What runs inside each process of ``mm bench``: one measurement of one implementation.

Run as ``python -m mm.bench.workers SPEC.json``; the spec names a task (``write``, ``matmul``,
``bandwidth``, ``train``, ``decode``, ``serve``, ``packing``), the implementation (``mm``, ``mm_hf_call`` — mm
called as Hugging Face's users call a model, ``model(**batch, labels=labels)`` — or ``hf``), the checkpoint folder, the size,
device and dtype, and the file the result is written to (JSON). A failure is written as
``{"error": ...}`` so the orchestrator (:mod:`mm.bench.run`) reports it for that figure and goes on.

Shapes: b batch, s text tokens, n images per sample (1 here), t tiles, V text vocabulary.

Both implementations get the same tensors, built here from fixed seeds in the layout of Hugging
Face's Mllama processor. ``transformers`` is imported only by the ``write`` task and the ``hf``
workers: it is a benchmark dependency, never one of mm's.
"""

from __future__ import annotations

import gc
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from mm.bench.workload import SIZES, WRITTEN_MARKER, BenchSize

__all__ = ["decode_inputs", "run_task", "train_batch"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------- inputs (same for mm and HF)
def _aspect_ratio_id(size: BenchSize) -> int:
    """Aspect-ratio id of the tile grid the images use (1-based index into supported_aspect_ratios)."""
    grid = list(size.tile_grid)
    return size.vision["supported_aspect_ratios"].index(grid) + 1


def _pixels(size: BenchSize, b: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    t = size.tiles
    px = size.vision["image_size"]
    return {
        "pixel_values": torch.randn(b, 1, t, 3, px, px, generator=generator),  # [b, n, t, 3, H, W]
        "aspect_ratio_ids": torch.full((b, 1), _aspect_ratio_id(size), dtype=torch.long),  # [b, n]
        "aspect_ratio_mask": torch.ones(b, 1, t, dtype=torch.long),  # [b, n, t]
    }


def train_batch(size: BenchSize, seed: int = 0) -> dict[str, torch.Tensor]:
    """A supervised batch: ``<|image|>`` first, random text, right padding, labels on the last quarter.

    Every token sits after the image placeholder, so every token sees the image (as in the
    processor's ``all_previous`` mask); padding sees nothing and carries no label.
    """
    g = torch.Generator().manual_seed(seed)
    vocab = size.text["vocab_size"]
    lengths = size.train_lengths
    b, s = len(lengths), max(lengths)
    ids = torch.zeros(b, s, dtype=torch.long)
    attention = torch.zeros(b, s, dtype=torch.long)
    labels = torch.full((b, s), -100, dtype=torch.long)
    cross = torch.zeros(b, s, 1, size.tiles, dtype=torch.long)  # [b, s, n, t]
    for i, n in enumerate(lengths):
        ids[i, 0] = vocab  # <|image|>
        ids[i, 1:n] = torch.randint(1, vocab, (n - 1,), generator=g)
        attention[i, :n] = 1
        cross[i, :n] = 1
        answer = n - n // 4
        labels[i, answer:n] = ids[i, answer:n]
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "cross_attention_mask": cross,
        "labels": labels,
        **_pixels(size, b, g),
    }


def decode_inputs(size: BenchSize, seed: int = 1) -> dict[str, torch.Tensor]:
    """One prompt of ``size.prompt_tokens`` tokens starting with ``<|image|>``, one image."""
    g = torch.Generator().manual_seed(seed)
    vocab = size.text["vocab_size"]
    s = size.prompt_tokens
    ids = torch.randint(1, vocab, (1, s), generator=g)
    ids[0, 0] = vocab
    return {
        "input_ids": ids,
        "attention_mask": torch.ones(1, s, dtype=torch.long),
        "cross_attention_mask": torch.ones(1, s, 1, size.tiles, dtype=torch.long),
        **_pixels(size, 1, g),
    }


# ---------------------------------------------------------------------- clocks and memory
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of this process from :meth:`reset` on, in MiB.

    On CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU: the
    resident-set high-water mark (``VmHWM``), reset to the current RSS by writing ``5`` to
    ``/proc/self/clear_refs`` (Linux); where that is refused, the high-water mark since the
    process started is reported and ``reset_ok`` is False.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base_mb = 0.0
        self.reset_ok = True

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.reset_ok = False
        self.base_mb = (_status_kb("VmRSS") or 0) / 1024

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
            kind = "cuda_max_memory_allocated"
        else:
            peak = (_status_kb("VmHWM") or 0) / 1024
            kind = "rss_high_water_mark"
        return {
            "peak_mb": round(peak, 1),
            "base_mb": round(self.base_mb, 1),
            "step_mb": round(peak - self.base_mb, 1),
            "kind": kind,
            "reset_ok": self.reset_ok,
        }


# ---------------------------------------------------------------------- loading
def _hf_dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load(impl: str, folder: str, dtype: torch.dtype, device: torch.device):
    if impl.startswith("mm"):
        from mm.model.multimodal import MultimodalModel

        return MultimodalModel.from_pretrained(folder, dtype=dtype).to(device)
    from transformers import MllamaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    model = MllamaForConditionalGeneration.from_pretrained(folder, **_hf_dtype_kwargs(dtype)).to(device)
    _hf_vision_as_released(model)
    return model


def _hf_vision_as_released(model) -> None:
    """Let transformers >= 5 compute what the folder means, so both sides run the same function.

    ``intermediate_layers_indices`` name the vision layers whose *inputs* join the features (Meta's
    reference, transformers 4.45); transformers 5.x's vision encoder collects their *outputs*. The
    in-memory index list is shifted by one; the work done is the same either way.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        vision, _, _ = _hf_parts(model)
        vision.intermediate_layers_indices = [i - 1 for i in vision.intermediate_layers_indices]


def _hf_parts(model):
    """(vision model, projector, list of text layers) across transformers 4.x and 5.x layouts."""
    inner = model.model if hasattr(model, "model") and hasattr(model.model, "vision_model") else model
    lm = inner.language_model
    layers = lm.layers if hasattr(lm, "layers") else lm.model.layers
    return inner.vision_model, inner.multi_modal_projector, layers


def _set_trainable(impl: str, model) -> list[torch.nn.Parameter]:
    """Backbone frozen; image encoder, projector and cross-attention layers learn, on both sides alike.

    mm's ``image_adapter`` component also holds the learnable ``<|image|>`` embedding row, which
    Hugging Face's Mllama users keep frozen; the benchmark trains the same set on both sides (so
    neither back-propagates below the first cross-attention layer).
    """
    if impl.startswith("mm"):
        from mm.model.components import set_trainable

        set_trainable(model, ["image_encoder", "projector.*", "image_blocks.*"])
    else:
        model.requires_grad_(False)
        vision, projector, layers = _hf_parts(model)
        vision.requires_grad_(True)
        projector.requires_grad_(True)
        for i in model.config.text_config.cross_attention_layers:
            layers[i].requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------- tasks
def task_write(spec: dict[str, Any]) -> dict[str, Any]:
    """Write the random-weight Hugging Face Mllama checkpoint every other worker loads."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    size = SIZES[spec["size"]]
    dtype = DTYPES[spec["dtype"]]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build at the benchmark's dtype: an 11B model in fp32 is 44 GB
    try:
        config = MllamaConfig(
            vision_config=dict(size.vision),
            text_config=size.hf_text_config(),
            image_token_index=size.text["vocab_size"],
        )
        # Random initialisation of 11B parameters takes minutes on a CPU and seconds on the GPU.
        with torch.device(spec.get("device", "cpu")):
            model = MllamaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:  # fresh gates are 0: open them so the image changes the loss
                p.copy_(torch.empty_like(p).uniform_(-1.0, 1.0))
    model.save_pretrained(spec["folder"])
    params = sum(p.numel() for p in model.parameters())
    written = {"seconds": time.perf_counter() - t0, "params": params}
    # Written last: its presence says the folder is complete (a later run with --workdir reuses it).
    marker = {"size": size.to_dict(), "dtype": spec["dtype"], "params": params}
    (Path(spec["folder"]) / WRITTEN_MARKER).write_text(json.dumps(marker))
    return written


def task_matmul(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's dense matmul rate at the dtype: best of a few timed loops of ``n x n`` products,
    through ``torch.matmul`` and through mm's :func:`~mm.text_backbone.linear.linear` (on the CPU in
    fp32: oneDNN, about twice MKL's rate on AMD processors with AVX-512), the faster of the two."""
    from mm.text_backbone.linear import linear

    device = torch.device(spec["device"])
    dtype = DTYPES[spec["dtype"]]
    n = int(spec["matmul_n"])
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    kernels = {"torch.matmul": torch.matmul, "mm linear": linear}  # a @ b, a @ b^T: the same FLOPs
    by_kernel, raw, reps_of = {}, {}, {}
    with torch.no_grad():
        for name, product in kernels.items():
            for _ in range(2):
                product(a, b)
            _sync(device)
            t0 = time.perf_counter()
            product(a, b)
            _sync(device)
            reps = max(1, int(float(spec.get("trial_s", 0.4)) / max(time.perf_counter() - t0, 1e-6)))
            rates = []
            for _ in range(int(spec.get("trials", 5))):
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    product(a, b)
                _sync(device)
                rates.append(2 * n**3 * reps / (time.perf_counter() - t0))
            by_kernel[name], raw[name], reps_of[name] = max(rates), rates, reps
    best = max(by_kernel, key=by_kernel.get)
    out = {"flops_per_s": by_kernel[best], "kernel": best, "by_kernel": by_kernel, "raw_flops_per_s": raw[best],
           "n": n, "reps": reps_of[best]}  # fmt: skip
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        out.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1))
    del a, b
    if spec.get("stream_elements"):  # the memory bandwidth too, in this same process of its own
        out["bandwidth"] = task_bandwidth(spec)
    return out


def task_bandwidth(spec: dict[str, Any]) -> dict[str, Any]:
    """The machine's memory bandwidth, STREAM-like: best of timed copies (``a = b``, 2 arrays moved)
    and triads (``a = b + s * c``, 3 arrays moved) of ``stream_elements`` fp32 each."""
    device = torch.device(spec["device"])
    n = int(spec["stream_elements"])
    a = torch.zeros(n, device=device)
    b = torch.rand(n, device=device)
    c = torch.rand(n, device=device)
    width = a.element_size()
    kernels = {
        "copy": (lambda: a.copy_(b), 2 * n * width),
        "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3 * n * width),
    }
    rates: dict[str, list[float]] = {}
    for name, (kernel, moved) in kernels.items():
        kernel()  # touch every page first
        rates[name] = []
        for _ in range(int(spec.get("trials", 10))):
            _sync(device)
            t0 = time.perf_counter()
            kernel()
            _sync(device)
            rates[name].append(moved / (time.perf_counter() - t0))
    best = {name: max(r) for name, r in rates.items()}
    return {
        "bytes_per_s": max(best.values()),
        "best": best,
        "raw_bytes_per_s": rates,
        "elements": n,
        "torch_threads": torch.get_num_threads(),
    }


def task_train(spec: dict[str, Any]) -> dict[str, Any]:
    """Warm-up step plus timed steps of forward with labels, backward and AdamW; peak memory over all."""
    impl, device = spec["impl"], torch.device(spec["device"])
    size = SIZES[spec["size"]]
    t0 = time.perf_counter()
    model = _load(impl, spec["folder"], DTYPES[spec["dtype"]], device)
    load_s = time.perf_counter() - t0
    model.train()
    params = _set_trainable(impl, model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    batch = {k: v.to(device) for k, v in train_batch(size).items()}
    # mm's trainer skips the full logits; called Hugging Face-style, mm computes them only if read.
    kwargs = {"return_logits": False} if impl == "mm" else {}
    memory = PeakMemory(device)
    memory.reset()
    losses, seconds = [], []
    for _ in range(1 + int(spec["steps"])):
        _sync(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        out = model(**batch, **kwargs)
        out.loss.backward()
        optimizer.step()
        _sync(device)
        seconds.append(time.perf_counter() - start)
        losses.append(float(out.loss.detach()))
        del out
    return {
        "load_s": load_s,
        "warmup_s": seconds[0],
        "seconds": seconds[1:],
        "first_loss": losses[0],
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
        "embeddings_learn": any(
            p.requires_grad
            for name, p in model.named_parameters()
            if name.endswith("embed_tokens.weight") or name.startswith("extra_embeddings")
        ),
        "memory": memory.read(),
        "torch_threads": torch.get_num_threads(),
    }


def _hf_clock():
    """A ``generate`` streamer that notes when tokens reach the host (the prompt first, then one per step)."""
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())  # `value` is on the host: the step has finished
            if len(self.times) > 1:
                self.tokens.extend(int(x) for x in value.reshape(-1))

        def end(self) -> None:
            pass

    return Clock()


def _generate_once(impl: str, model, inputs: dict[str, torch.Tensor], new_tokens: int, device, graph=None):
    """Return ``(prefill seconds, seconds from the first to the last new token, new tokens)``; mm
    decodes through a CUDA graph on a GPU unless ``graph`` says otherwise."""
    _sync(device)
    if impl.startswith("mm"):
        tokens, times = [], []
        graph = device.type == "cuda" if graph is None else graph
        t0 = time.perf_counter()
        for token in model.stream(**inputs, max_new_tokens=new_tokens, stop_token_ids=(), cuda_graph=graph):
            tokens.append(int(token[0].cpu()))  # a reader of the stream needs the token on the host
            times.append(time.perf_counter())
        return times[0] - t0, times[-1] - times[0], tokens
    clock = _hf_clock()
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=clock,
            pad_token_id=0,
        )
    return clock.times[1] - t0, clock.times[-1] - clock.times[1], clock.tokens


def task_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """Greedy generation with cache: one warm-up generation as long as the timed ones, then timed runs
    split into prefill and decode."""
    impl, device = spec["impl"], torch.device(spec["device"])
    size = SIZES[spec["size"]]
    t0 = time.perf_counter()
    model = _load(impl, spec["folder"], DTYPES[spec["dtype"]], device).eval()
    load_s = time.perf_counter() - t0
    inputs = {k: v.to(device) for k, v in decode_inputs(size).items()}
    if impl == "hf":
        model.generation_config.temperature = None  # greedy: silence sampling defaults
        model.generation_config.top_p = None
    # A warm-up as long as the timed runs: after a 4-token one, mm's first 32-token run here decoded
    # in 0.47-0.52 s against 0.34-0.38 s for the next ones, and after a 32-token one in 0.34-0.37 s.
    # The difference is the process's first full garbage collection, which fell inside that run: one
    # decoded step of 153-168 ms where the others took 11-12 ms, and a collection of 141 ms over the
    # 343,000 objects this process tracks (gc.callbacks).
    _generate_once(impl, model, inputs, size.new_tokens, device)
    prefill, decode, tokens = [], [], None
    for _ in range(int(spec["runs"])):
        p, d, tokens = _generate_once(impl, model, inputs, size.new_tokens, device)
        prefill.append(p)
        decode.append(d)
    out = {
        "load_s": load_s,
        "prefill_s": prefill,
        "decode_s": decode,
        "decoded_tokens": size.new_tokens - 1,
        "tokens": tokens,
        "torch_threads": torch.get_num_threads(),
    }
    screen = model.backbone.__dict__.get("_greedy_screen") if impl.startswith("mm") else None
    if screen is not None:  # mm on the CPU in fp32: the product its greedy head screened with
        out["screen_kernel"] = screen.kernel
    if impl.startswith("mm") and device.type == "cuda":  # the graph's tokens against eager decoding's
        out["cuda_graph"] = True
        out["eager_tokens"] = _generate_once(impl, model, inputs, size.new_tokens, device, graph=False)[2]
        out["same_tokens_as_eager"] = out["eager_tokens"] == tokens
    return out


def task_packing(spec: dict[str, Any]) -> dict[str, Any]:
    """Training tokens/s packed vs padded (:func:`mm.bench.packing.packing_throughput`)."""
    from mm.bench.packing import packing_throughput

    settings = spec.get("packing") or {}
    return packing_throughput(threads=spec.get("threads"), **settings)


def task_serve(spec: dict[str, Any]) -> dict[str, Any]:
    from mm.bench.serve import serve_bench

    return serve_bench(spec)


TASKS = {
    "write": task_write,
    "matmul": task_matmul,
    "bandwidth": task_bandwidth,
    "train": task_train,
    "decode": task_decode,
    "serve": task_serve,
    "packing": task_packing,
}


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one task; any exception becomes ``{"error": traceback}``."""
    try:
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        return TASKS[spec["task"]](spec)
    except Exception:  # report per figure instead of crashing the whole benchmark
        return {"error": traceback.format_exc(limit=8)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run_task(spec)
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
