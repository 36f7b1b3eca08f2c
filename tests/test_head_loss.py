"""The output head's cross-entropy without kept logits: plain autograd's loss and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mm_testing import random_images

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.text_backbone import ByteTokenizer, head_loss
from mm.text_backbone.head_loss import MIN_BYTES, linear_cross_entropy

N, D, V = 37, 24, 1000


def _inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    return x, w, t


def _plain(x, w, t):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(x, w).float(), t)
    loss.backward()
    return loss.detach(), x.grad, w.grad


@pytest.mark.parametrize(
    "chunk_rows", [1, 5, 37, 100], ids=["row-by-row", "uneven-chunks", "one-chunk", "room-to-spare"]
)
def test_loss_and_both_gradients_equal_plain_autograd(chunk_rows):
    x, w, t = _inputs()
    ref_loss, ref_gx, ref_gw = _plain(x, w, t)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xs, ws, t, chunk_bytes=chunk_rows * 4 * V, min_bytes=0)
    (loss * 3.0).backward()  # an incoming gradient other than 1 is applied
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xs.grad, 3.0 * ref_gx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ws.grad, 3.0 * ref_gw, rtol=1e-5, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_the_input_gets_plain_autograds():
    x, w, t = _inputs(seed=1)
    _, ref_gx, _ = _plain(x, w, t)
    xs = x.clone().requires_grad_()
    linear_cross_entropy(xs, w, t, chunk_bytes=8 * 4 * V, min_bytes=0).backward()
    assert w.grad is None
    torch.testing.assert_close(xs.grad, ref_gx, rtol=1e-5, atol=1e-7)


def test_bf16_matches_plain_autograd_in_bf16():
    x, w, t = _inputs(torch.bfloat16, seed=2)
    ref_loss, ref_gx, ref_gw = _plain(x, w, t)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xs, ws, t, chunk_bytes=10 * 4 * V, min_bytes=0)
    loss.backward()
    assert xs.grad.dtype == ws.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.detach(), ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xs.grad, ref_gx, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(ws.grad, ref_gw, rtol=2e-2, atol=1e-4)


def test_no_logits_are_kept_for_the_backward_pass():
    x, w, t = _inputs(seed=3)
    kept = []

    def pack(tensor):
        kept.append(tuple(tensor.shape))
        return tensor

    xs = x.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.cross_entropy(F.linear(xs, w).float(), t)
    assert any(V in shape for shape in kept)  # plain autograd keeps [n, V] (the check can fail)
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        linear_cross_entropy(xs, w, t, min_bytes=0)
    assert kept and all(V not in shape for shape in kept), kept


def test_without_gradients_only_the_loss_is_computed():
    x, w, t = _inputs(seed=4)
    ref = F.cross_entropy(F.linear(x, w).float(), t)
    with torch.no_grad():
        loss = linear_cross_entropy(x.requires_grad_(), w, t, chunk_bytes=7 * 4 * V, min_bytes=0)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)


def test_small_logits_take_plain_autograd_bit_for_bit():
    x, w, t = _inputs(seed=6)  # 37 x 1000 fp32 logits: 148 KB, under MIN_BYTES
    assert 4 * N * V < MIN_BYTES
    ref_loss, ref_gx, ref_gw = _plain(x, w, t)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = linear_cross_entropy(xs, ws, t)
    loss.backward()
    assert (
        torch.equal(loss.detach(), ref_loss) and torch.equal(xs.grad, ref_gx) and torch.equal(ws.grad, ref_gw)
    )
    fused = linear_cross_entropy(x, w, t, min_bytes=4 * N * V)  # at the threshold: the fused path
    torch.testing.assert_close(fused, ref_loss, rtol=1e-6, atol=1e-6)


def test_bad_shapes_and_no_rows_are_refused():
    x, w, t = _inputs()
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(x, w, t[:-1])
    with pytest.raises(ValueError, match="no labelled position"):
        linear_cross_entropy(x[:0], w, t[:0])


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_the_models_loss_gives_the_gradients_of_its_logits_loss(fused, monkeypatch):
    if fused:  # the tiny model's logits are small: make the head's loss take the fused path anyway
        monkeypatch.setattr(head_loss, "MIN_BYTES", 0)
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny")).train()
    with torch.no_grad():
        for block in model.image_blocks:
            block.attn_gate.uniform_(-1.0, 1.0)
            block.mlp_gate.uniform_(-1.0, 1.0)
    model.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))
    images = random_images([(60, 40), (30, 50)], 5)
    conversations = [
        [
            {"role": "user", "content": [{"type": "image", "image": images[k]}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]},
        ]
        for k, (q, a) in enumerate([("What is it?", "A square."), ("Colour?", "Red, mostly red.")])
    ]
    batch = model.preprocessor.collate([model.preprocessor.encode(c) for c in conversations])
    labels = batch.pop("labels")
    trainable = [p for n, p in model.named_parameters() if not n.startswith("backbone.")]
    for p in model.backbone.parameters():
        p.requires_grad_(False)

    out = model(**batch, labels=labels)
    got = torch.autograd.grad(out.loss, trainable)
    out = model(**batch)
    keep = labels[:, 1:] != -100
    ref_loss = F.cross_entropy(out.logits[:, :-1][keep].float(), labels[:, 1:][keep])
    ref = torch.autograd.grad(ref_loss, trainable)
    torch.testing.assert_close(model(**batch, labels=labels).loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in ref)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
