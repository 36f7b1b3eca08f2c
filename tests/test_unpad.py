"""Right-padded batches run as one packed row of their real tokens (mm.text_backbone.unpad).

Every test compares against the same model with ``backbone.unpad_padding = False``, which computes
the padding as before: the real positions must get the same logits, loss and gradients (within fp32
rounding), the padding zeros.
"""

from __future__ import annotations

import math

import pytest
import torch
from mm_testing import (
    byte_samples_with_images,
    random_backbone,
    randomised,
    tiny_av_preprocessor,
    tiny_image_preprocessor,
)

from mm import ModelConfig, MultimodalModel
from mm.text_backbone import ByteTokenizer
from mm.text_backbone.unpad import Unpadding

TOK = ByteTokenizer()
# (length, placeholder positions, image sizes)
WITH_IMAGES = [(19, [1], [(40, 30)]), (33, [2, 20], [(28, 60), (50, 50)]), (12, [1], [(30, 30)])]
ONE_WITHOUT = [(19, [1], [(40, 30)]), (26, [], []), (33, [2, 20], [(28, 60), (50, 50)])]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return randomised(MultimodalModel(ModelConfig.preset("tiny")).eval())


def run(model, batch, unpad):
    """Loss, logits and trainable gradients of one forward/backward pass."""
    model.backbone.unpad_padding = unpad
    try:
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.loss.detach(), out.logits.detach(), grads
    finally:
        model.backbone.unpad_padding = True


def test_which_batches_are_unpadded():
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    u = Unpadding.of(right)
    assert u is not None
    assert u.index.tolist() == [0, 1, 2, 4, 5, 6, 7, 8]
    assert u.sequence_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2]]
    assert (u.lengths, u.shape) == ((3, 4, 1), (3, 4))
    assert Unpadding.of(right.bool()) is not None
    assert Unpadding.of(None) is None
    assert Unpadding.of(torch.ones(2, 5, dtype=torch.long)) is None  # no padding
    assert Unpadding.of(torch.tensor([[0, 1, 1], [1, 1, 1]])) is None  # left padding
    assert Unpadding.of(torch.tensor([[1, 0, 1], [1, 1, 1]])) is None  # a hole
    assert Unpadding.of(torch.tensor([[0, 0, 0], [1, 1, 0]])) is None  # a row without tokens
    assert Unpadding.of(torch.tensor([[1, 2, 0], [1, 1, 1]])) is None  # not a 0/1 mask
    labels = torch.tensor([[5, 6, 7, -100], [1, 2, 3, 4], [9, -100, -100, -100]])
    assert Unpadding.of(right, labels) is not None
    labels[0, 3] = 8  # a label on the padding: Hugging Face's loss counts it, so run padded
    assert Unpadding.of(right, labels) is None


def test_pack_and_unpack():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    u = Unpadding.of(mask)
    x = torch.arange(18.0).view(2, 3, 3)
    packed = u.pack(x)
    assert packed.shape == (1, 5, 3)
    assert torch.equal(packed[0], x[mask.bool()])
    back = u.unpack(packed)
    assert torch.equal(back[mask.bool()], x[mask.bool()])
    assert not back[0, 2].any()
    assert u.pack_optional(None) is None


