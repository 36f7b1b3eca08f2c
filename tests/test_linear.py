"""The backbone's linear layer: fp32 CPU products through oneDNN, decoding's few-row products spread
over threads, F.linear's values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mm_testing import random_backbone

from mm.text_backbone import linear as linear_module
from mm.text_backbone.linear import (
    AS_COLUMNS,
    FEW_ROWS,
    MIN_WEIGHT,
    ONEDNN_OK,
    Linear,
    linear,
    linear_parts,
    policy,
    project,
)

needs_onednn = pytest.mark.skipif(not ONEDNN_OK, reason="oneDNN's linear op is not in this PyTorch build")


@pytest.fixture(autouse=True)
def _paths_taken_off_intel(monkeypatch):
    """These tests check the paths :func:`linear` takes where MKL runs its AVX2 kernels (an AMD
    processor), whatever processor runs them: oneDNN where the build has it, and the split."""
    monkeypatch.setattr(linear_module, "ONEDNN", ONEDNN_OK)
    monkeypatch.setattr(linear_module, "SPLIT", True)


def test_on_intel_every_product_is_f_linear_and_elsewhere_onednn_and_the_split_are_taken():
    assert policy("GenuineIntel", True) == (False, False)  # MKL runs its AVX-512 kernels there
    assert policy("AuthenticAMD", True) == (True, True)
    assert policy("AuthenticAMD", False) == (False, True)  # no oneDNN op: F.linear, and the split
    assert policy("", True) == (True, True)


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
def onednn_calls(monkeypatch):
    """Counts the oneDNN products :func:`linear` makes (forward and backward), passing each through."""
    calls = []
    real = linear_module._onednn

    def counting(x, w, bias=None):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return real(x, w, bias)

    monkeypatch.setattr(linear_module, "_onednn", counting)
    return calls


@pytest.fixture(params=[True, False], ids=["onednn", "no-onednn"])
def onednn(request, monkeypatch):
    """Runs a test with oneDNN (where the build has it) and without (``MM_ONEDNN_LINEAR=0``)."""
    if request.param and not ONEDNN_OK:
        pytest.skip("oneDNN's linear op is not in this PyTorch build")
    monkeypatch.setattr(linear_module, "ONEDNN", request.param)
    return request.param


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
def test_few_rows_are_split_over_the_threads_and_give_f_linears_values(
    n, k, lead, bmm_calls, onednn_calls, onednn, two_threads
):
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(*lead, k, generator=g)
    with torch.no_grad():
        got = linear(x, w)
    r, p = x.numel() // k, 4  # rows; parts: twice the threads
    if r <= AS_COLUMNS:  # W @ x^T, part by part
        assert bmm_calls == [((p, n // p, k), (p, k, r))] and onednn_calls == []
    elif onednn:  # 5 to 16 rows: oneDNN reads the matrix faster than the split
        assert bmm_calls == [] and onednn_calls == [((*lead, k), (n, k))]
    else:  # x @ W^T, part by part
        assert bmm_calls == [((p, r, k), (p, k, n // p))]
    assert got.shape == (*lead, n) and got.is_contiguous()
    # Each output is the same k products summed in another order: fp32 rounding apart.
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    exact = F.linear(x.double(), w.double())
    # Any order of summing k fp32 products stays within k units of rounding of sum |x_i w_i|
    # (Higham's bound); oneDNN's error is about twice MKL's on average, well inside it. (How the
    # split's error compares with F.linear's depends on the kernels MKL picks: similar where it runs
    # AVX2, about 3.5 times it where it runs AVX-512, on an Intel processor.)
    bound = k * 2.0**-24 * F.linear(x.double().abs(), w.double().abs())
    assert ((got.double() - exact).abs() <= bound).all()


def test_everything_else_is_f_linear_or_onednn(bmm_calls, onednn_calls, onednn, two_threads):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g)
    x = torch.randn(1, 256, generator=g)
    many = torch.randn(FEW_ROWS + 1, 256, generator=g)  # prefill, training: many rows
    if onednn:
        torch.testing.assert_close(linear(many, w), F.linear(many, w), rtol=1e-5, atol=1e-5)
        assert onednn_calls == [((FEW_ROWS + 1, 256), (512, 256))]
        onednn_calls.clear()
    else:
        assert torch.equal(linear(many, w), F.linear(many, w))
    small = w[: MIN_WEIGHT // 256 - 4].contiguous()  # a matrix that stays in cache: F.linear always
    assert torch.equal(linear(x, small), F.linear(x, small))
    assert torch.equal(linear(many, small), F.linear(many, small))
    assert torch.equal(linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    assert torch.equal(linear(many.double(), w.double()), F.linear(many.double(), w.double()))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the trainer's bf16: autocast's F.linear
        auto = linear(many, w)
        assert auto.dtype == torch.bfloat16 and torch.equal(auto, F.linear(many, w))
    assert onednn_calls == []
    # Not split (rows that do not divide into the parts, a bias, a non-contiguous weight, one
    # thread): oneDNN where the build has it, else F.linear.
    odd = w[:510].contiguous()
    bias = torch.randn(512, generator=g)
    view = w.t().contiguous().t()
    cases = [(x, odd, None), (x, w, bias), (x, view, None)]
    for a, b, c in cases:
        close = torch.testing.assert_close if onednn else lambda p, q: torch.equal(p, q) or pytest.fail("")
        close(linear(a, b, c), F.linear(a, b, c))
    torch.set_num_threads(1)
    close(linear(x, w), F.linear(x, w))
    torch.set_num_threads(2)
    assert bmm_calls == []
    assert len(onednn_calls) == (4 if onednn else 0)
    onednn_calls.clear()
    # A gradient wanted (training): never split; oneDNN's products or F.linear, and the gradient arrives.
    wg = w.clone().requires_grad_(True)
    linear(x, wg).sum().backward()
    assert bmm_calls == [] and torch.equal(wg.grad, x.expand(512, 256))
    assert len(onednn_calls) == (2 if onednn else 0)  # forward, and the weight's gradient
    with torch.no_grad():  # the same call without a gradient is split
        linear(x, wg)
    assert len(bmm_calls) == 1


@pytest.mark.parametrize("r", [2, 3, 4])
def test_a_column_major_input_is_read_row_major(r, monkeypatch, two_threads):
    """2 to 4 rows stored column-major (as an elementwise product of two split outputs would be):
    the split still multiplies W by a strided view of row-major rows (MKL's batched product of a
    column-major x^T is 5x slower) and returns row-major rows, so no layout carries on."""
    seen = []
    real = torch.bmm

    def recording(a, b):
        seen.append(b.stride())
        return real(a, b)

    monkeypatch.setattr(torch, "bmm", recording)
    g = torch.Generator().manual_seed(r)
    w = torch.randn(512, 1792, generator=g) * 0.05
    x = torch.randn(1792, r, generator=g).t()  # [r, k], column-major
    with torch.no_grad():
        got = linear(x, w)
    assert seen == [(0, 1, 1792)]  # x^T as a view of row-major rows
    assert got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("lead", [(7,), (3, 50), (2, 1, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_gradients_are_f_linears(lead, bias, onednn_calls, two_threads):
    """Forward and every gradient (input, weight, bias) equal F.linear's autograd up to fp32 rounding,
    with a random upstream gradient and with an expanded one (a sum's)."""
    g = torch.Generator().manual_seed(len(lead) + bias)
    k, n = 384, 640
    tensors = [torch.randn(*lead, k, generator=g), torch.randn(n, k, generator=g) * 0.05]
    tensors.append(torch.randn(n, generator=g) if bias else None)
    upstream = torch.randn(*lead, n, generator=g)
    got, want = [], []
    for fn, out in ((linear, got), (F.linear, want)):
        x, w, b = (None if t is None else t.clone().requires_grad_(True) for t in tensors)
        y = fn(x, w, b)
        (y * upstream).sum().backward()
        out += [y.detach(), x.grad, w.grad] + ([b.grad] if bias else [])
        x.grad = w.grad = None
        fn(x, w, b).sum().backward()  # an expanded upstream gradient
        out += [x.grad, w.grad]
    assert len(onednn_calls) == 2 * 3
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_keeps_what_f_linear_keeps_and_only_the_gradients_asked_for(onednn_calls):
    """A frozen weight gets no gradient and costs no weight product; a frozen input likewise."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 256, generator=g, requires_grad=True)
    w = torch.randn(512, 256, generator=g)  # frozen
    linear(x, w).sum().backward()
    assert w.grad is None and x.grad is not None
    assert onednn_calls == [((20, 256), (512, 256)), ((20, 512), (256, 512))]  # forward, g @ W
    onednn_calls.clear()
    wl = w.clone().requires_grad_(True)
    linear(x.detach(), wl).sum().backward()
    assert wl.grad is not None
    assert onednn_calls == [((20, 256), (512, 256)), ((512, 20), (256, 20))]  # forward, g^T @ x
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        linear(x, wl).sum().backward()
    assert saved == [torch.Size([20, 256]), torch.Size([512, 256])]


@needs_onednn
def test_a_row_does_not_depend_on_the_other_rows(two_threads):
    """Batched requests: each row's product through oneDNN is the same bits as that row alone (or
    among other rows), so a batch's answers do not depend on what else it holds."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(1792, 512, generator=g)
    rows = torch.randn(16, 512, generator=g)
    with torch.no_grad():
        batch = linear(rows, w)
        for r in (5, 8, 12):
            assert torch.equal(linear(rows[:r], w), batch[:r])
            assert torch.equal(linear(rows[16 - r :], w), batch[16 - r :])


