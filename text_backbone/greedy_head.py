"""Greedy decoding's output projection on the CPU: screen the vocabulary in int8, rescore in fp32.

Shapes: b batch, d model width, V vocabulary, c candidates.

At batch 1 the output projection of a Llama 3 model reads the whole ``[V, d]`` matrix for every
token (128,256 rows), and on a CPU that read is the largest cost of a decoded token. Greedy
decoding only needs the argmax. :class:`ScreenedHead` keeps an int8 copy of the matrix with one
scale per row (a quarter of the bytes to read), computes every logit from it, and bounds each
one's error against the exact fp32 logit; only the rows whose bound interval reaches the best lower
bound can hold the argmax, and those (usually a handful) are recomputed from the fp32 weights. The
result is the argmax of the fp32 logits, not an approximation of it (up to the last-bit differences
any two fp32 kernels have, which decide only exact ties).

Two int8 products can screen; each has its own error bound, and each is checked once per width
when a screen is built (:meth:`ScreenedHead.kernel_for`), on structured sums and on random data
against float64, and timed once against the fp32 product (a library's slow reference kernel is
passed over). Where neither holds, a screened value is not finite, or too many rows survive the
screen, the full fp32 projection is used instead. Both share the weight side: row ``i`` holds ``q_i``
(integers in [-127, 127]) and a bf16 scale ``s_i``, so it stands for ``w'_i = s_i q_i``, whose
distance ``r_i = |w_i - w'_i|_2`` is bounded from above when the screen is built (:func:`_quantize`).
With ``l_i = sum_j h_j w_ij`` the exact logit, ``h'`` the activations the product was given and
``c_i`` its result, every bound has the form::

    |l_i - c_i| <= |h - h'|_2 |w_i|_2                 (rounding h)
                 + A r_i                              (rounding w_i to int8 x scale)
                 + g A (|w_i|_2 + r_i)                (the product's arithmetic)
                 + e |c_i|                            (rounding its result)

by Cauchy-Schwarz, with ``A >= |h'|_2`` (:func:`_bound`).

- ``"onednn"``, oneDNN's int8 x int8 product (``torch.ops.onednn.qlinear_pointwise``, AMX or VNNI
  on recent x86 processors), preferred where both hold. A whole :meth:`ScreenedHead.logits` of a
  128,256 x 512 matrix on 2 threads took 2.5 ms at batch 1 and 4.2 ms at batch 8 against 5.9 and
  18.6 ms through ``"int8pack"`` on an Intel Xeon with AMX (with its rows given as int8, before
  :func:`_onednn_product` gave them as uint8), and 4.2-5.0 and 6.5-6.9 ms against 4.0-5.1 and
  10.3-11.3 ms on an AMD EPYC with AVX-512 VNNI. It also keeps fewer candidates (3 and 31 rows
  against 21 and 91), its result being fp32. Each
  row of ``h`` is scaled by a power of two ``m`` to at most 127 and written as two int8 rows,
  ``hi = round(h / m)`` and ``lo = round((h / m - hi) 128)``, so ``h' = m (hi + lo / 128)`` exactly
  and ``|h - h'|`` is at most ``m / 256`` per element. The kernel's int32 sums are exact (checked:
  no saturation, no halved weights) and become fp32 with at most two roundings, each within
  ``2^-24 |hi|_2 |w'_i|_2`` (Cauchy-Schwarz again); adding the two rows' results rounds once. So
  ``A = m (|hi|_2 + |lo|_2 / 128)``, ``g = 4 2^-24`` and ``e = 2^-23`` (twice what is needed).
- ``"int8pack"``, PyTorch's weight-only int8 kernel (``torch._weight_int8pack_mm``), which takes
  its activations in bf16 and returns bf16: ``h'`` is the bf16 rounding of ``h``, ``A = |h'|_2``,
  ``g = gamma = (d + 1) 2^-24 / (1 - (d + 1) 2^-24)`` for the fp32 sums of ``d`` exact products (a
  product of a bf16 value, an int8 and a bf16 scale has at most 8 + 7 + 8 significant bits), and
  ``e = u / (1 - u)``, ``u = 2^-8`` bf16's unit roundoff. The bound assumes the kernel sums in fp32,
  which is checked (PyTorch's CPU kernel does).

A screen is built once per process and weight, by the first greedy answer (``mm serve`` builds it
before its first request, :mod:`mm.serving.warmup`). On 2 threads of an AMD EPYC a build took
0.23-0.26 s for a 128,256 x 512 matrix and 2.0 s for 128,256 x 4,096 (Llama 3.2 11B's), most of it
oneDNN's prepacking and :func:`_quantize`; before :func:`_quantize` took its rows 2 MiB at a time,
0.39-0.47 s and 5.5 s.
"""

