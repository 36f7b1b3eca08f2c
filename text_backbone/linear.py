"""The linear layer of the backbone, its adapters and the image encoder: fp32 products on the CPU
through oneDNN, and decoding's few-row case spread over threads.

Shapes: r rows (tokens), k input features, n output features, p parts.

**oneDNN.** PyTorch computes an fp32 ``F.linear`` on the CPU with MKL, and the MKL it ships picks
its AVX2 kernels on AMD processors even where AVX-512 is there: on the 2-core AMD EPYC of the
note below a square fp32 product runs at about 222 GFLOP/s, where oneDNN (also inside every x86
PyTorch, as ``torch.ops.mkldnn._linear_pointwise``, the op Inductor's CPU code calls) reaches
about 490. :func:`linear` therefore computes fp32 CPU products of at least :data:`MIN_WEIGHT`
weights through oneDNN, in training too (its backward pass is two more oneDNN products: the input's
gradient ``g @ W`` and the weight's ``g^T @ x``). Each output is the same dot product summed in
another order, so it equals ``F.linear``'s up to fp32 rounding; one row's result does not depend on
the other rows of the call. ``MM_ONEDNN_LINEAR=0`` in the environment (or
:data:`ONEDNN` set to False) keeps ``F.linear``.

**Few rows.** A decoded token multiplies one row (or one per batched request) by every weight
matrix, and on the CPU that product is bound by the speed at which the matrix is read from memory.
PyTorch's fp32 ``F.linear`` of so few rows runs on one thread however many threads torch has, and
reads about 15 GB/s on the 2-core machine of the note below, where a plain read streams at over
40 GB/s. Up to :data:`AS_COLUMNS` rows (:data:`FEW_ROWS` without oneDNN), :func:`linear` splits
the matrix's rows into ``p`` equal parts (twice torch's thread count) and multiplies them as one
batched product, which PyTorch spreads across its threads: up to :data:`AS_COLUMNS` rows as
``W @ x^T`` (the faster form for one to four rows), more as ``x @ W^T``. That needs no bias, no
gradient wanted and a contiguous weight.

**Packed weights.** Given a plain weight, oneDNN first copies it into the blocked layout its kernel
reads, on every call, and with few rows that copy costs as much as the product: on the 2-core AMD
EPYC of the note below the 70 matrices take 11.0 ms at 5 rows where the same products from weights
copied once take 6.3 ms (8 rows 11.9 -> 7.5, 16 rows 13.8 -> 9.6, 64 rows 30.7 -> 27.5). In
inference mode (generation, ``mm serve``, batched chat), :func:`linear` therefore keeps each weight's
blocked copy (:func:`packed`) and multiplies by it while the weight is unchanged (same tensor,
storage and version counter; an in-place update, ``load_state_dict`` or a swapped ``.data`` makes a
new copy). A product by the copy gives the plain weight's values bit for bit (the same kernel sums
in the same order; tested), and copies serve only products of more than :data:`AS_COLUMNS` rows.
They cost a second copy of the weights multiplied that way, at most :data:`PACK_BYTES` in all (a
quarter of the machine's memory unless ``MM_ONEDNN_PACK_BYTES`` says otherwise, ``0`` for none); a
weight beyond that is multiplied plain. Outside inference mode nothing is copied: a trainable
weight changes every step, and with a training step's hundreds of rows the copy made inside oneDNN
costs little (measured: no gain on ``mm bench --size small-4k``'s step).

**Weights side by side.** A layer's q, k and v projections read the same input, and so do an MLP's
gate and up projections. In inference mode :func:`linear_parts` (and :func:`project`, for layers)
multiplies such weights as one: its kept copy is the weights stacked (``[n1 + n2 + ..., k]``), and
each part of the one output is a view equal to its own product bit for bit (tested for the
bench's groups at 5 to 288 rows). With 64 rows the image encoder's three 256 x 256 products take
562 us as one against 591, the backbone's q, k and v 239 against 313 and gate and up 1053 against
1112; ``mm bench --size small``'s prefill went from 57.3 to 56.2 ms (medians of 30, alternated in one
process).

Everything else (GPUs, bf16, CPU autocast, matrices under :data:`MIN_WEIGHT` elements, which stay
in cache and include every matrix of the ``tiny`` presets) is ``F.linear``.

**Intel processors.** MKL runs its AVX-512 kernels on Intel processors only, and there ``F.linear``
is as fast as or faster than both paths above, so on an Intel CPU (``vendor_id`` ``GenuineIntel``)
:data:`ONEDNN` and :data:`SPLIT` are off and every product is ``F.linear``. Measured on 2 threads of
an Intel Xeon with AVX-512 and AMX (the 70 matrices below, milliseconds, ``F.linear`` / split /
oneDNN): 1 row 6.2 / 14.6 / 7.9, 4 rows 8.9 / 15.2 / 11.0, 8 rows 10.7 / 10.0 / 11.9, 16 rows
13.7 / 16.0 / 12.1, 64 rows 25.4 / - / 21.5, 288 rows 71.8 / - / 84.7; a square product of 2048:
335 GFLOP/s by MKL, 302 by oneDNN. oneDNN's lead at 16 and 64 rows did not hold in a later session
(8 to 288 rows within run-to-run noise of ``F.linear``, e.g. 64 rows 26.4 and 20.8 ms against 25.2).

Measured (torch 2.14, MKL 2024.2, oneDNN 3.12, 2 threads of an AMD EPYC with AVX-512): one product
with each of 70 matrices shaped like the ``mm bench --size small`` backbone's (10 layers of q, k,
v, o and the MLP's three; 136 MB, so every read comes from memory), milliseconds for the 70,
``F.linear`` / split / oneDNN: 1 row 8.0 / 3.3 / 3.8, 2 rows 11.0 / 3.9 / 4.9, 4 rows 12.7 /
4.0 / 5.1, 8 rows 9.4 / 7.7 / 5.7, 16 rows 11.6 / 10.1 / 6.6, 64 rows 25.8 / - / 12.7, 288 rows
88.7 / - / 53.1. A training-shaped product (640 x 512 by 512 x 1792): forward 6.4 -> 2.5 ms,
input gradient 5.4 -> 2.5 ms, weight gradient 5.4 -> 3.0 ms.
"""

