"""The screened greedy head: the fp32 argmax always, int8 screening only where its error bound holds."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from mm_testing import random_backbone

from mm.text_backbone import greedy_head
from mm.text_backbone.greedy_head import (
    _CHUNK_BYTES,
    _SAFETY,
    KERNELS,
    ScreenedHead,
    _bound,
    _quantize,
    _split_rows,
)
from mm.text_backbone.linear import linear

# The products whose bound holds on this machine (both on x86 builds of PyTorch with oneDNN).
HERE = [k for k in KERNELS if ScreenedHead.kernel_is_bounded(k, 128)]


def _matrix(v=5000, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g) * 0.05
    w[17] = w[4000]  # an exact tie: the argmax is the first of the two, as in the full projection
    w[18] = w[4001] * (1 + 2e-4)  # near ties, closer than the int8 screen can tell apart
    w[19] = w[4002] * (1 - 2e-4)
    w[20, :5] = 1e-6  # values int8 rounds to zero
    return w


def test_a_screen_is_available_here():
    assert "int8pack" in HERE  # PyTorch's CPU int8 kernel sums in fp32
    fast = [k for k in HERE if ScreenedHead.kernel_is_fast(k, 128)]
    assert ScreenedHead(_matrix()).kernel == fast[0]  # the first that holds and is fast is taken


@pytest.mark.parametrize("kernel", HERE)
def test_the_argmax_is_the_fp32_argmax_and_only_candidates_are_computed(kernel):
    w = _matrix()
    screen = ScreenedHead(w, kernel=kernel)
    assert screen.exact
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(4, 128, generator=g) * s for s in (0.1, 1.0, 10.0, 100.0)]
    hs += [w[[4000, 4001, 4002, 20]] * 50]  # rows pointing at the tied / near-tied / tiny rows
    for h in hs:
        full = F.linear(h, w)
        out = screen.logits(h, w)
        assert torch.equal(out.argmax(-1), full.argmax(-1))
        kept = torch.isfinite(out)
        assert kept.any(0).sum() < 200  # a handful of rows, not the vocabulary
        # The kept rows are recomputed in fp32 (a product of the kept rows only, which MKL may sum in
        # another order than the full product): within fp32 rounding of the exact logits (Higham's
        # bound: k units of rounding of sum |h_i w_i|), as F.linear's own are.
        exact = F.linear(h.double(), w.double())
        bound = 128 * 2.0**-24 * F.linear(h.double().abs(), w.double().abs())
        assert ((out.double() - exact).abs()[kept] <= bound[kept]).all()
        assert ((full.double() - exact).abs() <= bound).all()
        torch.testing.assert_close(out[kept], full[kept], rtol=1e-5, atol=1e-5)
        assert torch.all(out[~kept] == float("-inf"))
        # Every row that beats the kept rows' best lower bound was kept: the true top rows are in.
        top = full.topk(1, dim=-1).indices
        assert kept.gather(1, top).all()
        # Bounds are computed only near the top: the rows kept are those the bound of every row keeps.
        approx, terms = screen.screen(h)
        bound = _bound(approx, *terms, screen.row_l2, screen.row_r)
        floor = (approx - bound).max(dim=-1, keepdim=True).values
        assert torch.equal(kept.any(0), ((approx + bound) >= floor).any(0))
    assert screen.screened == len(hs)


@pytest.mark.parametrize("kernel", HERE)
def test_every_screened_logit_lies_within_its_bound(kernel):
    """The bound itself, row by row against float64, without its safety factor; and not vacuous."""
    w = _matrix()
    w[21] = 0.0  # a zero row
    screen = ScreenedHead(w, kernel=kernel)
    q, scale, r = _quantize(w)
    exact_r = (w.double() - q.double() * scale.double()[:, None]).norm(dim=1)
    assert (r.double() >= exact_r).all() and (r.double() <= exact_r * (1 + 1e-4) + 1e-30).all()
    g = torch.Generator().manual_seed(2)
    for scale_h in (1e-4, 0.1, 1.0, 100.0, 1e5):
        h = torch.randn(3, 128, generator=g) * scale_h
        h[2, :64] *= 1e-3  # values far below the row's largest
        approx, terms = screen.screen(h)
        bound = _bound(approx, *terms, screen.row_l2, screen.row_r).double() / _SAFETY
        error = (h.double() @ w.double().t() - approx.double()).abs()
        assert (error <= bound).all()
        assert error.max() >= bound.max() / 20  # the bound is within a factor 20 of the worst error


@pytest.mark.parametrize("d", [512, 4096])
def test_the_quantisation_does_not_depend_on_its_chunks(d):
    """Rows at a time is a matter of speed: any chunk gives the same bits (the default takes 2 MiB)."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(3000, d, generator=g) * torch.logspace(-3, 1, 3000)[:, None]
    w[7] = 0.0
    whole = _quantize(w, chunk=w.shape[0])
    assert max(1, _CHUNK_BYTES // (4 * d)) < w.shape[0]  # the default splits this matrix
    for chunk in (None, 1, 37, 1024):
        assert all(torch.equal(a, b) for a, b in zip(_quantize(w, chunk), whole, strict=True)), chunk


def test_where_the_bound_does_not_hold_it_is_the_full_projection(monkeypatch):
    """The full projection: the one the head computes (:func:`~mm.text_backbone.linear.linear`)."""
    w = _matrix()
    h = torch.randn(2, 128)
    monkeypatch.setattr(ScreenedHead, "kernel_is_bounded", staticmethod(lambda kernel, d: False))
    unbounded = ScreenedHead(w)
    assert unbounded.kernel is None and not unbounded.exact
    assert torch.equal(unbounded.logits(h, w), linear(h, w))  # no kernel could be bounded
    with pytest.raises(ValueError, match="does not hold here"):
        ScreenedHead(w, kernel="int8pack")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="kernel must be one of"):
        ScreenedHead(w, kernel="int4")
    for kernel in HERE:
        big = w * 1e4
        overflowing = ScreenedHead(big, kernel=kernel)
        # Past the product's range: row scales beyond 2^100 ("onednn"), sums past fp32's ("int8pack").
        out = overflowing.logits(h * 1e36, big)
        torch.testing.assert_close(out, linear(h * 1e36, big), rtol=0, atol=0, equal_nan=True)
        assert overflowing.exact and overflowing.screened == 0
        nan = h.clone()
        nan[0, 3] = float("nan")  # a NaN hidden state: no screen can bound it
        torch.testing.assert_close(
            overflowing.logits(nan, big), linear(nan, big), rtol=0, atol=0, equal_nan=True
        )
        assert overflowing.screened == 0
    few = ScreenedHead(w, max_candidates=0)  # too many survivors
    assert torch.equal(few.logits(h, w), linear(h, w)) and few.screened == 0
    screen = ScreenedHead(w)
    w.mul_(2)  # changed in place: the int8 copy is stale
    with pytest.raises(ValueError, match="weight changed"):
        screen.logits(h, w)
    with pytest.raises(ValueError, match="fp32"):
        ScreenedHead(w.bfloat16())


