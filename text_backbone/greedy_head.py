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

The screen's product is PyTorch's weight-only int8 kernel (``torch._weight_int8pack_mm``), which
takes its activations in bf16 and returns bf16. Row ``i`` holds ``q_i`` (integers in [-127, 127])
and a bf16 scale ``s_i``, so it stands for ``w'_i = s_i q_i``, whose distance ``r_i = |w_i - w'_i|_2``
is bounded from above when the screen is built (:func:`_quantize`). Error bound of one screened
logit ``c_i`` against ``l_i = sum_j h_j w_ij``, with ``h'`` the bf16 rounding of ``h`` and
``u = 2^-8`` bf16's unit roundoff::

    |l_i - c_i| <= |h - h'|_2 |w_i|_2            (rounding h to bf16)
                 + |h'|_2 r_i                     (rounding w_i to int8 x scale)
                 + gamma |h'|_2 (|w_i|_2 + r_i)   (fp32 sums of d exact products, and the scale)
                 + u / (1 - u) |c_i|              (rounding the result to bf16)

by Cauchy-Schwarz, with ``gamma = (d + 1) 2^-24 / (1 - (d + 1) 2^-24)``; a product of a bf16 value,
an int8 and a bf16 scale has at most 8 + 7 + 8 significant bits and is exact in fp32. The bound
assumes the kernel sums in fp32; that is checked once per width when a screen is built, on a
structured sum and on random data against float64 (PyTorch's CPU kernel does). Where it does not
hold, or the kernel is missing, or a screened value is not finite, or too many rows survive the
screen, the full fp32 projection is used instead.
"""

from __future__ import annotations

import functools
import math

import torch

from mm.text_backbone.linear import linear

__all__ = ["ScreenedHead"]

_U = 2.0**-8  # bf16 unit roundoff
_SAFETY = 1.25  # covers the fp32 rounding of the bound's own arithmetic


def _gamma(d: int) -> float:
    n = (d + 1) * 2.0**-24
    return n / (1 - n)


def _quantize(weight: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row int8 ``q [V, d]``, bf16 scales ``s [V]`` and upper bounds ``r [V]`` of the distances
    ``|w_i - s_i q_i|_2``, ``chunk`` rows at a time.

    Each ``w_ij - s_i q_ij`` is exact in fp32: ``s_i q_ij`` has at most 15 significant bits, and
    either ``q_ij = 0`` or ``w_ij`` lies within a factor 2 of it (Sterbenz). The fp32 norm of the
    ``d`` differences is within ``(d + 2) 2^-24`` of the exact one, so it is raised by twice that.
    """
    d = weight.shape[1]
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


def _row_terms(weight: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound's per-row factors: ``|w_i|_2`` and ``r_i + gamma (|w_i|_2 + r_i)`` (see :func:`_bound`)."""
    row_l2 = weight.norm(dim=1)  # [V]
    return row_l2, r + _gamma(weight.shape[1]) * (row_l2 + r)


class ScreenedHead:
    """The argmax-exact output projection of one fp32 weight matrix ``[V, d]`` on the CPU.

    Args:
        weight: the output matrix; it is copied to int8 once (a quarter of its size in extra
            memory). The screen keeps no reference to it: :meth:`logits` is given it again, and
            :meth:`key_of` tells whether it is still the matrix the screen was built from.
        max_candidates: more surviving rows than this and the full fp32 projection is used.
    """

    def __init__(self, weight: torch.Tensor, *, max_candidates: int = 4096) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.ndim != 2:
            raise ValueError("ScreenedHead screens an fp32 [V, d] matrix on the CPU")
        self.key = self.key_of(weight)
        self.max_candidates = max_candidates
        d = weight.shape[1]
        self.exact = self.kernel_is_bounded(d)
        self.screened = 0  # calls answered through the screen (the rest fell back)
        if not self.exact:
            return
        with torch.no_grad():
            self.q, self.scale, r = _quantize(weight)  # [V, d] int8, [V] bf16, [V]
            self.row_l2, self.row_r = _row_terms(weight, r)  # [V], [V]

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple:
        """Identifies the matrix's storage and contents version (a rebuilt screen is needed when it changes)."""
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor keeps no version counter (and cannot be changed in place)
            version = None
        return (weight.data_ptr(), version, tuple(weight.shape), weight.dtype, weight.device)

    @staticmethod
    @functools.cache
    def kernel_is_bounded(d: int) -> bool:
        """Whether the int8 product of width ``d`` here sums in fp32, so the bound holds.

        Structured: ``256 + (d - 1)`` ones (a sum carried in bf16 stays at 256). Random: every
        screened logit of 256 random rows lies within half its bound of the float64 value.
        """
        if d < 64:
            return False
        try:
            x = torch.ones(1, d, dtype=torch.bfloat16)
            x[0, 0] = 256.0
            ones = torch.ones(64, d, dtype=torch.int8)
            got = torch._weight_int8pack_mm(x, ones, torch.ones(64, dtype=torch.bfloat16)).float()
            if not bool((got == torch.tensor(255.0 + d).bfloat16().float()).all()):
                return False
            g = torch.Generator().manual_seed(0)
            w = torch.randn(256, d, generator=g) * torch.logspace(-3, 1, 256)[:, None]
            h = torch.randn(4, d, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e3])[:, None]
            q, s, r = _quantize(w)
            hb = h.to(torch.bfloat16)
            c = torch._weight_int8pack_mm(hb, q, s).float()
        except (AttributeError, RuntimeError, NotImplementedError):  # no such kernel here
            return False
        bound = _bound(c, h, hb, *_row_terms(w, r))
        exact = h.double() @ w.double().t()
        return bool(((exact - c.double()).abs() <= 0.5 * bound.double()).all())

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, V]`` of normed hidden states ``h [b, d]`` under ``weight`` (the matrix the
        screen was built from) whose argmax is the fp32 argmax: exact fp32 values for every row
        that can be the argmax, ``-inf`` for the rest."""
        if self.key_of(weight) != self.key:
            raise ValueError("the weight changed since the screen was built; build a new ScreenedHead")
        if not self.exact or h.dtype != torch.float32:
            return linear(h, weight)
        hb = h.to(torch.bfloat16)  # [b, d]
        approx = torch._weight_int8pack_mm(hb, self.q, self.scale).float()  # [b, V]
        if not math.isfinite(float(approx.sum())):  # a value past fp32's range (or a finite sum that is)
            return linear(h, weight)
        bound = _bound(approx, h, hb, self.row_l2, self.row_r)  # [b, V]
        floor = (
            (approx - bound).max(dim=-1, keepdim=True).values
        )  # [b, 1]: the argmax's logit is at least this
        rows = ((approx + bound) >= floor).any(dim=0).nonzero().squeeze(1)  # [c]
        if rows.numel() > self.max_candidates:
            return linear(h, weight)
        out = torch.full_like(approx, float("-inf"))
        out[:, rows] = linear(h, weight[rows])  # [b, c], fp32
        self.screened += 1
        return out


def _bound(
    approx: torch.Tensor, h: torch.Tensor, hb: torch.Tensor, row_l2: torch.Tensor, row_r: torch.Tensor
) -> torch.Tensor:
    """The module docstring's bound ``[b, V]`` on ``|l - approx|`` for hidden states ``h [b, d]``
    (``hb`` their bf16 rounding, what the kernel was given), row norms ``row_l2 [V]`` and
    ``row_r [V] = r + gamma (|w|_2 + r)``, times the safety factor."""
    hb = hb.float()
    err = (h - hb).norm(dim=-1, keepdim=True)  # [b, 1]
    hn = hb.norm(dim=-1, keepdim=True)  # [b, 1]
    bound = torch.addcmul(err * row_l2, hn, row_r)  # [b, V]
    return bound.add_(approx.abs(), alpha=_U / (1 - _U)).mul_(_SAFETY)