def test_backbone_unpads_right_padding_and_equals_each_row_alone():
    bb = random_backbone()
    g = torch.Generator().manual_seed(1)
    lengths = [7, 12, 4]
    ids = torch.randint(0, 2000, (3, 12), generator=g)
    mask = (torch.arange(12)[None] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        unpadded = bb(ids, attention_mask=mask)
        bb.unpad_padding = False
        padded = bb(ids, attention_mask=mask)
        bb.unpad_padding = True
        for i, n in enumerate(lengths):
            alone = bb(ids[i : i + 1, :n])[0]
            torch.testing.assert_close(unpadded[i, :n], alone, atol=1e-5, rtol=0)
    real = mask.bool()
    torch.testing.assert_close(unpadded[real], padded[real], atol=1e-5, rtol=0)
    assert not unpadded[~real].any() and padded[~real].abs().sum() > 0  # padding: zeros, not computed


@pytest.mark.parametrize("specs", [WITH_IMAGES, ONE_WITHOUT], ids=["every-row-sees-images", "a-row-without"])
def test_a_right_padded_batch_gets_the_padded_loss_gradients_and_logits(model, specs):
    batch = tiny_image_preprocessor().collate(byte_samples_with_images(specs))
    real = batch["attention_mask"].bool()
    assert not bool(real.all())  # the batch is padded
    loss, logits, grads = run(model, batch, unpad=True)
    ref_loss, ref_logits, ref_grads = run(model, batch, unpad=False)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-5)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=0)
    assert not logits[~real].any() and ref_logits[~real].abs().sum() > 0
    assert grads.keys() == ref_grads.keys()
    assert any(n.startswith("image_blocks") for n in grads) and any(
        n.startswith("image_encoder") for n in grads
    )
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_each_row_of_an_unpadded_batch_gets_what_it_gets_alone(model):
    pre, samples = tiny_image_preprocessor(), byte_samples_with_images(ONE_WITHOUT)
    with torch.no_grad():
        both = model(**pre.collate(samples)).logits
        for i, s in enumerate(samples):
            alone = model(**pre.collate([s])).logits[0]
            torch.testing.assert_close(both[i, : len(s.ids)], alone, atol=1e-5, rtol=0)


def test_a_text_only_right_padded_batch_is_the_backbone_bit_for_bit(model):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 256, (3, 10), generator=g)
    mask = (torch.arange(10)[None] < torch.tensor([10, 6, 3])[:, None]).long()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, model.backbone(ids, attention_mask=mask))


def test_padding_that_must_be_computed_runs_padded(model):
    pre, samples = tiny_image_preprocessor(), byte_samples_with_images(WITH_IMAGES)
    # A label on the padding (Hugging Face counts it): the loss is the padded one, bit for bit.
    batch = pre.collate(samples)
    labels = batch["labels"].clone()
    labels[~batch["attention_mask"].bool()] = 7
    batch["labels"] = labels
    loss, _, _ = run(model, batch, unpad=True)
    ref, _, _ = run(model, batch, unpad=False)
    assert torch.equal(loss, ref)
    # Left padding: unchanged, bit for bit.
    left = pre.collate(samples, padding_side="left")
    with torch.no_grad():
        a = model(**left).logits
        model.backbone.unpad_padding = False
        b = model(**left).logits
        model.backbone.unpad_padding = True
    assert torch.equal(a, b)


def _frames(seed, n=8, size=(40, 30)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def test_video_and_audio_rows_unpad_too():
    torch.manual_seed(0)
    m = randomised(MultimodalModel(ModelConfig.preset("tiny-av")).eval())
    m.preprocessor = pre = tiny_av_preprocessor(8)
    tone = 0.3 * torch.sin(2 * math.pi * 440.0 * torch.arange(12000) / 16000)
    convs = [
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": _frames(0)}, {"type": "text", "text": "What?"}],
            },
            {"role": "assistant", "content": "a red square moving right"},
        ],
        [
            {
                "role": "user",
                "content": [{"type": "text", "text": "Repeat."}, {"type": "audio", "audio": tone}],
            },
            {"role": "assistant", "content": "hi"},
        ],
        [
            {
                "role": "user",
                "content": [{"type": "video", "video": _frames(1)}, {"type": "text", "text": "Colour?"}],
            },
            {"role": "assistant", "content": "blue"},
        ],
    ]
    batch = pre.collate([pre.encode(c) for c in convs])
    real = batch["attention_mask"].bool()
    assert not bool(real.all()) and batch["video"] is not None and batch["audio"] is not None
    loss, logits, grads = run(m, batch, unpad=True)
    ref_loss, ref_logits, ref_grads = run(m, batch, unpad=False)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-5)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=0)
    assert not logits[~real].any()
    assert any(n.startswith("video_blocks") for n in grads) and any(
        n.startswith("speech_adapter") for n in grads
    )
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_mask_of_the_wrong_shape_is_still_named():
    bb = random_backbone()
    ids = torch.randint(0, 2000, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]])  # one column too many
    with pytest.raises(ValueError, match="attention_mask must cover past and new tokens"):
        bb(ids, attention_mask=mask)
