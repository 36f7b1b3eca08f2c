"""Greedy decoding's output projection on the CPU: screen the vocabulary in fp16, rescore in fp32.

Shapes: b batch, d model width, V vocabulary, c candidates.

At batch 1 the output projection of a Llama 3 model reads the whole ``[V, d]`` matrix for every
token (128,256 rows), and on a CPU that read is the largest cost of a decoded token. Greedy
decoding only needs the argmax. :class:`ScreenedHead` keeps an fp16 copy of the matrix (half the
bytes to read), computes every logit from it, and bounds each one's error against the exact fp32
logit; only the rows whose bound interval reaches the best lower bound can hold the argmax, and
those (usually a handful) are recomputed from the fp32 weights. The result is the argmax of the
fp32 logits, not an approximation of it (up to the last-bit differences any two fp32 kernels have,
which decide only exact ties).

Error bound of one fp16 logit ``c_i`` against ``l_i = sum_j h_j w_ij``, with fp16's unit roundoff
``u = 2^-11``, its subnormal rounding error ``eta = 2^-25``, and fp32 accumulation of the ``d``
products (``gamma = d 2^-24 / (1 - d 2^-24)``); rounding ``h`` and ``w`` to fp16 costs at most
``(2u + u^2) sum|h||w| + eta (1 + u)(|h|_1 + |w_i|_1) + d eta^2``, the fp32 sum ``gamma`` times the
sum of the rounded products' magnitudes, and rounding the result to fp16 ``u (|c_i| + eta) / (1 - u)
+ eta``; ``sum_j |h_j||w_ij| <= |h|_2 |w_i|_2`` (Cauchy-Schwarz) makes it cheap per row. The bound
assumes the fp16 matrix product accumulates in fp32, which is checked once when the screen is built
(PyTorch's CPU kernels do); where it does not hold, or the fp16 values overflow, or too many rows
survive the screen, the full fp32 projection is used instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.text_backbone.linear import linear

__all__ = ["ScreenedHead"]

_U = 2.0**-11  # fp16 unit roundoff
_ETA = 2.0**-25  # largest rounding error of an fp16 subnormal
_SAFETY = 1.25  # covers the fp32 rounding of the bound's own arithmetic


class ScreenedHead:
    """The argmax-exact output projection of one fp32 weight matrix ``[V, d]`` on the CPU.

    Args:
        weight: the output matrix; it is copied to fp16 once (half its size in extra memory). The
            screen keeps no reference to it: :meth:`logits` is given it again, and
            :meth:`key_of` tells whether it is still the matrix the screen was built from.
        max_candidates: more surviving rows than this and the full fp32 projection is used.
    """

    def __init__(self, weight: torch.Tensor, *, max_candidates: int = 4096) -> None:
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or weight.ndim != 2:
            raise ValueError("ScreenedHead screens an fp32 [V, d] matrix on the CPU")
        self.key = self.key_of(weight)
        self.max_candidates = max_candidates
        with torch.no_grad():
            self.half = weight.to(torch.float16)  # [V, d]
            self.row_l2 = weight.norm(dim=1)  # [V]
            self.row_l1 = weight.abs().sum(dim=1)  # [V]
        d = weight.shape[1]
        gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
        self._a = (2 * _U + _U * _U) + gamma * (1 + _U) ** 2
        self._b = _ETA * (1 + _U) * (1 + gamma)
        self._c = d * _ETA * _ETA * (1 + gamma) + _ETA + _U * _ETA / (1 - _U)
        self.exact = self.accumulates_in_fp32(d)
        self.screened = 0  # calls answered through the screen (the rest fell back)

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple:
        """Identifies the matrix's storage and contents version (a rebuilt screen is needed when it changes)."""
        try:
            version = weight._version
        except RuntimeError:  # an inference tensor keeps no version counter (and cannot be changed in place)
            version = None
        return (weight.data_ptr(), version, tuple(weight.shape), weight.dtype, weight.device)

    @staticmethod
    def accumulates_in_fp32(d: int) -> bool:
        """Whether an fp16 ``[1, d] x [r, d]^T`` product here sums in fp32: ``2048 + (d - 1)`` ones.

        fp16 holds integers exactly only up to 2048, so a sum carried in fp16 stays at 2048.
        """
        if d < 64:
            return False
        x = torch.ones(1, d, dtype=torch.float16)
        x[0, 0] = 2048.0
        got = F.linear(x, torch.ones(4096, d, dtype=torch.float16)).float()  # [1, 4096]
        return bool(((got - (2047.0 + d)).abs() <= 2.0).all())

    def logits(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Logits ``[b, V]`` of normed hidden states ``h [b, d]`` under ``weight`` (the matrix the
        screen was built from) whose argmax is the fp32 argmax: exact fp32 values for every row
        that can be the argmax, ``-inf`` for the rest."""
        if self.key_of(weight) != self.key:
            raise ValueError("the weight changed since the screen was built; build a new ScreenedHead")
        if not self.exact or h.dtype != torch.float32:
            return linear(h, weight)
        h16 = h.to(torch.float16)
        approx = F.linear(h16, self.half).float()  # [b, V]
        if not (torch.isfinite(h16).all() and torch.isfinite(approx).all()):
            return linear(h, weight)
        hn2 = h.norm(dim=-1, keepdim=True)  # [b, 1]
        hn1 = h.abs().sum(dim=-1, keepdim=True)  # [b, 1]
        bound = self._a * hn2 * self.row_l2 + self._b * (hn1 + self.row_l1) + self._c
        bound = _SAFETY * (bound + _U / (1 - _U) * approx.abs())  # [b, V]
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
