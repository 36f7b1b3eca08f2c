"""``mm bench --serve``: what continuous batching in ``mm serve`` buys, measured through its HTTP API.

Runs inside one ``mm.bench.workers`` process (task ``serve``): a random-weight model of the ``tiny``
preset with the byte tokenizer is saved, ``mm serve`` serves it from a process of its own on
127.0.0.1 (``--max-batch-size`` the most clients), and client threads of the worker send streamed
chat completions over HTTP.

* **Requests**: ``requests`` fixed prompts, every other one with a fixed random image (PNG data
  URL), greedy, ``max_tokens`` each. The model cannot stop early (the rows of its stop tokens and of
  every non-printable byte in the output head are zero, so greedy picks a printable byte), so every
  request decodes exactly ``max_tokens`` tokens (read back from ``usage``).
* **Aggregate tokens/s** at 1, 4, 8 and 16 concurrent clients: the same requests, each client
  taking the next one when its last finished; completion tokens over the wall time from the first
  send to the last finish. One client is the requests sent one at a time; every ratio is against it.
* **Time to first token** (TTFT): from sending to the first chunk with text. Mid-batch: one probe
  request is sent while ``clients - 1`` long requests are decoding, against the same probe sent
  alone (best of three alone, so the ratio is not flattered).
* **Repeats**: the levels run ``repeats`` times, interleaved (1, 4, 8, 16 clients, then again), and
  so does the mid-batch probe; each figure is the run with the median value, every run's value
  listed beside it (an 8-client level lasts about a third of a second here, so one run moves with
  whatever else the machine does).

Shapes do not appear here: everything is HTTP.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

from mm.serving.limits import ServerLimits

__all__ = ["SERVE_CLIENTS", "SERVE_TARGETS", "serve_bench"]

SERVE_CLIENTS = (1, 4, 8, 16)
# Issue 21, item 1 (CPU): aggregate tokens/s at 8 clients vs one at a time; TTFT mid-batch vs alone.
SERVE_TARGETS = {"serve_speedup_8": 4.0, "serve_ttft_mid_batch_ratio": 2.0}


# ---------------------------------------------------------------------- the served model
def _save_model(folder: str, seed: int = 0) -> None:
    import torch

    from mm import ModelConfig, MultimodalModel
    from mm.datasets import ImageProcessor
    from mm.datasets.preprocessing import Preprocessor
    from mm.text_backbone import ByteTokenizer

    torch.manual_seed(seed)
    model = MultimodalModel(ModelConfig.preset("tiny")).eval()
    tokenizer = ByteTokenizer()
    with torch.no_grad():
        never = [i for i in range(model.config.text.vocab_size) if not 32 <= i < 127]
        model.backbone.lm_head.weight[never] = 0.0  # printable bytes only: never stops, always text
        for block in model.image_blocks:  # open gates: the image changes the answer
            block.attn_gate.uniform_(-1.0, 1.0)
            block.mlp_gate.uniform_(-1.0, 1.0)
    encoder = model.config.image_encoder
    model.preprocessor = Preprocessor(
        tokenizer, ImageProcessor(tile_size=encoder.image_size, max_tiles=encoder.max_num_tiles)
    )
    model.save_pretrained(folder, copy_backbone=True)


def _image_url(seed: int, side: int = 40) -> str:
    import torch
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def bench_requests(count: int, max_tokens: int) -> list[dict[str, Any]]:
    """The fixed request bodies: every other one carries an image."""
    out = []
    for k in range(count):
        content: list[dict[str, Any]] = [{"type": "text", "text": f"Request {k}: describe item {k % 7}."}]
        if k % 2 == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": _image_url(k)}})
        out.append(
            {
                "model": "bench",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
    return out


# ---------------------------------------------------------------------- one streamed request
def send(port: int, body: dict[str, Any], timeout: float = 600.0, on_first=None) -> dict[str, Any]:
    """POST one streamed chat completion; ``{"ttft_s", "total_s", "tokens", "text", "start", "end"}``
    (``on_first`` is called when the first text arrives)."""
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    start = time.perf_counter()
    ttft, tokens, text = None, None, []
    try:
        conn.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"server error: {event['error']}")
            for choice in event.get("choices") or ():
                piece = choice.get("delta", {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                        if on_first is not None:
                            on_first()
                    text.append(piece)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    finally:
        conn.close()
    end = time.perf_counter()
    if tokens is None:
        raise RuntimeError("the stream carried no usage")
    return {"ttft_s": ttft, "total_s": end - start, "tokens": tokens, "text": "".join(text), "start": start,
            "end": end}  # fmt: skip


def run_clients(port: int, bodies: Sequence[dict[str, Any]], clients: int) -> dict[str, Any]:
    """Send ``bodies`` from ``clients`` threads, each taking the next body when its last finished."""
    results: list[dict[str, Any] | None] = [None] * len(bodies)
    errors: list[str] = []
    lock = threading.Lock()
    order = iter(range(len(bodies)))

    def client() -> None:
        while True:
            with lock:
                k = next(order, None)
            if k is None or errors:
                return
            try:
                results[k] = send(port, bodies[k])
            except Exception as e:  # reported with the figure
                errors.append(f"request {k}: {e}")

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        return {"clients": clients, "error": errors[0]}
    done = [r for r in results if r is not None]
    tokens = sum(r["tokens"] for r in done)
    return {
        "clients": clients,
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_median_s": statistics.median(r["ttft_s"] for r in done),
        "ttft_max_s": max(r["ttft_s"] for r in done),
        "texts": [r["text"] for r in done],
    }


def mid_batch_ttft(port: int, probe: dict[str, Any], long: dict[str, Any], others: int) -> dict[str, Any]:
    """TTFT of ``probe`` sent while ``others`` copies of ``long`` are decoding, and alone (best of 3)."""
    alone = [send(port, probe)["ttft_s"] for _ in range(3)]
    running: list[dict[str, Any]] = []
    decoding = threading.Semaphore(0)
    threads = [
        threading.Thread(target=lambda: running.append(send(port, long, on_first=decoding.release)))
        for _ in range(others)
    ]
    for t in threads:
        t.start()
    for _ in range(others):  # every long request has its first token: the batch is decoding
        if not decoding.acquire(timeout=120):
            raise RuntimeError("the long requests did not start decoding within 120 s")
    during = send(port, probe)
    for t in threads:
        t.join()
    if len(running) != others:
        raise RuntimeError("a long request failed")
    first_end = min(r["end"] for r in running)
    return {
        "alone_s": min(alone),
        "alone_runs_s": alone,
        "mid_batch_s": during["ttft_s"],
        "ratio": during["ttft_s"] / min(alone),
        "batch_rows": others,
        # The probe really arrived mid-batch: the long requests were still decoding when it finished.
        "arrived_mid_batch": first_end > during["end"],
    }


# ---------------------------------------------------------------------- the task
def serve_bench(spec: dict[str, Any]) -> dict[str, Any]:
    """The ``serve`` task of :mod:`mm.bench.workers` (spec: ``requests``, ``max_tokens``,
    ``clients``, ``long_tokens``, ``repeats``, ``threads``)."""
    clients = tuple(int(c) for c in spec.get("clients", SERVE_CLIENTS))
    count = int(spec.get("requests", 32))
    max_tokens = int(spec.get("max_tokens", 32))
    long_tokens = int(spec.get("long_tokens", 256))
    repeats = int(spec.get("repeats", 3))
    batch = max(clients)
    with tempfile.TemporaryDirectory(prefix="mm-bench-serve-") as folder:
        _save_model(folder)
        with _served(folder, spec.get("threads"), max_batch_size=batch, max_concurrent=2 * batch + 2) as port:
            bodies = bench_requests(count, max_tokens)
            run_clients(port, bodies[:2], 2)  # warm-up: first calls, first batch
            runs = [run_clients(port, bodies, c) for _ in range(repeats) for c in clients]
            base = next((lv for lv in runs if lv["clients"] == 1 and "error" not in lv), None)
            if base is not None:  # batched greedy answers equal one-at-a-time ones, in every run
                for lv in runs:
                    if "error" not in lv:
                        lv["same_answers_as_alone"] = lv["texts"] == base["texts"]
            probe = bodies[1]  # text-only, short
            long = {**bodies[0], "max_tokens": long_tokens}
            mids = [mid_batch_ttft(port, probe, long, others=7) for _ in range(repeats)]
    for lv in runs:
        lv.pop("texts", None)
    levels = [_median_run([lv for lv in runs if lv["clients"] == c], "tokens_per_s") for c in clients]
    return {
        "levels": levels,
        "mid_batch": _median_run(mids, "ratio", lower_is_better=True),
        "repeats": repeats,
        "requests": count,
        "max_tokens": max_tokens,
        "image_requests": sum(1 for k in range(count) if k % 2 == 0),
        "model": "tiny preset (random weights, byte tokenizer)",
        "server": "mm serve in a process of its own",
        "max_batch_size": batch,
        "max_join_wait_s": ServerLimits().max_join_wait_s,
        "torch_threads": spec.get("threads"),
    }


def _median_run(runs: list[dict[str, Any]], key: str, *, lower_is_better: bool = False) -> dict[str, Any]:
    """The run whose ``key`` is the median (of an even count, the worse of the two middle ones), with
    every run's ``key`` as ``{key}_runs``; the first error if any run failed."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(runs, key=lambda r: r[key])
    out = dict(ordered[len(ordered) // 2 if lower_is_better else (len(ordered) - 1) // 2])
    out[f"{key}_runs"] = [r[key] for r in runs]
    if "same_answers_as_alone" in out:
        out["same_answers_as_alone"] = all(r.get("same_answers_as_alone") for r in runs)
    if "arrived_mid_batch" in out:
        out["arrived_mid_batch"] = all(r["arrived_mid_batch"] for r in runs)
    return out


@contextmanager
def _served(folder: str, threads: int | None, *, max_batch_size: int, max_concurrent: int):
    """``mm serve FOLDER`` in a subprocess on a free local port (so clients and server share no GIL)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    command = [sys.executable, "-m", "mm.cli", "serve", "--model", folder, "--model-id", "bench"]
    command += ["--port", str(port)]
    command += ["--max-batch-size", str(max_batch_size), "--max-concurrent-requests", str(max_concurrent)]
    command += ["--log-level", "warning"]
    log = open(os.path.join(folder, "serve.log"), "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.perf_counter() + 180
        while not _healthy(port):
            if proc.poll() is not None:
                with open(log.name) as f:
                    tail = f.read()[-2000:]
                raise RuntimeError(f"mm serve exited with status {proc.returncode}: {tail}")
            if time.perf_counter() > deadline:
                raise RuntimeError("mm serve did not answer /health within 180 s")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/health")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def summarise_serve(result: dict[str, Any]) -> dict[str, Any]:
    """Ratios against one client: aggregate tokens/s and TTFT; the mid-batch TTFT ratio."""
    if "error" in result:
        return result
    levels = {lv["clients"]: lv for lv in result["levels"]}
    base = levels.get(1)
    out = {**result, "speedup": {}}
    if base and "error" not in base:
        for c, lv in levels.items():
            if "error" not in lv:
                out["speedup"][str(c)] = lv["tokens_per_s"] / base["tokens_per_s"]
    return out
