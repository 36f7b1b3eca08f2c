"""The backbone's linear layer: decoding's few-row products spread over threads, F.linear's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mm_testing import random_backbone

from mm.text_backbone.linear import AS_COLUMNS, FEW_ROWS, MIN_WEIGHT, Linear, linear


@pytest.fixture
def bmm_calls(monkeypatch):
    """Counts the batched products :func:`linear` makes (its split path), passing each through."""
    calls = []
    real = torch.bmm

    def counting(a, b):
        calls.append((tuple(a.shape), tuple(b.shape)))
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", counting)
    return calls


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# The products of a decoded token in Llama 3.2 Vision-like layouts: q/o, k/v, MLP in and out, a head.
SHAPES = [(512, 512), (128, 512), (1792, 512), (512, 1792), (4096, 512)]


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("lead", [(1,), (1, 1), (4, 1), (2, 2), (5,), (8, 1), (16,), (2, 3)])
def test_few_rows_are_split_over_the_threads_and_give_f_linears_values(n, k, lead, bmm_calls, two_threads):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(*lead, k, generator=g)
    with torch.no_grad():
        got = linear(x, w)
    r, p = x.numel() // k, 4  # rows; parts: twice the threads
    if r <= AS_COLUMNS:  # W @ x^T, part by part
        assert bmm_calls == [((p, n // p, k), (p, k, r))]
    else:  # x @ W^T, part by part
        assert bmm_calls == [((p, r, k), (p, k, n // p))]
    assert got.shape == (*lead, n)
    # Each output is the same k products summed in another order: fp32 rounding apart.
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    exact = F.linear(x.double(), w.double()).float()
    assert (got - exact).abs().max() <= 2 * (F.linear(x, w) - exact).abs().max() + 1e-6


def test_everything_else_is_f_linear(bmm_calls, two_threads):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g)
    x = torch.randn(1, 256, generator=g)
    many = torch.randn(FEW_ROWS + 1, 256, generator=g)  # prefill, training: many rows
    assert torch.equal(linear(many, w), F.linear(many, w))
    small = w[: MIN_WEIGHT // 256 - 4].contiguous()  # a matrix that stays in cache
    assert torch.equal(linear(x, small), F.linear(x, small))
    odd = w[:510].contiguous()  # rows that do not split evenly into the parts
    assert torch.equal(linear(x, odd), F.linear(x, odd))
    bias = torch.randn(512, generator=g)
    assert torch.equal(linear(x, w, bias), F.linear(x, w, bias))
    assert torch.equal(linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    view = w.t().contiguous().t()  # non-contiguous
    assert torch.equal(linear(x, view), F.linear(x, view))
    torch.set_num_threads(1)
    assert torch.equal(linear(x, w), F.linear(x, w))
    torch.set_num_threads(2)
    assert bmm_calls == []
    # A gradient wanted (training): F.linear, and the gradient arrives.
    wg = w.clone().requires_grad_(True)
    linear(x, wg).sum().backward()
    assert bmm_calls == [] and torch.equal(wg.grad, x.expand(512, 256))
    with torch.no_grad():  # the same call without a gradient is split
        linear(x, wg)
    assert len(bmm_calls) == 1


def test_linear_module_keeps_nn_linear_parameters_and_keys():
    layer = Linear(32, 64, bias=False)
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(1, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_decoding_through_the_split_gives_f_linears_logits_and_tokens(bmm_calls, two_threads, monkeypatch):
    """A backbone's decode steps (prompts of 1 and of 6 rows, then one token each at a time through
    the KV cache) give F.linear's logits up to fp32 rounding with the split products, and the same
    greedy tokens."""
    bb = random_backbone(vocab_size=1000, embed_dim=256, intermediate_dim=512, max_seq_len=64)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 1000, (1, 20), generator=g)  # prefill: more than FEW_ROWS rows, F.linear
    new = torch.randint(3, 1000, (1, 5), generator=g)
    batch = torch.randint(3, 1000, (6, 9), generator=g)

    def run():
        cache = bb.new_cache(1, 25)
        with torch.inference_mode():
            steps = [bb(ids, cache=cache, last_only=True)]
            steps += [bb(new[:, i : i + 1], cache=cache) for i in range(new.shape[1])]
        tokens = [bb.generate(ids, max_new_tokens=8, stop_token_ids=()), bb.generate(batch, max_new_tokens=8)]
        return torch.cat(steps, dim=1), tokens  # [1, 6, V]

    split, split_tokens = run()
    # Per decoded token: q, o and the MLP's three products in each layer (k and v are under
    # MIN_WEIGHT), and the output head of every step (its fp32 rows in greedy decoding).
    assert sum(1 for a, _ in bmm_calls if a[0] == 4) >= 5 * (2 * 5 + 1)
    calls = len(bmm_calls)
    monkeypatch.setattr("mm.text_backbone.linear.FEW_ROWS", 0)  # F.linear everywhere
    plain, plain_tokens = run()
    assert len(bmm_calls) == calls
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(split_tokens, plain_tokens))