from __future__ import annotations

import functools
import time

import torch

from mm.text_backbone.linear import linear

__all__ = ["ScreenedHead"]

_U = 2.0**-8  # bf16 unit roundoff
_SAFETY = 1.25  # covers the fp32 rounding of the bound's own arithmetic
_ONEDNN_G = 4 * 2.0**-24  # "onednn": the product's arithmetic, per unit of A (|w_i|_2 + r_i)
_ONEDNN_E = 2.0**-23  # "onednn": adding the hi and lo rows' results
_M_RANGE = (2.0**-100, 2.0**100)  # "onednn": row scales outside this take the full projection
_NO_ZERO = torch.zeros(1, dtype=torch.long)  # "onednn": the weights' zero point
KERNELS = ("onednn", "int8pack")  # in order of preference


def _gamma(d: int) -> float:
    n = (d + 1) * 2.0**-24
    return n / (1 - n)


_CHUNK_BYTES = 1 << 21  # _quantize's rows at a time: 2 MiB of fp32, so its dozen passes stay in cache


def _quantize(
    weight: torch.Tensor, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row int8 ``q [V, d]``, bf16 scales ``s [V]`` and upper bounds ``r [V]`` of the distances
    ``|w_i - s_i q_i|_2``, ``chunk`` rows at a time (default: :data:`_CHUNK_BYTES` of them; every
    value is computed row by row, so the chunk changes no bit of it, only the time: 2 threads of
    an AMD EPYC took 0.28 s for 128,256 x 512 in chunks of 8,192 rows and 0.07 s in chunks of
    1,024, and 0.97 against 0.14 s for 32,768 x 4,096 in chunks of 8,192 and 128).

    Each ``w_ij - s_i q_ij`` is exact in fp32: ``s_i q_ij`` has at most 15 significant bits, and
    either ``q_ij = 0`` or ``w_ij`` lies within a factor 2 of it (Sterbenz). The fp32 norm of the
    ``d`` differences is within ``(d + 2) 2^-24`` of the exact one, so it is raised by twice that.
    """
    d = weight.shape[1]
    chunk = chunk or max(1, _CHUNK_BYTES // (d * weight.element_size()))
    q = torch.empty(weight.shape, dtype=torch.int8)
    s = torch.empty(weight.shape[0], dtype=torch.bfloat16)
    r = torch.empty(weight.shape[0], dtype=torch.float32)
    for start in range(0, weight.shape[0], chunk):
        w = weight[start : start + chunk]  # [n, d]
        scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()  # [n], bf16 values
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero row: any scale
        rows = torch.round(w / scale[:, None]).clamp_(-127, 127)  # [n, d]
        q[start : start + chunk] = rows.to(torch.int8)
        s[start : start + chunk] = scale.to(torch.bfloat16)  # exact: bf16 values
        r[start : start + chunk] = (w - rows * scale[:, None]).norm(dim=1) * (1 + (d + 2) * 2.0**-23)
    return q, s, r


def _row_terms(weight: torch.Tensor, r: torch.Tensor, g: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound's per-row factors: ``|w_i|_2`` and ``r_i + g (|w_i|_2 + r_i)`` (see :func:`_bound`)."""
    row_l2 = weight.norm(dim=1)  # [V]
    return row_l2, r + g * (row_l2 + r)


def _split_rows(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``"onednn"`` product's activations (module docstring): ``rows [2b, d]`` int8 (the ``hi``
    rows, then the ``lo`` rows), the power-of-two row scales ``m [b, 1]``, ``h' [b, d]`` (exactly what
    the rows stand for) and ``A [b, 1]``."""
    amax = h.abs().amax(dim=1, keepdim=True)  # [b, 1]
    amax = torch.where(amax == 0, torch.ones_like(amax), amax)  # a zero row: any scale (NaN stays NaN)
    m = torch.exp2(torch.ceil(torch.log2(amax / 127)))  # [b, 1]: max |h / m| <= 127 (< 127 after rounding up)
    m = torch.where(amax / m > 127, m * 2, m)  # log2's own rounding, were it ever low
    x = h / m  # exact: a power of two
    hi = torch.round(x)  # [b, d], in [-127, 127]
    lo = torch.round((x - hi) * 128)  # [b, d], in [-64, 64]; x - hi is exact
    h_used = (hi + lo / 128) * m  # exact: at most 7 + 7 bits, times a power of two
    a = (hi.norm(dim=1, keepdim=True) + lo.norm(dim=1, keepdim=True) / 128) * m  # >= |h'|_2
    return torch.cat([hi, lo]).to(torch.int8), m, h_used, a


def _onednn_product(rows: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``rows [n, d]`` int8 times the prepacked int8 matrix, times each output row's fp32 ``scale``:
    ``[n, V]`` fp32.

    The rows go in as uint8 ``rows + 128`` with a zero point of 128, which oneDNN takes back in its
    int32 sums (exactly: ``d 255 127 < 2^31``). Unsigned activations are the form PyTorch's x86
    quantization gives oneDNN, and the one it runs through its VNNI and AMX kernels: int8 ones took
    its reference kernel on an AMD EPYC with AVX-512 VNNI, 1.5 s for a 128,256 x 512 matrix instead
    of 2.5 ms.
    """
    shifted = (rows.to(torch.int16) + 128).to(torch.uint8)  # [n, d] in [1, 255]
    return torch.ops.onednn.qlinear_pointwise(
        shifted, 1.0, 128, packed, scale, _NO_ZERO, None, 1.0, 0, torch.float32, "none", [], ""
    )


