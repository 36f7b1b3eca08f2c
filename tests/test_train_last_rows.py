"""A training forward computes its last layer's queries, attention output and MLP at the labelled
positions only, the only ones the loss reads: the loss and gradients equal the full pass's within
fp32 rounding, and ``.logits`` / ``.hidden``, if read, run that layer over every position then
(bit for bit the full pass's)."""

from __future__ import annotations

import pytest
import torch
from mm_testing import byte_samples_with_images, random_backbone, randomised, tiny_image_preprocessor

from mm import ModelConfig, MultimodalModel
from mm.training.packing import collate_packed


def _layer_inputs(bb, kind):
    """``(h [1, s, d], ctx)`` of a single row: packed samples, one causal sequence, or left padding."""
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 1000, (1, 23), generator=g)
    if kind == "segments":
        return bb.prepare(input_ids=ids, sequence_ids=torch.tensor([[0] * 6 + [1] * 12 + [2] * 5]))
    if kind == "causal":
        return bb.prepare(input_ids=ids)
    return bb.prepare(input_ids=ids, attention_mask=(torch.arange(23) >= 4).long()[None])


@pytest.mark.parametrize("width", [64, 256], ids=["f-linear", "onednn-width"])
@pytest.mark.parametrize("kind", ["segments", "causal", "masked"])
def test_the_last_layer_at_kept_rows_equals_the_full_layer_there(width, kind):
    bb = random_backbone(vocab_size=1000, embed_dim=width, intermediate_dim=2 * width, max_seq_len=64)
    h, ctx = _layer_inputs(bb, kind)
    layer = bb.layers[-1]
    # a whole span (6..17), a span's first position alone (18), scattered positions, the row's last
    rows = torch.tensor([0, 2, 3] + list(range(6, 18)) + [18, 20, 22])
    with torch.no_grad():
        full = layer(h, ctx)
        kept = layer(h, ctx, rows=rows)
    assert kept.shape == (1, len(rows), width)
    torch.testing.assert_close(kept, full[:, rows], atol=1e-5, rtol=1e-5)


def test_rows_need_a_single_row():
    bb = random_backbone(vocab_size=1000)
    h, ctx = bb.prepare(input_ids=torch.randint(3, 1000, (2, 9)))
    with pytest.raises(ValueError, match="single row"):
        bb.layers[-1](h, ctx, rows=torch.tensor([1, 2]))


def _model():
    torch.manual_seed(0)
    return randomised(MultimodalModel(ModelConfig.preset("tiny")).train())


def _grads(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(model, batch):
    """The trainer's call and the Hugging Face-style call against the full pass: a forward without
    labels, whose logits give the loss."""
    labels = batch["labels"]
    ref = model(**{k: v for k, v in batch.items() if k != "labels"})
    targets, keep = labels[:, 1:], labels[:, 1:] != -100
    if "sequence_ids" in batch:
        keep = keep & (batch["sequence_ids"][:, 1:] == batch["sequence_ids"][:, :-1])
    ref_logits, ref_hidden = ref.logits.detach(), None
    ref_loss = torch.nn.functional.cross_entropy(ref.logits[:, :-1][keep].float(), targets[keep])
    ref_grads = _grads(model, ref_loss)
    with torch.no_grad():
        ref_hidden = model(**{k: v for k, v in batch.items() if k != "labels"}).hidden
    assert len(ref_grads) > 10
    for return_logits in (False, True):
        rows = []
        hook = model.backbone.layers[-1].mlp.register_forward_hook(
            lambda m, i, o, rows=rows: rows.append(i[0].shape[1])
        )
        try:
            out = model(**batch, return_logits=return_logits)
            assert rows == [out.num_label_tokens] and 0 < out.num_label_tokens == int(keep.sum())
            torch.testing.assert_close(out.loss, ref_loss, atol=1e-6, rtol=1e-6)
            grads = _grads(model, out.loss)
            if return_logits:  # read after the step, as the full pass's, bit for bit
                assert torch.equal(out.hidden, ref_hidden) and torch.equal(out.logits, ref_logits)
                assert rows[1] > rows[0]  # the last layer over every position, once read
            else:
                assert out.logits is None and out.hidden is None
        finally:
            hook.remove()
        assert grads.keys() == ref_grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


SPECS = [(21, [1, 9], [(40, 30), (28, 56)]), (14, [2], [(30, 30)]), (26, [1], [(56, 28)])]


def test_a_padded_image_batch_gives_the_full_loss_and_gradients():
    """A right-padded batch runs as one packed row (unpadding): every sample's span is pruned."""
    model = _model()
    _compare(model, tiny_image_preprocessor().collate(byte_samples_with_images(SPECS)))


def test_with_activation_checkpointing_too():
    model = _model()
    model.activation_checkpointing = True
    _compare(model, tiny_image_preprocessor().collate(byte_samples_with_images(SPECS)))


def test_packed_rows_give_the_full_loss_and_gradients():
    """Samples packed into one row (``sequence_ids``): no target crosses a boundary either way."""
    model = _model()
    samples = byte_samples_with_images(SPECS)
    _compare(model, collate_packed(tiny_image_preprocessor(), samples, [[0, 1, 2]]))


def test_a_batch_without_a_labelled_position_still_runs():
    model = _model()
    batch = tiny_image_preprocessor().collate(byte_samples_with_images(SPECS[:1]))
    batch["labels"] = torch.full_like(batch["labels"], -100)
    out = model(**batch, return_logits=False)
    out.loss.backward()
    assert out.num_label_tokens == 0 and float(out.loss.detach()) == 0.0