def test_greedy_generation_uses_the_screen_and_gives_the_full_heads_tokens():
    bb = random_backbone()
    ids = torch.randint(3, 2000, (2, 9))
    new = bb.generate(ids, max_new_tokens=12, stop_token_ids=())
    assert bb.__dict__["_greedy_screen"].screened == 12  # prefill and every decoded token
    seq = ids
    with torch.no_grad():
        for _ in range(12):  # the plain way: full logits of the whole sequence, no cache
            seq = torch.cat([seq, bb(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(new, seq[:, 9:])
    # Weights changed in place: the screen is rebuilt and follows them.
    with torch.no_grad():
        bb.lm_head.weight.mul_(-1)
    again = bb.generate(ids, max_new_tokens=3, stop_token_ids=())
    with torch.no_grad():
        assert torch.equal(again[:, 0], bb(ids)[:, -1].argmax(-1))


def test_outside_fp32_on_the_cpu_it_is_the_plain_head():
    bb = random_backbone().to(torch.bfloat16)
    h = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(bb.greedy_head(h), bb.head(h))
    assert "_greedy_screen" not in bb.__dict__
    assert "_greedy_screen" not in str(list(bb.state_dict()))  # never part of a checkpoint


def test_the_onednn_rows_stand_for_h_exactly():
    """``h' = m (hi + lo / 128)`` with a power-of-two ``m``, within ``m / 256`` of ``h``; ``A >= |h'|``."""
    g = torch.Generator().manual_seed(3)
    h = torch.randn(6, 128, generator=g) * torch.tensor([1e-30, 1e-3, 1.0, 1e3, 1.0, 0.0])[:, None]
    h[4] = 127.0 * torch.sign(h[4])  # a row whose largest value is exactly 127: m = 1
    rows, m, h_used, a = _split_rows(h)
    hi, lo = rows[:6].float(), rows[6:].float()
    assert hi.abs().max() <= 127 and lo.abs().max() <= 64
    assert torch.equal(torch.log2(m), torch.log2(m).round())  # powers of two
    assert m[4].item() == 1.0
    assert torch.equal(h_used, (hi + lo / 128) * m)
    assert ((h - h_used).abs() <= m / 256).all()
    assert (a >= h_used.norm(dim=1, keepdim=True)).all()
    assert torch.equal(h_used[5], h[5])  # a zero row stays zero


def _saturating(x, q):
    """oneDNN's u8 x s8 product on a processor without VNNI, were it to take no care: the
    activations as given (shifted to u8), pairs of products summed in 16 bits with saturation
    (``vpmaddubsw``), the zero point taken back in 32 bits."""
    u, w = x.long() + 128, q.long()  # [n, d], [m, d]
    pairs = u[:, None, 0::2] * w[None, :, 0::2] + u[:, None, 1::2] * w[None, :, 1::2]  # [n, m, d / 2]
    return (pairs.clamp(-32768, 32767).sum(-1) - 128 * w.sum(-1)).float()


def _halved(x, q):
    """... or one that halves the weights to stay clear of saturation (7-bit weights)."""
    return (x.long() @ (torch.round(q.float() / 2) * 2).long().t()).float()


@pytest.mark.skipif("onednn" not in HERE, reason="oneDNN's int8 product is not usable here")
@pytest.mark.parametrize("wrong", [_saturating, _halved])
def test_the_onednn_check_refuses_saturating_or_halved_sums(monkeypatch, wrong):
    g = torch.Generator().manual_seed(0)
    full = torch.full((1, 128), 127, dtype=torch.int8)
    x = torch.cat([full, torch.randint(-127, 128, (3, 128), generator=g, dtype=torch.int8)])
    q = torch.cat([full, torch.randint(-127, 128, (5, 128), generator=g, dtype=torch.int8)])
    exact = (x.long() @ q.long().t()).float()
    assert torch.equal(greedy_head._int_product(x, q), exact)  # the real one
    assert not torch.equal(wrong(x, q), exact)  # the emulation is wrong where it should be
    try:
        ScreenedHead.kernel_is_bounded.cache_clear()
        monkeypatch.setattr(greedy_head, "_int_product", wrong)
        assert not ScreenedHead.kernel_is_bounded("onednn", 128)
        assert ScreenedHead(_matrix()).kernel == "int8pack"  # the next product is taken
    finally:
        monkeypatch.undo()
        ScreenedHead.kernel_is_bounded.cache_clear()
    assert ScreenedHead.kernel_is_bounded("onednn", 128)


def test_a_product_at_reference_speed_is_not_chosen(monkeypatch):
    """A kernel whose arithmetic checks out but that runs far slower than the fp32 product (oneDNN's
    reference kernel for int8 activations on an AMD EPYC took 180 ms against 0.7 ms) is passed over
    by default, and still taken when asked for by name."""
    first = ScreenedHead.kernel_for(128)
    assert first in HERE and ScreenedHead.kernel_is_fast(first, 128)
    slow_kernel = HERE[0]
    real = {"onednn": greedy_head._onednn_product, "int8pack": torch._weight_int8pack_mm}[slow_kernel]

    def slow(*args):
        time.sleep(0.05)  # about 50 times this width's fp32 product of 32 MB
        return real(*args)

    try:
        ScreenedHead.kernel_is_fast.cache_clear()
        if slow_kernel == "onednn":
            monkeypatch.setattr(greedy_head, "_onednn_product", slow)
        else:
            monkeypatch.setattr(torch, "_weight_int8pack_mm", slow)
        assert not ScreenedHead.kernel_is_fast(slow_kernel, 128)
        chosen = ScreenedHead(_matrix()).kernel
        assert chosen != slow_kernel and (chosen is None or chosen in HERE)
        assert ScreenedHead(_matrix(), kernel=slow_kernel).kernel == slow_kernel
    finally:
        monkeypatch.undo()
        ScreenedHead.kernel_is_fast.cache_clear()