class ScreenedHead:
    """The argmax-exact output projection of one fp32 weight matrix ``[V, d]`` on the CPU.

    Args:
        weight: the output matrix; it is copied to int8 once (a quarter of its size in extra
            memory). The screen keeps no reference to it: :meth:`logits` is given it again, and
            :meth:`key_of` tells whether it is still the matrix the screen was built from.
        max_candidates: more surviving rows than this and the full fp32 projection is used.
        kernel: the screen's product (the module docstring's ``"onednn"`` or ``"int8pack"``); by
            default the first of :data:`KERNELS` whose bound holds here and that is not slower than
            fp32 (:meth:`kernel_for`). One whose bound does not hold here is refused.
    """

    def __init__(
        self, weight: torch.Tensor, *, max_candidates: int = 4096, kernel: str | None = None
    ) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.ndim != 2:
            raise ValueError("ScreenedHead screens an fp32 [V, d] matrix on the CPU")
        d = weight.shape[1]
        if kernel is None:
            kernel = self.kernel_for(d)
        elif kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        elif not self.kernel_is_bounded(kernel, d):
            raise ValueError(f"the {kernel!r} product's error bound does not hold here at width {d}")
        self.key = self.key_of(weight)
        self.max_candidates = max_candidates
        self.kernel = kernel
        self.exact = kernel is not None  # whether the screen is used at all
        self.screened = 0  # calls answered through the screen (the rest fell back)
        if kernel is None:
            return
        with torch.no_grad():
            self._build(weight)
            # the factors of the widest bound (logits' prefilter)
            self.row_l2_max, self.row_r_max = self.row_l2.max(), self.row_r.max()

    def _build(self, weight: torch.Tensor) -> None:
        """The int8 copy of ``weight [V, d]`` in :attr:`kernel`'s layout (``q`` or ``packed``), its
        scales and the bound's row factors ``row_l2``, ``row_r``."""
        q, scale, r = _quantize(weight)  # [V, d] int8, [V] bf16, [V]
        g = _ONEDNN_G if self.kernel == "onednn" else _gamma(weight.shape[1])
        self.row_l2, self.row_r = _row_terms(weight, r, g)  # [V], [V]
        if self.kernel == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(q, None)  # oneDNN's layout of q
            self.scale = scale.float()
        else:
            self.q, self.scale = q, scale

    @staticmethod
    def _unchecked(kernel: str, weight: torch.Tensor) -> ScreenedHead:
        """A screen of ``weight`` through ``kernel`` with its product and bound alone: no check that
        the kernel holds or is fast here (what :meth:`kernel_is_bounded` and :meth:`kernel_is_fast`
        measure)."""
        screen = ScreenedHead.__new__(ScreenedHead)
        screen.kernel = kernel
        screen._build(weight)
        return screen

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple:
        """Identifies the matrix's storage and contents version (a rebuilt screen is needed when it changes)."""
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor keeps no version counter (and cannot be changed in place)
            version = None
        return (weight.data_ptr(), version, tuple(weight.shape), weight.dtype, weight.device)

    @staticmethod
    def kernel_for(d: int) -> str | None:
        """The first of :data:`KERNELS` whose bound holds here at width ``d`` and that is no slower
        than the fp32 product it screens for (:meth:`kernel_is_fast`); None: no screen."""
        usable = (k for k in KERNELS if ScreenedHead.kernel_is_bounded(k, d))
        return next((k for k in usable if ScreenedHead.kernel_is_fast(k, d)), None)

    @staticmethod
    @functools.cache
    def kernel_is_fast(kernel: str, d: int) -> bool:
        """Whether ``kernel``'s screen of one row against a matrix of width ``d`` (32 MB in fp32)
        takes no longer than the fp32 product of the same matrix, the best of three runs each.

        A library can do a product's arithmetic right and still run it through a slow reference
        kernel: oneDNN took its reference kernel for int8 activations on an AMD EPYC, 180 ms where
        its VNNI kernel takes 0.3 ms and the fp32 product 0.7. A usable kernel reads a quarter of
        the fp32 bytes, so this only refuses one that is far off (measured here: 0.24-0.55 ms for
        either int8 product against 0.5-1.5 ms in fp32, widths 64 to 4096).
        """
        g = torch.Generator().manual_seed(0)
        w = torch.randn(max(1024, 2**23 // d), d, generator=g)
        h = torch.randn(1, d, generator=g)
        with torch.no_grad():
            screen = ScreenedHead._unchecked(kernel, w)
            return _best_of_three(lambda: screen.screen(h)) <= _best_of_three(lambda: linear(h, w))

    @staticmethod
    @functools.cache
    def kernel_is_bounded(kernel: str, d: int) -> bool:
        """Whether ``kernel``'s product of width ``d`` here does the arithmetic its bound assumes.

        ``"onednn"``: integer products equal int64 sums rounded once to fp32, for largest-magnitude
        rows of every sign pattern (what a saturating 16-bit pair sum or halved weights would get
        wrong) and random ones. ``"int8pack"``: ``256 + (d - 1)`` ones (a sum carried in bf16
        stays at 256). Then for both: every screened logit of 256 random rows lies within half its
        bound of the float64 value.
        """
        if d < 64 or (kernel == "onednn" and d * 255 * 127 >= 2**31):
            return False
        g = torch.Generator().manual_seed(0)
        w = torch.randn(256, d, generator=g) * torch.logspace(-3, 1, 256)[:, None]
        h = torch.randn(4, d, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3])[:, None]
        try:
            if kernel == "onednn":
                if not _onednn_sums_exactly(d, g):
                    return False
            else:
                x = torch.ones(1, d, dtype=torch.bfloat16)
                x[0, 0] = 256.0
                ones = torch.ones(64, d, dtype=torch.int8)
                got = torch._weight_int8pack_mm(x, ones, torch.ones(64, dtype=torch.bfloat16)).float()
                if not bool((got == torch.tensor(255.0 + d).bfloat16().float()).all()):
                    return False
            screen = ScreenedHead._unchecked(kernel, w)
            approx, terms = screen.screen(h)
        except (AttributeError, RuntimeError, NotImplementedError):  # no such kernel here
            return False
        if approx is None or not bool(approx.isfinite().all()):
            return False
        bound = _bound(approx, *terms, screen.row_l2, screen.row_r)
        exact = h.double() @ w.double().t()
        return bool(((exact - approx.double()).abs() <= 0.5 * bound.double()).all())

    def screen(self, h: torch.Tensor) -> tuple[torch.Tensor | None, tuple]:
        """The screened logits ``[b, V]`` of fp32 ``h [b, d]`` (not checked to be finite) and the
        per-row terms of their bound (``err``, ``A`` and ``e`` of :func:`_bound`), or ``(None, ())``
        where ``h`` is outside the product's range."""
        if self.kernel == "onednn":
            rows, m, h_used, a = _split_rows(h)
            if not bool(((m >= _M_RANGE[0]) & (m <= _M_RANGE[1])).all()):  # also a NaN or infinite h
                return None, ()
            b = h.shape[0]
            out = _onednn_product(rows, self.packed, self.scale)  # [2b, V]
            approx = out[:b].add_(out[b:], alpha=1 / 128).mul_(m)  # [b, V]; the scaling is exact
            e = _ONEDNN_E
        else:
            h_used = h.to(torch.bfloat16)  # [b, d]
            approx = torch._weight_int8pack_mm(h_used, self.q, self.scale).float()  # [b, V]
            h_used = h_used.float()
            a = h_used.norm(dim=-1, keepdim=True)  # [b, 1]
            e = _U / (1 - _U)
        return approx, ((h - h_used).norm(dim=-1, keepdim=True), a, e)

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, V]`` of normed hidden states ``h [b, d]`` under ``weight`` (the matrix the
        screen was built from) whose argmax is the fp32 argmax: exact fp32 values for every row
        that can be the argmax, ``-inf`` for the rest.

        Bounds are computed only for the rows within twice the largest bound of the best screened
        logit (``near``): a row further down has an upper bound below the best row's lower bound.
        """
        if self.key_of(weight) != self.key:
            raise ValueError("the weight changed since the screen was built; build a new ScreenedHead")
        if not self.exact or h.dtype != torch.float32:
            return linear(h, weight)
        approx, terms = self.screen(h)  # [b, V]
        if approx is None:
            return linear(h, weight)
        low, top = approx.amin(dim=-1, keepdim=True), approx.amax(dim=-1, keepdim=True)  # [b, 1] each
        if not bool((low.isfinite() & top.isfinite()).all()):  # a value past fp32's range (NaN propagates)
            return linear(h, weight)
        widest = _bound(torch.maximum(top, -low), *terms, self.row_l2_max, self.row_r_max)  # [b, 1]
        near = (approx >= top - 2 * widest * (1 + 2.0**-10)).any(dim=0).nonzero().squeeze(1)  # [p]
        sub = approx[:, near]  # [b, p]
        bound = _bound(sub, *terms, self.row_l2[near], self.row_r[near])  # [b, p]
        floor = (sub - bound).max(dim=-1, keepdim=True).values  # [b, 1]: the argmax's logit is at least this
        rows = near[((sub + bound) >= floor).any(dim=0)]  # [c]
        if rows.numel() > self.max_candidates:
            return linear(h, weight)
        out = torch.full_like(approx, float("-inf"))
        out[:, rows] = linear(h, weight[rows])  # [b, c], fp32
        self.screened += 1
        return out


def _best_of_three(run) -> float:
    """The shortest of three timed calls of ``run`` after one untimed call, in seconds."""
    run()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def _int_product(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """oneDNN's product of int8 ``x [n, d]`` and int8 ``q [m, d]`` with unit scales: ``[n, m]`` fp32."""
    return _onednn_product(x, torch.ops.onednn.qlinear_prepack(q, None), torch.ones(q.shape[0]))


