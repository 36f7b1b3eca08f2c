"""Training tokens/s with packed rows against padded batches, on a long-tailed length mix.

Lengths: a log-normal with median 150 tokens and sigma 0.9 (fixed seed), rounded and clipped to
[40, 1000] — most samples short, a few near the limit, as fine-tuning data are. Both modes train
on the same samples in the same order, with the same model and optimiser:

* padded: consecutive groups of ``batch_size`` samples, right-padded to the longest of the group
  (:meth:`~mm.datasets.preprocessing.Preprocessor.collate`, the trainer's collator), every
  position computed, padding included (``backbone.unpad_padding = False``);
* unpadded: the same padded batches as mm runs them by default, each one as a packed row of its
  real tokens (:mod:`mm.text_backbone.unpad`);
* packed: all samples packed first-fit decreasing into rows of ``max_len`` tokens
  (:func:`mm.training.packing.pack_samples`), rows grouped into as many steps as the padded mode
  takes, so a step holds the same number of real tokens on average.

The model is the ``tiny`` preset's structure at the given width and depth (byte-level vocabulary,
no images in the samples); what learns is the ``<|image|>`` placeholder row each sample starts
with, so the backward pass runs through every frozen backbone layer, as it does for mm's adapter
stages. Only real tokens count in tokens/s, never padding.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import numpy as np
import torch

from mm.datasets.preprocessing import EncodedSample, Preprocessor
from mm.text_backbone import ByteTokenizer
from mm.training.packing import collate_packed, pack_samples

__all__ = ["long_tailed_lengths", "packing_throughput"]


def long_tailed_lengths(
    num: int, *, seed: int = 0, median: float = 150.0, sigma: float = 0.9, low: int = 40, high: int = 1000
) -> list[int]:
    """``num`` sample lengths: log-normal (``median``, ``sigma``) rounded and clipped to [low, high]."""
    rng = np.random.default_rng(seed)
    raw = rng.lognormal(mean=math.log(median), sigma=sigma, size=num)
    return np.clip(np.rint(raw), low, high).astype(int).tolist()


def _samples(lengths: list[int], tokenizer: ByteTokenizer, seed: int) -> list[EncodedSample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = [tokenizer.bos_id, tokenizer.image_id] + torch.randint(0, 256, (n - 2,), generator=g).tolist()
        out.append(EncodedSample(ids=ids, labels=[-100, -100] + ids[2:]))
    return out


def _collate_step(
    preprocessor: Preprocessor, samples: list[EncodedSample], rows: list[list[int]]
) -> dict[str, Any]:
    """:func:`collate_packed` of some rows, their samples renumbered from 0."""
    chosen = [i for row in rows for i in row]
    renumbered, k = [], 0
    for row in rows:
        renumbered.append(list(range(k, k + len(row))))
        k += len(row)
    return collate_packed(preprocessor, [samples[i] for i in chosen], renumbered)


def _train(model, batches: list[dict[str, Any]], optimizer, *, unpad: bool = True) -> float:
    """Seconds to run one optimiser step per batch (``unpad``: the backbone's ``unpad_padding``)."""
    model.backbone.unpad_padding = unpad
    start = time.perf_counter()
    for batch in batches:
        out = model(**batch, return_logits=False)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def packing_throughput(
    *,
    num_samples: int = 64,
    batch_size: int = 8,
    max_len: int = 1000,
    embed_dim: int = 256,
    num_layers: int = 4,
    seed: int = 0,
    threads: int | None = None,
    repeats: int = 1,
) -> dict[str, Any]:
    """Measure training tokens/s, packed against padded, on the same long-tailed samples.

    Args:
        num_samples: samples trained on in each mode.
        batch_size: samples per padded step.
        max_len: packed row length (and the longest sample).
        embed_dim, num_layers: backbone size (heads of 64 channels, 2 of them key/value heads
            when there are 4 or more; SwiGLU width ``8/3 d`` rounded up to 16).
        seed: lengths, tokens and weights.
        threads: ``torch.set_num_threads`` for the measurement (``None``: unchanged).
        repeats: timed passes of each mode, alternating; the fastest of each counts (a shared
            machine's load spikes hit both modes alike).

    Returns:
        ``tokens_per_s`` per mode (``padded``, ``unpadded``, ``packed``), ``speedup`` (packed over
        padded), ``unpadded_speedup`` (unpadded over padded), ``real_tokens``, ``steps``,
        ``padded_tokens`` (tokens each layout holds, padding included), and the settings.
    """
    from mm import ModelConfig, MultimodalModel

    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    heads = max(1, embed_dim // 64)
    text = dataclasses.replace(
        ModelConfig.preset("tiny").text,
        embed_dim=embed_dim,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=2 if heads >= 4 else heads,
        head_dim=None,
        intermediate_dim=-(-8 * embed_dim // 3 // 16) * 16,
        max_seq_len=max(2048, max_len),
    )
    # The tiny image encoder and blocks are built but never run: the samples carry no images.
    config = ModelConfig.preset("tiny").replace(
        text=text, cross_attention_layers=None, cross_attention_intermediate_dim=None
    )
    model = MultimodalModel(config).train()
    trainable = [p for p in model.extra_embeddings.parameters()]
    for p in trainable:
        p.requires_grad_(True)
    tokenizer = ByteTokenizer()
    preprocessor = Preprocessor(tokenizer, max_seq_len=max(2048, max_len))
    lengths = long_tailed_lengths(num_samples, seed=seed, high=max_len)
    samples = _samples(lengths, tokenizer, seed)

    padded = [preprocessor.collate(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)]
    rows = pack_samples(lengths, max_len)
    per_step = math.ceil(len(rows) / len(padded))
    packed = [
        _collate_step(preprocessor, samples, rows[i : i + per_step]) for i in range(0, len(rows), per_step)
    ]

    result: dict[str, Any] = {
        "lengths": f"log-normal median 150 sigma 0.9, clipped to [40, {max_len}], seed {seed}",
        "num_samples": num_samples,
        "real_tokens": sum(lengths),
        "mean_length": sum(lengths) / len(lengths),
        "max_length": max(lengths),
        "batch_size": batch_size,
        "max_len": max_len,
        "embed_dim": embed_dim,
        "num_layers": num_layers,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "steps": {"padded": len(padded), "packed": len(packed)},
        "rows": {"padded": sum(b["input_ids"].shape[0] for b in padded), "packed": len(rows)},
        "padded_tokens": {
            "padded": sum(b["input_ids"].numel() for b in padded),
            "packed": sum(b["input_ids"].numel() for b in packed),
        },
    }
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    # Warm up each mode on its first step (allocator, kernels), then time a full pass.
    modes = {"padded": (padded, False), "unpadded": (padded, True), "packed": (packed, True)}
    for batches, unpad in modes.values():
        _train(model, batches[:1], optimizer, unpad=unpad)
    seconds = dict.fromkeys(modes, math.inf)
    for _ in range(repeats):
        for mode, (batches, unpad) in modes.items():
            seconds[mode] = min(seconds[mode], _train(model, batches, optimizer, unpad=unpad))
    model.backbone.unpad_padding = True
    result["seconds"] = seconds
    tps = result["tokens_per_s"] = {k: result["real_tokens"] / v for k, v in seconds.items()}
    result["speedup"] = tps["packed"] / tps["padded"]
    result["unpadded_speedup"] = tps["unpadded"] / tps["padded"]
    return result