def test_linear_module_keeps_nn_linear_parameters_and_keys():
    layer = Linear(32, 64, bias=False)
    assert isinstance(layer, torch.nn.Linear)
    assert list(layer.state_dict()) == ["weight"]
    x = torch.randn(1, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight))


def test_decoding_through_the_split_gives_f_linears_logits_and_tokens(bmm_calls, two_threads, monkeypatch):
    """A backbone's decode steps (prompts of 1 and of 6 rows, then one token each at a time through
    the KV cache) give F.linear's logits up to fp32 rounding with the split (and oneDNN's)
    products, and the same greedy tokens."""
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
    monkeypatch.setattr("mm.text_backbone.linear.AS_COLUMNS", 0)
    monkeypatch.setattr("mm.text_backbone.linear.ONEDNN", False)
    plain, plain_tokens = run()
    assert len(bmm_calls) == calls
    torch.testing.assert_close(split, plain, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(split_tokens, plain_tokens))


@needs_onednn
def test_a_training_step_through_onednn_gives_f_linears_loss_and_gradients(
    onednn_calls, monkeypatch, two_threads
):
    """A backbone whose matrices take the oneDNN path (width 256): loss and every parameter's
    gradient equal those of F.linear everywhere up to fp32 rounding, and oneDNN really ran, in the
    forward and the backward pass."""
    bb = random_backbone(vocab_size=1000, embed_dim=256, intermediate_dim=512, max_seq_len=64).train()
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 1000, (3, 24), generator=g)

    def step():
        bb.zero_grad(set_to_none=True)
        logits = bb(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in bb.named_parameters()}

    loss, grads = step()
    # Forward: q, o and the MLP's three in each of 2 layers, and the head (k and v are under
    # MIN_WEIGHT); backward: the input's and the weight's gradient of each.
    forward = sum(1 for x, _ in onednn_calls if len(x) == 3)
    assert forward == 2 * 5 + 1 and len(onednn_calls) == 3 * forward
    monkeypatch.setattr("mm.text_backbone.linear.ONEDNN", False)
    calls = len(onednn_calls)
    plain_loss, plain_grads = step()
    assert len(onednn_calls) == calls
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-4, atol=1e-6, msg=name)