def _onednn_sums_exactly(d: int, g: torch.Generator) -> bool:
    """Whether oneDNN's int8 product of width ``d`` gives every int32 sum rounded once to fp32, for
    each number of rows it may be given (it may choose its kernel by that number)."""
    signs = torch.tensor([1, -1] * (d // 2) + [1] * (d % 2), dtype=torch.int8)
    full = torch.full((d,), 127, dtype=torch.int8)
    extreme = torch.stack([full, -full, 127 * signs])  # [3, d]
    x = torch.cat([extreme, torch.randint(-127, 128, (30, d), generator=g, dtype=torch.int8)])  # [33, d]
    q = torch.cat([extreme, torch.randint(-127, 128, (509, d), generator=g, dtype=torch.int8)])  # [512, d]
    exact = (x.long() @ q.long().t()).float()  # [33, 512]
    return all(torch.equal(_int_product(x[:n], q), exact[:n]) for n in (1, 2, 4, 8, 16, 33))


def _bound(
    approx: torch.Tensor,
    err: torch.Tensor,
    a: torch.Tensor,
    e: float,
    row_l2: torch.Tensor,
    row_r: torch.Tensor,
) -> torch.Tensor:
    """The module docstring's bound ``[b, V]`` on ``|l - approx|``, times the safety factor, from
    ``err [b, 1] = |h - h'|_2``, ``a [b, 1] = A``, the row norms ``row_l2 [V]``, ``row_r [V] =
    r + g (|w|_2 + r)`` and the result's relative rounding ``e``."""
    bound = torch.addcmul(err * row_l2, a, row_r)  # [b, V]
    return bound.add_(approx.abs(), alpha=e).mul_(_SAFETY)
