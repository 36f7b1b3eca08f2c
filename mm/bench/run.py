"""``mm bench``: mm against Hugging Face's Llama 3.2 Vision on the same weights, machine and run.

One random-weight checkpoint is written in Hugging Face's Mllama layout, then loaded by
``mm.MultimodalModel.from_pretrained`` and by ``transformers.MllamaForConditionalGeneration``.
Every measurement runs in a process of its own (so each peak memory is its own), mm and Hugging
Face alternating, ``--repeats`` rounds; figures are medians of the timed repetitions after a
warm-up. ``transformers`` is needed only here (a benchmark dependency, never a runtime one).

Figures, for both implementations:

* **train step**: batch of 4, lengths 96-160 tokens right-padded (Hugging Face's users pad, and so
  does mm's trainer), one 4-tile image per sample with ``<|image|>`` first, labels on the last
  quarter of each sequence. Backbone frozen; image encoder, projector and cross-attention layers
  learn, with AdamW. Hugging Face is called with ``labels`` as its users do; mm as its trainer
  does (``labels=…, return_logits=False``). Both train the same parameters: mm's ``image_adapter``
  component would also train its placeholder embedding rows, which Hugging Face's users keep
  frozen, so mm selects ``projector.*`` and ``image_blocks.*`` instead (the first step's
  trainable-parameter counts are compared). Neither back-propagates below the first
  cross-attention layer: nothing below it needs gradients. Tokens/s counts real (unpadded) tokens. The first step's loss of both is recorded: equal losses
  show that both did the same work.
* **train peak memory**: the process's peak over the warm-up and timed steps, minus its memory
  right before the first step (weights loaded): activations, gradients, optimiser state. CPU:
  resident-set high-water mark (reset through ``/proc/self/clear_refs``); CUDA:
  ``max_memory_allocated``.
* **decode**: one image, a prompt of 64 tokens, 32 new tokens, greedy, with cache. Prefill is the
  time from the call to the first new token on the host; decode tokens/s is the 31 later tokens
  over the time from the first to the last (mm: ``model.stream``; Hugging Face: ``generate`` with
  ``min_new_tokens`` and a streamer that notes when each token arrives).
* **MFU**: model FLOPs per second over the machine's dense matmul rate at the dtype, measured in
  the same run (best of timed loops of square matmuls, in a process of its own before the figures
  and again after them: a shared machine reads low at times).

The FLOP model and the sizes are in :mod:`mm.bench.workload`.

Results JSON (``--out``): ``config``, ``versions``, ``hardware``, ``matmul_peak`` (the rate used and
both measurements), ``flops``,
``results[figure][impl]`` (medians and every process's raw timings, or ``error``) and
``comparison`` (ratios, loss difference, whether greedy tokens agree, targets).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mm.bench.workload import SIZES, WRITTEN_MARKER, BenchSize, decode_flops, train_step_flops

__all__ = [
    "FIGURES",
    "SIZES",
    "BenchSize",
    "decode_flops",
    "run_bench",
    "run_bench_command",
    "train_step_flops",
]

IMPLS = ("mm", "hf")
FIGURES = ("train", "decode")
# Issue 6's targets, CPU fp32: train step speed, decode tokens/s, train peak memory (mm vs HF).
TARGETS = {"train_speedup": 1.3, "decode_speedup": 2.0, "train_memory_ratio": 0.7}


# ---------------------------------------------------------------------- environment
def hardware() -> dict[str, Any]:
    """CPU model, cores and memory (the GPU is named by a worker: the parent never touches CUDA)."""
    info: dict[str, Any] = {"platform": platform.platform(), "cpu_cores": os.cpu_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(
            (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
            platform.processor() or "unknown",
        )
        mem = next(
            line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
        )
        info["memory_gb"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        info["cpu"] = platform.processor() or "unknown"
    return info


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    import torch

    import mm

    out = {"python": platform.python_version(), "torch": torch.__version__, "mm": mm.__version__}
    try:
        out["transformers"] = version("transformers")
    except PackageNotFoundError:
        out["transformers"] = "missing"
    return out


# ---------------------------------------------------------------------- workers
def run_worker(spec: dict[str, Any], *, timeout: float, workdir: Path) -> dict[str, Any]:
    """Run one task in a fresh ``python -m mm.bench.workers`` process; errors come back as data."""
    fd, spec_path = tempfile.mkstemp(suffix=".json", dir=workdir)
    os.close(fd)
    result_path = Path(spec_path).with_suffix(".result.json")
    Path(spec_path).write_text(json.dumps({**spec, "result": str(result_path)}))
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mm.bench.workers", spec_path],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:g} s"}
    finally:
        Path(spec_path).unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    if not result_path.is_file():
        tail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        if proc.returncode < 0:
            tail = f"killed by signal {-proc.returncode} (out of memory?) {tail}"
        return {"error": f"worker exited with status {proc.returncode}: {tail}"}
    result = json.loads(result_path.read_text())
    result_path.unlink()
    result["process_s"] = wall
    if load_before is not None:
        # Other work on the machine distorts timings: keep the 1-minute load average around each run.
        result["load_average"] = [load_before, os.getloadavg()[0]]
    return result


# ---------------------------------------------------------------------- summaries
def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _ok(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in runs if "error" not in r]


def summarise_train(runs, size: BenchSize, peak: float | None) -> dict[str, Any]:
    good = _ok(runs)
    out: dict[str, Any] = {"runs": runs}
    if not good:
        out["error"] = runs[0]["error"] if runs else "not run"
        return out
    # A learning input embedding (mm's placeholder rows) needs gradients through every layer.
    flops = train_step_flops(size, backward_from=0 if good[0]["embeddings_learn"] else None)
    seconds = [s for r in good for s in r["seconds"]]
    median = _median(seconds)
    out.update(
        seconds_per_step=median,
        seconds_min=min(seconds),
        tokens_per_s=sum(size.train_lengths) / median,
        model_flops=flops,
        first_loss=good[0]["first_loss"],
        peak_step_mb=_median([r["memory"]["step_mb"] for r in good]),
        peak_process_mb=_median([r["memory"]["peak_mb"] for r in good]),
        trainable_params=good[0]["trainable_params"],
        load_s=_median([r["load_s"] for r in good]),
        mfu=None if not peak else flops / median / peak,
    )
    return out


def summarise_decode(runs, size: BenchSize, flops: tuple[float, float], peak: float | None) -> dict[str, Any]:
    good = _ok(runs)
    out: dict[str, Any] = {"runs": runs}
    if not good:
        out["error"] = runs[0]["error"] if runs else "not run"
        return out
    prefill = _median([p for r in good for p in r["prefill_s"]])
    decode = _median([d for r in good for d in r["decode_s"]])
    out.update(
        prefill_s=prefill,
        prefill_min_s=min(p for r in good for p in r["prefill_s"]),
        decode_min_s=min(d for r in good for d in r["decode_s"]),
        decode_tokens_per_s=(size.new_tokens - 1) / decode if decode else None,
        tokens=good[0]["tokens"],
        load_s=_median([r["load_s"] for r in good]),
        prefill_mfu=None if not peak else flops[0] / prefill / peak,
        decode_mfu=None if not (peak and decode) else flops[1] / decode / peak,
    )
    return out


def compare(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """mm versus Hugging Face where both figures exist."""
    out: dict[str, Any] = {"targets": TARGETS}
    train, decode = results.get("train", {}), results.get("decode", {})
    mm_t, hf_t = train.get("mm", {}), train.get("hf", {})
    if "seconds_per_step" in mm_t and "seconds_per_step" in hf_t:
        out["train_speedup"] = hf_t["seconds_per_step"] / mm_t["seconds_per_step"]
        out["train_memory_ratio"] = (
            mm_t["peak_step_mb"] / hf_t["peak_step_mb"] if hf_t["peak_step_mb"] > 0 else None
        )
        out["first_loss_abs_diff"] = abs(mm_t["first_loss"] - hf_t["first_loss"])
        out["trainable_params_diff"] = mm_t["trainable_params"] - hf_t["trainable_params"]
    mm_d, hf_d = decode.get("mm", {}), decode.get("hf", {})
    if mm_d.get("decode_tokens_per_s") and hf_d.get("decode_tokens_per_s"):
        out["decode_speedup"] = mm_d["decode_tokens_per_s"] / hf_d["decode_tokens_per_s"]
        out["prefill_speedup"] = hf_d["prefill_s"] / mm_d["prefill_s"]
        out["decode_same_tokens"] = mm_d["tokens"] == hf_d["tokens"]
    return out


# ---------------------------------------------------------------------- the run
def run_bench(
    size_name: str = "small",
    *,
    device: str = "cpu",
    dtype: str = "fp32",
    repeats: int | None = None,
    steps: int | None = None,
    runs: int | None = None,
    figures: Sequence[str] = FIGURES,
    threads: int | None = None,
    timeout: float | None = None,
    workdir: str | os.PathLike | None = None,
    log=print,
) -> dict[str, Any]:
    """Write the checkpoint, measure every figure for mm and Hugging Face alternating, summarise.

    Args:
        size_name: a key of :data:`SIZES`.
        device, dtype: ``cpu``/``cuda`` and ``fp32``/``bf16``.
        repeats: rounds; each round runs one process per implementation and figure.
        steps: timed train steps per process (after one warm-up step).
        runs: timed generations per decode process (after one short warm-up).
        figures: a subset of ``("train", "decode")``.
        threads: ``torch.set_num_threads`` in every worker (default: torch's choice).
        timeout: seconds allowed to each worker process.
        workdir: where the checkpoint is written (default: a temporary folder, removed after); a
            checkpoint an earlier run finished there for the same size and dtype is reused.
        log: called with progress lines.
    """
    size = SIZES[size_name]
    repeats = size.repeats if repeats is None else repeats
    steps = size.train_steps if steps is None else steps
    runs = size.decode_runs if runs is None else runs
    timeout = size.timeout_s if timeout is None else timeout
    unknown = set(figures) - set(FIGURES)
    if unknown:
        raise ValueError(f"unknown figures {sorted(unknown)}; known: {list(FIGURES)}")
    report: dict[str, Any] = {
        "schema": "mm-bench/1",
        "config": {
            "size": size.to_dict(),
            "device": device,
            "dtype": dtype,
            "repeats": repeats,
            "train_steps": steps,
            "decode_runs": runs,
            "threads": threads,
            "figures": list(figures),
        },
        "versions": versions(),
        "hardware": hardware(),
    }
    common = {"size": size_name, "device": device, "dtype": dtype, "threads": threads}
    temp = tempfile.TemporaryDirectory(prefix="mm-bench-") if workdir is None else None
    root = Path(temp.name if temp else workdir)
    root.mkdir(parents=True, exist_ok=True)
    folder = root / f"mllama-{size_name}-{dtype}"
    try:
        report["checkpoint"] = written = _checkpoint(folder, size, common, timeout, root, log)
        if "error" in written:
            report["error"] = "could not write the checkpoint: " + written["error"]
            return report
        n = size.matmul_n if device == "cpu" else 8192
        peak_spec = {**common, "task": "matmul", "matmul_n": n, "trial_s": size.matmul_trial_s}
        # Measured before and after the figures; the higher counts (a shared machine reads low at times).
        peak_runs = [_matmul_peak(peak_spec, "before", timeout, root, log)]
        report["hardware"].update({k: peak_runs[0][k] for k in ("gpu", "gpu_memory_gb") if k in peak_runs[0]})
        raw = _measure_figures(
            figures, repeats, {**common, "folder": str(folder)}, steps, runs, timeout, root, log
        )
        peak_runs.append(_matmul_peak(peak_spec, "after", timeout, root, log))
        _summarise(report, raw, size, peak_runs)
        return report
    finally:
        if temp is not None:
            temp.cleanup()


def _checkpoint(
    folder: Path, size: BenchSize, common: dict, timeout: float, root: Path, log
) -> dict[str, Any]:
    """The random checkpoint both implementations load: reused when an earlier run finished it."""
    written = _reusable_checkpoint(folder, size, common["dtype"])
    if written is not None:
        log(f"reusing the {common['size']} Mllama checkpoint in {folder}")
        return written
    log(f"writing a random {common['size']} Mllama checkpoint to {folder}")
    return run_worker({**common, "task": "write", "folder": str(folder)}, timeout=timeout, workdir=root)


def _matmul_peak(spec: dict, when: str, timeout: float, root: Path, log) -> dict[str, Any]:
    """One measurement of the machine's matmul rate (a worker process of its own)."""
    run = run_worker(spec, timeout=timeout, workdir=root)
    rate = run.get("flops_per_s")
    log(f"matmul peak ({when}): {_flops(rate)}" if rate else f"matmul peak: error {run['error']}")
    return {"when": when, **run}


def _measure_figures(figures, repeats, common, steps, runs, timeout, root, log) -> dict[str, dict[str, list]]:
    """Every figure for both implementations, alternating, ``repeats`` rounds, one process each."""
    raw: dict[str, dict[str, list]] = {f: {i: [] for i in IMPLS} for f in figures}
    for r in range(repeats):
        for figure in figures:
            for impl in IMPLS:
                spec = {**common, "task": figure, "impl": impl}
                spec.update(steps=steps) if figure == "train" else spec.update(runs=runs)
                result = run_worker(spec, timeout=timeout, workdir=root)
                raw[figure][impl].append(result)
                log(f"round {r + 1}/{repeats}  {figure:6s} {impl:2s}  {_progress(figure, result)}")
    return raw


def _summarise(report: dict[str, Any], raw: dict[str, dict[str, list]], size: BenchSize, peak_runs) -> None:
    """Medians, FLOPs, MFU and the mm/HF comparison of the raw runs, into ``report``."""
    rates = [r["flops_per_s"] for r in peak_runs if "flops_per_s" in r]
    peak = max(rates) if rates else None
    report["matmul_peak"] = {"flops_per_s": peak, "runs": peak_runs}
    flops_decode = decode_flops(size)
    results: dict[str, dict[str, Any]] = {}
    if "train" in raw:
        results["train"] = {impl: summarise_train(raw["train"][impl], size, peak) for impl in IMPLS}
    report["flops"] = {
        "train_step": {impl: results.get("train", {}).get(impl, {}).get("model_flops") for impl in IMPLS},
        "prefill": flops_decode[0],
        "decode": flops_decode[1],
        "peak_flops_per_s": peak,
    }
    if "decode" in raw:
        results["decode"] = {
            impl: summarise_decode(raw["decode"][impl], size, flops_decode, peak) for impl in IMPLS
        }
    report["results"] = results
    report["comparison"] = compare(results)
    every = [r for fig in raw.values() for runs_ in fig.values() for r in runs_]
    seen = [r["torch_threads"] for r in every if "torch_threads" in r]
    report["hardware"]["torch_threads"] = seen[0] if seen else None
    loads = [x for r in every for x in r.get("load_average", [])]
    report["load_average_max"] = max(loads) if loads else None


def _reusable_checkpoint(folder: Path, size: BenchSize, dtype: str) -> dict[str, Any] | None:
    """What an earlier run wrote in ``folder``, if it finished writing this size at this dtype."""
    try:
        marker = json.loads((folder / WRITTEN_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if marker.get("size") != json.loads(json.dumps(size.to_dict())) or marker.get("dtype") != dtype:
        return None
    return {"reused": True, "params": marker.get("params")}


def _flops(value: float | None) -> str:
    return "-" if value is None else f"{value / 1e9:.1f} GFLOP/s"


def _progress(figure: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return "error: " + result["error"].strip().splitlines()[-1][:200]
    if figure == "train":
        seconds = ", ".join(f"{s:.3f}" for s in result["seconds"])
        return (
            f"s/step {seconds}  loss {result['first_loss']:.5f}  peak +{result['memory']['step_mb']:.0f} MB"
        )
    return (
        "prefill "
        + ", ".join(f"{s:.3f}" for s in result["prefill_s"])
        + " s  decode "
        + ", ".join(f"{s:.3f}" for s in result["decode_s"])
        + " s"
    )


# ---------------------------------------------------------------------- the table
def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt == "%":
        return f"{100 * value:.2f}%"
    return format(value, fmt)


def format_table(report: dict[str, Any]) -> str:
    """The figures side by side, with mm's ratio to Hugging Face and the issue's target."""
    cfg, hw = report["config"], report["hardware"]
    where = hw.get("gpu") or (
        f"{hw.get('cpu')}, {hw.get('cpus_usable', hw.get('cpu_cores'))} cores, "
        f"{hw.get('torch_threads')} torch threads"
    )
    lines = [
        f"mm bench --size {cfg['size']['name']} --device {cfg['device']} --dtype {cfg['dtype']}"
        f"  ({where}; torch {report['versions']['torch']}, transformers {report['versions']['transformers']})"
    ]
    if "error" in report:
        return "\n".join([*lines, "error: " + report["error"]])
    peak = report.get("flops", {}).get("peak_flops_per_s")
    lines.append(f"matmul peak ({cfg['dtype']}): {_flops(peak)}; {cfg['repeats']} round(s), medians")
    busy = report.get("load_average_max")
    cores = hw.get("cpus_usable") or hw.get("cpu_cores") or 1
    if cfg["device"] == "cpu" and busy is not None and busy > cores + 0.5:
        lines.append(
            f"warning: the machine was busy (1-minute load average up to {busy:.1f} on {cores} cores); "
            "timings are unreliable"
        )
    res, cmp = report.get("results", {}), report.get("comparison", {})
    train, decode = res.get("train", {}), res.get("decode", {})

    def ratio(key: str, better: str) -> str:
        value = cmp.get(key)
        if value is None:
            return "-"
        target = TARGETS.get(key)
        if target is None:
            return f"{value:.2f}x"
        met = value >= target if better == "high" else value <= target
        sign = ">=" if better == "high" else "<="
        return f"{value:.2f}x ({sign} {target}: {'met' if met else 'not met'})"

    rows: list[tuple[str, str, str, str]] = []

    def add(label: str, part: dict, key: str, fmt: str, note: str = "") -> None:
        cells = []
        for impl in IMPLS:
            entry = part.get(impl, {})
            cells.append("error" if "error" in entry else _cell(entry.get(key), fmt))
        rows.append((label, *cells, note))

    if train:
        tokens = sum(cfg["size"]["train_lengths"])
        add("train step, s", train, "seconds_per_step", ".3f", ratio("train_speedup", "high") + " speed")
        add(f"train tokens/s ({tokens} tokens)", train, "tokens_per_s", ".0f")
        add(
            "train peak memory, MB over weights",
            train,
            "peak_step_mb",
            ".0f",
            ratio("train_memory_ratio", "low"),
        )
        add("train peak process memory, MB", train, "peak_process_mb", ".0f")
        add("train MFU", train, "mfu", "%")
        diff = cmp.get("first_loss_abs_diff")
        add("first-step loss", train, "first_loss", ".6f", "" if diff is None else f"|diff| {diff:.2e}")
        add("trainable parameters", train, "trainable_params", ",d")
    if decode:
        same = cmp.get("decode_same_tokens")
        add("prefill, s", decode, "prefill_s", ".4f", ratio("prefill_speedup", "high") + " speed")
        add("decode tokens/s", decode, "decode_tokens_per_s", ".1f", ratio("decode_speedup", "high"))
        add("prefill MFU", decode, "prefill_mfu", "%")
        add("decode MFU", decode, "decode_mfu", "%", "" if same is None else f"same greedy tokens: {same}")
    load = {impl: {"load_s": (train or decode).get(impl, {}).get("load_s")} for impl in IMPLS}
    add("load checkpoint, s", load, "load_s", ".2f")
    header = ("figure", "mm", "Hugging Face", "mm vs HF")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        lines.append(
            f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}".rstrip()
        )
    for figure, part in res.items():
        for impl in IMPLS:
            if "error" in part.get(impl, {}):
                lines.append(f"{figure} {impl} error: {part[impl]['error'].strip().splitlines()[-1]}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line
def run_bench_command(args: argparse.Namespace) -> int:
    """``mm bench`` (arguments: :mod:`mm.cli`)."""
    from importlib.util import find_spec

    try:
        missing = find_spec("transformers") is None
    except ValueError:  # present in sys.modules without a spec: a stub
        missing = True
    if missing:
        print(
            "mm bench: needs Hugging Face transformers to compare against "
            "(pip install 'transformers>=4.45'); mm itself never uses it.",
            file=sys.stderr,
        )
        return 2
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("mm bench: --device cuda, but torch sees no CUDA device", file=sys.stderr)
            return 2
    figures = [f.strip() for f in args.figures.split(",") if f.strip()]
    if not figures or set(figures) - set(FIGURES):
        print(f"mm bench: --figures takes a comma-separated subset of {','.join(FIGURES)}", file=sys.stderr)
        return 2
    report = run_bench(
        args.size,
        device=args.device,
        dtype=args.dtype,
        repeats=args.repeats,
        steps=args.steps,
        runs=args.runs,
        figures=figures,
        threads=args.threads,
        timeout=args.timeout,
        workdir=args.workdir,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    report["command"] = "mm " + " ".join(sys.argv[1:])
    out = Path(args.out or f"mm-bench-{args.size}-{args.device}-{args.dtype}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"results: {out}")
    return 1 if "error" in report else 0