needs_packing = pytest.mark.skipif(linear_module.PACK_BYTES == 0, reason="no packed weight copies here")


@pytest.mark.parametrize("rows", [AS_COLUMNS + 1, 8, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
@needs_packing
def test_inference_mode_multiplies_by_a_kept_copy_with_the_plain_weights_values(rows, bias, two_threads):
    """In inference mode each weight is copied once into oneDNN's layout, and the product by the
    copy is the plain weight's product bit for bit, for every shape of the bench's layers."""
    g = torch.Generator().manual_seed(rows)
    for n, k in SHAPES:
        w = torch.nn.Parameter(torch.randn(n, k, generator=g) / k**0.5)
        b = torch.randn(n, generator=g) if bias else None
        x = torch.randn(1, rows, k, generator=g)
        with torch.inference_mode():
            first = linear(x, w, b)
            assert id(w) in linear_module._PACKED, (n, k)
            copy = linear_module._PACKED[id(w)].copy
            again = linear(x, w, b)
            assert linear_module._PACKED[id(w)].copy is copy  # kept, not made again
        plain = linear_module._onednn(x, w.detach(), b)
        assert torch.equal(first, plain) and torch.equal(again, plain), (n, k)
        torch.testing.assert_close(first, F.linear(x, w.detach(), b), rtol=1e-5, atol=1e-5)


@needs_packing
def test_a_changed_weight_gets_a_new_copy(two_threads):
    """An in-place update, load_state_dict and a swapped .data each make the next product read the
    new values, never the kept copy of the old ones."""
    layer = Linear(512, 1792, bias=False)
    x = torch.randn(16, 512)

    def product():
        with torch.inference_mode():
            return layer(x)

    def check():
        got = product()
        assert torch.equal(got, linear_module._onednn(x, layer.weight.detach()))
        return got

    before = check()
    with torch.no_grad():
        layer.weight.mul_(-1.0)  # an optimiser's step: same tensor, same storage, new version
    assert torch.equal(check(), -before)
    layer.load_state_dict({"weight": torch.randn(1792, 512)})
    after_load = check()
    layer.weight.data = torch.randn(1792, 512)  # new storage, the version may stay
    assert not torch.equal(check(), after_load)


@needs_packing
def test_copies_stay_within_the_budget_and_go_with_their_weight(monkeypatch, two_threads):
    size = 1792 * 512 * 4
    monkeypatch.setattr(linear_module, "PACK_BYTES", linear_module._packed_bytes + size)
    first, second = torch.randn(1792, 512), torch.randn(1792, 512)
    x = torch.randn(8, 512)
    with torch.inference_mode():
        linear(x, first)
        out = linear(x, second)  # over the budget: multiplied plain, still right
    assert id(first) in linear_module._PACKED and id(second) not in linear_module._PACKED
    assert torch.equal(out, linear_module._onednn(x, second))
    spent = linear_module._packed_bytes
    del first
    assert linear_module._packed_bytes == spent - size
    with torch.inference_mode():
        linear(x, second)  # the freed bytes now take the second weight's copy
    assert id(second) in linear_module._PACKED


@needs_packing
def test_no_copy_outside_inference_mode_or_for_few_rows_or_a_view(two_threads):
    w = torch.nn.Parameter(torch.randn(1792, 512))
    with torch.no_grad():
        linear(torch.randn(8, 512), w)
    linear(torch.randn(8, 512), w).sum().backward()
    with torch.inference_mode():
        linear(torch.randn(AS_COLUMNS, 512), w)  # few rows: the split, from the plain weight
        linear(torch.randn(8, 512), w.detach()[:896])  # a view
    assert id(w) not in linear_module._PACKED


@needs_packing
def test_generation_through_kept_copies_gives_the_plain_weights_logits_bit_for_bit(two_threads, monkeypatch):
    """A backbone wide enough for oneDNN (256): prefill and cached decode steps of a batch of 6
    give the same logits bit for bit with and without the copies, and the same greedy tokens."""
    bb = random_backbone(vocab_size=1000, embed_dim=256, intermediate_dim=512, max_seq_len=64)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 1000, (6, 12), generator=g)
    new = torch.randint(3, 1000, (6, 3), generator=g)

    def run():
        cache = bb.new_cache(6, 15)
        with torch.inference_mode():
            steps = [bb(ids, cache=cache)] + [bb(new[:, i : i + 1], cache=cache) for i in range(3)]
        return torch.cat(steps, dim=1), bb.generate(ids, max_new_tokens=6, stop_token_ids=())

    copied, copied_tokens = run()
    assert any(id(p) in linear_module._PACKED for p in bb.parameters())
    monkeypatch.setattr(linear_module, "packed", lambda *weights: None)
    plain, plain_tokens = run()
    assert torch.equal(copied, plain) and torch.equal(copied_tokens, plain_tokens)


# Weights multiplied side by side: q/k/v of the bench's text layers, its MLP's gate and up, the
# image encoder's q/k/v, a cross-attention block's k/v.
GROUPS = [
    [(512, 512), (128, 512), (128, 512)],
    [(1792, 512), (1792, 512)],
    [(256, 256), (256, 256), (256, 256)],
    [(128, 512), (128, 512)],
]


@pytest.mark.parametrize("rows", [AS_COLUMNS + 1, 8, 64, 288])
@pytest.mark.parametrize("group", GROUPS, ids=["qkv", "gate-up", "vision-qkv", "kv"])
@needs_packing
def test_weights_side_by_side_give_each_ones_own_product_bit_for_bit(rows, group, two_threads):
    """In inference mode linear_parts makes one product by a kept copy of the weights stacked, and
    each part equals the weight's own product (by its own kept copy, or plain) bit for bit."""
    g = torch.Generator().manual_seed(rows + len(group))
    ws = [torch.nn.Parameter(torch.randn(n, k, generator=g) / k**0.5) for n, k in group]
    x = torch.randn(1, rows, group[0][1], generator=g)
    key = tuple(id(w) for w in ws)
    with torch.inference_mode():
        parts = linear_parts(x, *ws)
        assert key in linear_module._PACKED
        copy = linear_module._PACKED[key].copy
        alone = [linear(x, w) for w in ws]
        again = linear_parts(x, *ws)
        assert linear_module._PACKED[key].copy is copy  # kept, not made again
    for w, part, one, second in zip(ws, parts, alone, again, strict=True):
        assert part.shape == (1, rows, w.shape[0])
        assert torch.equal(part, one) and torch.equal(second, one)
        assert torch.equal(part, linear_module._onednn(x, w.detach()))


@needs_packing
def test_weights_side_by_side_follow_a_change_and_go_with_a_weight(two_threads):
    """An in-place change of any one weight makes a new stacked copy; a weight that is freed takes
    the copy (and its bytes) with it; outside inference mode, or with few rows, nothing is stacked."""
    q, k = torch.nn.Parameter(torch.randn(512, 512)), torch.nn.Parameter(torch.randn(128, 512))
    x = torch.randn(1, 16, 512)
    with torch.inference_mode():
        linear_parts(x, q, k)
    with torch.no_grad():
        k.mul_(-1.0)
    with torch.inference_mode():
        _, neg = linear_parts(x, q, k)
    assert torch.equal(neg, linear_module._onednn(x, k.detach()))
    key, size = (id(q), id(k)), (512 + 128) * 512 * 4
    spent = linear_module._packed_bytes
    assert key in linear_module._PACKED and linear_module._PACKED[key].size == size
    del k, neg
    assert key not in linear_module._PACKED and linear_module._packed_bytes == spent - size

    a, b = torch.nn.Parameter(torch.randn(256, 256)), torch.nn.Parameter(torch.randn(256, 256))
    with torch.no_grad():
        outs = linear_parts(torch.randn(1, 16, 256), a, b)
    with torch.inference_mode():
        few = linear_parts(torch.randn(1, AS_COLUMNS, 256), a, b)
    assert (id(a), id(b)) not in linear_module._PACKED
    assert [o.shape[-1] for o in (*outs, *few)] == [256] * 4


@needs_packing
def test_project_runs_a_layer_that_is_not_plain_through_its_own_forward(two_threads):
    """project takes the stacked product only for plain bias-free Linear layers without hooks."""
    plain = [Linear(256, 256, bias=False) for _ in range(2)]
    x = torch.randn(1, 16, 256)
    with torch.inference_mode():
        outs = project(x, *plain)
    assert tuple(id(layer.weight) for layer in plain) in linear_module._PACKED
    assert all(torch.equal(o, layer(x)) for o, layer in zip(outs, plain, strict=True))

    seen = []
    hooked = Linear(256, 256, bias=False)
    hooked.register_forward_hook(lambda module, args, out: seen.append(out.shape) or out * 2)
    biased = Linear(256, 256)
    with torch.inference_mode():
        doubled, with_bias = project(x, hooked, biased)
    assert seen == [(1, 16, 256)]
    assert torch.equal(doubled, 2 * linear(x, hooked.weight))
    assert torch.equal(with_bias, linear(x, biased.weight, biased.bias))
    assert (id(hooked.weight), id(biased.weight)) not in linear_module._PACKED
