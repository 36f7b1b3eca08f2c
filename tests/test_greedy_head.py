"""The screened greedy head: the fp32 argmax always, int8 screening only where its error bound holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mm_testing import random_backbone

from mm.text_backbone.greedy_head import _SAFETY, ScreenedHead, _bound, _quantize
from mm.text_backbone.linear import linear


def _matrix(v=5000, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, d, generator=g) * 0.05
    w[17] = w[4000]  # an exact tie: the argmax is the first of the two, as in the full projection
    w[18] = w[4001] * (1 + 2e-4)  # near ties, closer than the int8 screen can tell apart
    w[19] = w[4002] * (1 - 2e-4)
    w[20, :5] = 1e-6  # values int8 rounds to zero
    return w


def test_the_argmax_is_the_fp32_argmax_and_only_candidates_are_computed():
    w = _matrix()
    screen = ScreenedHead(w)
    assert screen.exact  # PyTorch's CPU int8 kernel sums in fp32
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
    assert screen.screened == len(hs)


def test_every_screened_logit_lies_within_its_bound():
    """The bound itself, row by row against float64, without its safety factor; and not vacuous."""
    w = _matrix()
    w[21] = 0.0  # a zero row
    screen = ScreenedHead(w)
    q, scale, r = _quantize(w)
    exact_r = (w.double() - q.double() * scale.double()[:, None]).norm(dim=1)
    assert (r.double() >= exact_r).all() and (r.double() <= exact_r * (1 + 1e-4) + 1e-30).all()
    g = torch.Generator().manual_seed(2)
    for scale_h in (1e-4, 0.1, 1.0, 100.0, 1e5):
        h = torch.randn(3, 128, generator=g) * scale_h
        hb = h.bfloat16()
        approx = torch._weight_int8pack_mm(hb, screen.q, screen.scale).float()
        bound = _bound(approx, h, hb, screen.row_l2, screen.row_r).double() / _SAFETY
        error = (h.double() @ w.double().t() - approx.double()).abs()
        assert (error <= bound).all()
        assert error.max() >= bound.max() / 20  # the bound is within a factor 20 of the worst error


def test_where_the_bound_does_not_hold_it_is_the_full_projection(monkeypatch):
    """The full projection: the one the head computes (:func:`~mm.text_backbone.linear.linear`)."""
    w = _matrix()
    h = torch.randn(2, 128)
    monkeypatch.setattr(ScreenedHead, "kernel_is_bounded", staticmethod(lambda d: False))
    assert torch.equal(ScreenedHead(w).logits(h, w), linear(h, w))  # the kernel could not be bounded
    monkeypatch.undo()
    big = w * 1e4
    overflowing = ScreenedHead(big)
    overflowing.logits(h * 1e36, big)  # screened sums past fp32's range: not finite
    assert overflowing.exact and overflowing.screened == 0
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