from __future__ import annotations

import os
import platform
import threading
import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "AS_COLUMNS",
    "FEW_ROWS",
    "MIN_WEIGHT",
    "ONEDNN",
    "ONEDNN_OK",
    "PACK_BYTES",
    "SPLIT",
    "Linear",
    "linear",
    "linear_parts",
    "packed",
    "project",
]

FEW_ROWS = 16  # without oneDNN, up to this many rows the split product is faster
AS_COLUMNS = 4  # up to this many rows, W @ x^T (and, with oneDNN, the most rows split)
MIN_WEIGHT = 1 << 16  # elements (256 KB in fp32)
_PLAIN = (torch.Tensor, nn.Parameter)  # not DTensors, fake or other tensor subclasses


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight^T (+ bias)`` by oneDNN; strided operands are read in place."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_available() -> bool:
    """The op is there (x86 builds with oneDNN), not switched off, and gives F.linear's values."""
    if not (
        os.environ.get("MM_ONEDNN_LINEAR", "1") != "0"
        and platform.machine().lower() in ("x86_64", "amd64")
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    try:
        x = torch.linspace(-1.0, 1.0, 24).view(3, 8)
        w = torch.linspace(-2.0, 2.0, 40).view(5, 8)
        return bool(torch.allclose(_onednn(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5))
    except (RuntimeError, NotImplementedError):  # an op this build cannot run
        return False


def _packing_available() -> bool:
    """oneDNN's weight copy op is there, and a product by the copy equals the plain weight's."""
    if not (ONEDNN_OK and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        x = torch.linspace(-1.0, 1.0, 48).view(6, 8)
        w = torch.linspace(-2.0, 2.0, 40).view(5, 8)
        return bool(torch.equal(_onednn(x, torch.ops.mkldnn._reorder_linear_weight(w, 64)), _onednn(x, w)))
    except (RuntimeError, NotImplementedError):
        return False


def cpu_vendor() -> str:
    """The processor's vendor id (``GenuineIntel``, ``AuthenticAMD``) from ``/proc/cpuinfo``, or ``""``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def policy(vendor: str, onednn_ok: bool) -> tuple[bool, bool]:
    """``(oneDNN, split)``: which of the module docstring's paths to take on a processor of ``vendor``
    (none on Intel, where MKL runs its AVX-512 kernels and ``F.linear`` is fastest)."""
    if vendor == "GenuineIntel":
        return False, False
    return onednn_ok, True


def _pack_budget() -> int:
    """Bytes of packed weight copies allowed: ``MM_ONEDNN_PACK_BYTES``, else a quarter of the memory."""
    given = os.environ.get("MM_ONEDNN_PACK_BYTES")
    if given is not None:
        try:
            return max(0, int(given))
        except ValueError:
            raise ValueError(f"MM_ONEDNN_PACK_BYTES must be a whole number of bytes, got {given!r}") from None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (ValueError, OSError, AttributeError):  # no sysconf (e.g. Windows): no copies
        return 0


ONEDNN_OK = _onednn_available()  # the op runs here and gives F.linear's values
PACK_BYTES = _pack_budget() if _packing_available() else 0  # kept weight copies at most (docstring)
# fp32 CPU products through oneDNN, and few-row products split over the threads (module docstring)
ONEDNN, SPLIT = policy(cpu_vendor(), ONEDNN_OK)


def _cpu_fp32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Plain fp32 CPU operands, a weight of at least :data:`MIN_WEIGHT` elements, no CPU autocast:
    the products :func:`linear` and :func:`linear_parts` take past ``F.linear``."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and weight.numel() >= MIN_WEIGHT
        and type(x) in _PLAIN
        and type(weight) in _PLAIN
        and (bias is None or (bias.dtype == torch.float32 and type(bias) in _PLAIN))
        and not torch.is_autocast_enabled("cpu")  # bf16 autocast: F.linear, as asked
    )


def _keeps_copies(x: torch.Tensor) -> bool:
    """Whether a product of ``x`` goes by kept weight copies (:func:`packed`): more than
    :data:`AS_COLUMNS` rows in inference mode, outside ``torch.compile``."""
    return (
        x.numel() > AS_COLUMNS * x.shape[-1]
        and torch.is_inference_mode_enabled()
        and not torch.compiler.is_compiling()
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; ``x [..., k]``, ``weight [n, k]`` -> ``[..., n]``."""
    if not (ONEDNN or SPLIT):  # e.g. on an Intel processor: nothing to decide
        return F.linear(x, weight, bias)
    n, k = weight.shape
    if not _cpu_fp32(x, weight, bias):
        return F.linear(x, weight, bias)
    grad = torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    parts = 2 * torch.get_num_threads()
    if (
        SPLIT
        and not grad
        and bias is None
        and parts > 2
        and weight.is_contiguous()
        and n % parts == 0
        and x.numel() <= (AS_COLUMNS if ONEDNN else FEW_ROWS) * k
    ):
        split = weight.view(parts, n // parts, k)  # [p, n/p, k]
        # Row-major rows: MKL's batched product of W by a column-major x^T of 2 to 4 columns is
        # 5x slower (340 against 63 us for 512 x 1792 and 2 rows), and so the output is made
        # row-major too, or the layout would carry into the next layer's input.
        rows = x.reshape(-1, k).contiguous()  # [r, k]
        if rows.shape[0] <= AS_COLUMNS:
            out = torch.bmm(split, rows.t().expand(parts, k, -1))  # [p, n/p, r]
            return out.view(n, -1).t().contiguous().view(*x.shape[:-1], n)
        out = torch.bmm(rows.expand(parts, -1, k), split.transpose(1, 2))  # [p, r, n/p]
        return out.transpose(0, 1).reshape(*x.shape[:-1], n)
    if not ONEDNN:
        return F.linear(x, weight, bias)
    if grad:
        return _OneDNNLinear.apply(x, weight, bias)
    if _keeps_copies(x):
        copy = packed(weight)
        if copy is not None:
            return _onednn(x, copy, bias)
    return _onednn(x, weight, bias)


class _Kept(NamedTuple):
    """A blocked copy of one weight, or of several side by side, and what they were when it was made."""

    refs: tuple[weakref.ref, ...]
    state: tuple[tuple[int, int], ...]  # each weight's (storage, version)
    copy: torch.Tensor
    size: int


# id(weight) -> its copy; a tuple of ids -> the copy of those weights stacked (linear_parts)
_PACKED: dict[int | tuple[int, ...], _Kept] = {}
# Re-entrant: a weakref callback (_forget) may run inside a locked section, e.g. when making a copy
# lets the garbage collector free another weight.
_PACKED_LOCK = threading.RLock()
_packed_bytes = 0


def _packable(weight: torch.Tensor) -> bool:
    return (
        ONEDNN
        and type(weight) in _PLAIN
        and weight.dim() == 2
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and weight.is_contiguous()
        and weight._base is None  # a view's identity says nothing about what it shows
        and not weight.is_inference()
    )


def packed(*weights: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of ``weight [n, k]`` (made now, or kept from an earlier call while the
    weight is unchanged), or None where it gets none: not a plain contiguous fp32 CPU weight, an
    inference tensor (it has no version counter), or :data:`PACK_BYTES` already spent. Given several
    weights of one input width, the copy of them stacked ``[n1 + n2 + ..., k]`` (:func:`linear_parts`)."""
    global _packed_bytes
    if not weights or not all(_packable(w) for w in weights):
        return None
    if len({w.shape[1] for w in weights}) != 1:
        raise ValueError(
            f"weights of different input widths cannot be stacked: {[tuple(w.shape) for w in weights]}"
        )
    key = id(weights[0]) if len(weights) == 1 else tuple(id(w) for w in weights)
    state = tuple((w.data_ptr(), w._version) for w in weights)

    def kept() -> _Kept | None:
        entry = _PACKED.get(key)
        ok = (
            entry is not None
            and all(r() is w for r, w in zip(entry.refs, weights, strict=True))
            and entry.state == state
        )
        return entry if ok else None

    entry = kept()
    if entry is not None:  # the common case, without the lock
        return entry.copy
    size = sum(w.numel() * w.element_size() for w in weights)
    with _PACKED_LOCK:  # copies are made rarely: one at a time
        entry = kept()  # another thread may have made it meanwhile
        if entry is not None:
            return entry.copy
        stale = _PACKED.pop(key, None)
        if stale is not None:
            _packed_bytes -= stale.size
        if _packed_bytes + size > PACK_BYTES:
            return None
        whole = weights[0].detach() if len(weights) == 1 else torch.cat([w.detach() for w in weights])
        copy = torch.ops.mkldnn._reorder_linear_weight(whole, 64)  # the row hint changes no value
        refs = tuple(weakref.ref(w, lambda _, key=key: _forget(key)) for w in weights)
        _PACKED[key] = _Kept(refs, state, copy, size)
        _packed_bytes += size
    return copy


def _forget(key: int | tuple[int, ...]) -> None:
    """Drops the copy of weights of which one no longer exists."""
    global _packed_bytes
    with _PACKED_LOCK:
        entry = _PACKED.get(key)
        if entry is not None and any(r() is None for r in entry.refs):
            del _PACKED[key]
            _packed_bytes -= entry.size


def linear_parts(x: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tuple(linear(x, w) for w in weights)`` (no biases), each part ``[..., n_i]``.

    In inference mode, with more than :data:`AS_COLUMNS` rows, where every weight would take the
    oneDNN path alone, it is one product by a kept copy of the weights stacked (a layer's q, k and v
    projections, or an MLP's gate and up): one call where there were several, each part's columns a
    view of the one output, equal to its own product bit for bit (the same kernel sums each output
    over the same ``k`` in the same order; tested). Elsewhere the products are made one by one."""
    if (
        ONEDNN
        and len(weights) > 1
        and _keeps_copies(x)
        and all(w.dim() == 2 and w.shape[1] == x.shape[-1] and _cpu_fp32(x, w) for w in weights)
    ):
        copy = packed(*weights)
        if copy is not None:
            return _onednn(x, copy).split([w.shape[0] for w in weights], dim=-1)
    return tuple(linear(x, w) for w in weights)


def project(x: torch.Tensor, *layers: nn.Module) -> tuple[torch.Tensor, ...]:
    """``tuple(layer(x) for layer in layers)``, through :func:`linear_parts` where every layer is a
    plain :class:`Linear` without a bias or hooks (a wrapped or hooked layer runs its own forward)."""
    if x.numel() > AS_COLUMNS * x.shape[-1] and all(  # a decoded token's few rows: nothing to stack
        type(layer) is Linear
        and layer.bias is None
        and not layer._forward_hooks
        and not layer._forward_pre_hooks
        for layer in layers
    ):
        return linear_parts(x, *(layer.weight for layer in layers))
    return tuple(layer(x) for layer in layers)


class _OneDNNLinear(torch.autograd.Function):
    """:func:`_onednn` with its gradients by oneDNN too (keeps what ``F.linear`` keeps: x and W)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        n, k = weight.shape
        g = grad_out.reshape(-1, n)
        if g.stride(-1) != 1:  # e.g. an expanded gradient: oneDNN wants rows it can read
            g = g.contiguous()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = _onednn(g, weight.t()).view(*x.shape[:-1], k)  # g @ W
        if ctx.needs_input_grad[1]:
            gw = _onednn(g.t(), x.reshape(-1, k).t())  # g^T @ x
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys) computed by :func:`linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
