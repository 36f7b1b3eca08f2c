"""Cross-entropy through the output head without keeping the logits for the backward pass.

Shapes: n labelled positions, d width, V vocabulary, c rows per chunk.

Llama 3's output head has 128,256 rows. Through plain autograd, the loss of n labelled positions
keeps their ``[n, V]`` logits and log-softmax until the backward pass (two fp32 ``n x V`` tensors:
2 GB for 2,048 labelled tokens), and the backward pass walks them twice more. The gradient of the
mean cross-entropy with respect to the logits is ``(softmax - onehot) / n``, known as soon as the
logits are; :func:`linear_cross_entropy` therefore computes the loss and the gradients of the head's
input (and of its weight, when it learns) together in the forward pass, ``c`` rows at a time, and
keeps only those gradients (``[n, d]``; ``[V, d]`` for a learning weight). The backward pass scales
them by the incoming gradient. Nothing is recomputed: the forward pass does the backward pass's two
products (``grad_x = g W``, and ``g^T x`` for a learning weight) that plain autograd would do later.

The products (:func:`~mm.text_backbone.linear.linear`'s: oneDNN's for fp32 on the CPU) and the
softmax are those of ``F.cross_entropy(linear(x, w).float(), targets)`` (the logits in the weight's
dtype, then fp32), so loss and gradients equal plain autograd's up to float rounding. Chunks hold
at most ``chunk_bytes`` of fp32 logits; the whole batch when it fits, as on the CPU bench (140
rows), where one large product is faster than several small ones. Without gradients (evaluation,
``torch.no_grad``) only the loss is computed, in the same chunks.

Logits under ``min_bytes`` (:data:`MIN_BYTES`, 32 MB: 65 rows of Llama 3's vocabulary, 2,048 of a
4,096-token one) cost little to keep, and there plain autograd runs, bit for bit what the model
computed before this module existed. Rounding-level changes of the gradients move small training
runs: with this path for every size, the demo's SFT stages ended a few samples apart and its DPO
check (image QA may fall by at most 0.03) read exactly its limit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mm.text_backbone.linear import linear

__all__ = ["CHUNK_BYTES", "MIN_BYTES", "linear_cross_entropy"]

CHUNK_BYTES = 256 * 2**20  # fp32 logits per chunk: 523 rows of Llama 3's vocabulary
MIN_BYTES = 32 * 2**20  # smaller fp32 logits go through plain autograd


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    chunk_bytes: int = CHUNK_BYTES,
    min_bytes: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``x [n, d] @ weight [V, d]^T`` against ``targets [n]``.

    Equal to ``F.cross_entropy(F.linear(x, weight).float(), targets)`` and its gradients, without
    keeping the ``[n, V]`` logits when they would take ``min_bytes`` (default :data:`MIN_BYTES`)
    or more (module docstring).
    """
    if x.ndim != 2 or targets.shape != x.shape[:1]:
        raise ValueError(f"need x [n, d] and targets [n], got {tuple(x.shape)} and {tuple(targets.shape)}")
    if x.shape[0] == 0:
        raise ValueError("no labelled position: the mean cross-entropy of nothing is undefined")
    if 4 * x.shape[0] * weight.shape[0] < (MIN_BYTES if min_bytes is None else min_bytes):
        return F.cross_entropy(linear(x, weight).float(), targets)
    rows = max(1, chunk_bytes // (4 * weight.shape[0]))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(x, weight, targets, rows)
    return _chunks(x, weight, targets, rows, grad_x=False, grad_w=False)[0]


def _chunks(x, weight, targets, rows: int, *, grad_x: bool, grad_w: bool):
    """``(mean loss, grad_x or None, grad_weight or None)``, ``rows`` positions at a time."""
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x) if grad_x else None
    gw = torch.zeros_like(weight, dtype=torch.float32) if grad_w else None
    for start in range(0, n, rows):
        xc, tc = x[start : start + rows], targets[start : start + rows]
        logits = linear(xc, weight).float()  # [c, V]
        # log-sum-exp as torch.logsumexp computes it, but in the logits' own memory: a new [c, V]
        # tensor (logsumexp's shifted copy) costs more than the passes over it (its pages are
        # touched for the first time), and the softmax below reuses the exponentials.
        top = logits.amax(dim=-1, keepdim=True)  # [c, 1]
        picked = logits.gather(1, tc[:, None])  # [c, 1]
        sums = logits.sub_(top).exp_().sum(dim=-1, keepdim=True)  # [c, 1]
        total += (top + sums.log() - picked).sum()
        if gx is None and gw is None:
            continue
        g = logits.div_(sums * n)  # softmax / n, in the logits' memory
        g[torch.arange(len(tc), device=g.device), tc] -= 1.0 / n
        g = g.to(x.dtype)  # d(mean loss)/d(logits), in the dtype the logits were made in
        if gx is not None:
            gx[start : start + rows] = linear(g, weight.t())  # g @ W
        if gw is not None:
            gw += linear(g.t().float(), xc.float().t())  # g^T @ x
    return total / n, gx, gw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, rows):
        grad_x, grad_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, gx, gw = _chunks(x, weight, targets, rows, grad_x=grad_x, grad_w=grad_w)
        ctx.save_for_backward(gx, None if gw is None else gw.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        gx, gw = ctx.saved_tensors
        return (
            None if gx is None else gx * grad_loss.to(gx.dtype),
            None if gw is None else gw * grad_loss.to(gw.dtype),
            None,
            None,
        )
