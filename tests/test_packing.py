"""Packed training: a packed sample gets exactly the logits, loss and gradients it gets alone."""

from __future__ import annotations

import pytest
import torch
from mm_testing import byte_samples_with_images, randomised, tiny_image_preprocessor

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor
from mm.datasets.cross_attention_mask import cross_attention_mask
from mm.datasets.preprocessing import Preprocessor
from mm.text_backbone import ByteTokenizer
from mm.text_backbone.model import packed_positions
from mm.training.packing import collate_packed, pack_samples, per_sample_losses

TOK = ByteTokenizer()
IMAGE = TOK.image_id
MAX_LEN = 64
# (length, placeholder positions, image sizes): 0, 1 and 2 images, one image at the very start.
SPECS = [
    (37, [], []),
    (23, [5], [(40, 30)]),
    (30, [3, 15], [(28, 60), (50, 50)]),
    (12, [1], [(30, 30)]),
    (9, [], []),
]
# First-fit decreasing by hand: 37 | 30 | 23 -> row 0 (60) | 12 -> row 1 (42) | 9 -> row 1 (51).
ROWS = [[0, 1], [2, 3, 4]]


def make_samples(seed=0):
    return byte_samples_with_images(SPECS, seed)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = randomised(MultimodalModel(ModelConfig.preset("tiny")).eval())
    assert all(bool(b.attn_gate != 0) and bool(b.mlp_gate != 0) for b in m.image_blocks)
    return m


def preprocessor(mode):
    return tiny_image_preprocessor(mask_mode=mode)


def test_pack_samples_first_fit_decreasing():
    lengths = [n for n, _, _ in SPECS]
    rows = pack_samples(lengths, MAX_LEN)
    assert rows == ROWS
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= MAX_LEN for r in rows)
    rng = torch.Generator().manual_seed(3)
    many = torch.randint(1, 50, (200,), generator=rng).tolist()
    rows = pack_samples(many, 50)
    assert sorted(i for r in rows for i in r) == list(range(200))
    assert all(sum(many[i] for i in r) <= 50 for r in rows)
    assert len(rows) <= -(-sum(many) // 50) * 11 // 9 + 1  # FFD's bound: 11/9 OPT + 1 (OPT >= total/50)
    with pytest.raises(ValueError, match="sample 1 has 65 tokens"):
        pack_samples([3, 65], 64)


def test_packed_positions():
    seq = torch.tensor([[0, 0, 0, 1, 1, -1], [2, 3, 3, 3, 3, 3]])
    assert packed_positions(seq).tolist() == [[0, 1, 2, 0, 1, 0], [0, 0, 1, 2, 3, 4]]


@pytest.mark.parametrize("mode", ["all_previous", "most_recent"])
def test_collate_packed_layout(mode):
    samples = make_samples()
    pre = preprocessor(mode)
    batch = collate_packed(pre, samples, ROWS)
    assert "attention_mask" not in batch
    assert batch["input_ids"].shape == (2, 60)
    seq, pos, xmask = batch["sequence_ids"], batch["position_ids"], batch["cross_attention_mask"]
    assert seq[0].tolist() == [0] * 37 + [1] * 23
    assert seq[1].tolist() == [2] * 30 + [3] * 12 + [4] * 9 + [-1] * 9
    assert xmask.shape[2] == 3  # row 1 holds 2 + 1 images
    for r, row in enumerate(ROWS):
        start, first = 0, 0
        for i in row:
            s = samples[i]
            n = len(s.ids)
            assert batch["input_ids"][r, start : start + n].tolist() == s.ids
            assert pos[r, start : start + n].tolist() == list(range(n))
            assert batch["labels"][r, start].item() == -100
            assert batch["labels"][r, start + 1 : start + n].tolist() == s.labels[1:]
            alone = pre.collate([s])
            own = xmask[r, start : start + n]
            k = len(s.images)
            if k:
                expect = cross_attention_mask(
                    s.ids,
                    alone["aspect_ratio_mask"][0].sum(-1).tolist(),
                    media_token_id=IMAGE,
                    max_tiles=4,
                    mode=mode,
                )
                assert torch.equal(own[:, first : first + k], expect)
                assert torch.equal(alone["cross_attention_mask"][0], expect)
            assert not own[:, :first].any() and not own[:, first + k :].any()
            start += n
            first += k
        assert not xmask[r, start:].any()


def test_rows_fit_max_len():
    samples = make_samples()
    batch = collate_packed(
        preprocessor("all_previous"), samples, pack_samples([len(s.ids) for s in samples], MAX_LEN)
    )
    assert batch["input_ids"].shape[1] <= MAX_LEN
    with pytest.raises(ValueError, match="every sample index exactly once"):
        collate_packed(preprocessor("all_previous"), samples, [[0, 1], [2, 3]])


def trainable_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@pytest.mark.parametrize("mode", ["all_previous", "most_recent"])
def test_packed_equals_alone(model, mode):
    samples = make_samples(seed=1)
    pre = preprocessor(mode)
    packed = collate_packed(pre, samples, ROWS)
    sums, counts = per_sample_losses(model, packed)
    assert counts.tolist() == [sum(t != -100 for t in s.labels[1:]) for s in samples]
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    mixed_in = False
    for i, s in enumerate(samples):
        alone = pre.collate([s])
        # Logits of the sample's positions.
        with torch.no_grad():
            ref = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
        r = next(k for k, row in enumerate(ROWS) if i in row)
        got = logits[r][packed["sequence_ids"][r] == i]
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # Loss and gradients of the trainable parameters.
        model.zero_grad(set_to_none=True)
        ref_sum, ref_count = per_sample_losses(model, alone)
        if ref_sum.requires_grad:  # a text-only sample alone takes the backbone's path: no gradient
            ref_sum[0].backward()
        ref_grads = trainable_grads(model)
        model.zero_grad(set_to_none=True)
        sums, _ = per_sample_losses(model, packed)
        sums[i].backward()
        grads = trainable_grads(model)
        assert ref_count.item() == counts[i].item()
        torch.testing.assert_close(sums[i].detach(), ref_sum[0].detach(), rtol=1e-5, atol=1e-5)
        assert set(ref_grads) <= set(grads)
        for name, g in grads.items():
            expect = ref_grads.get(name, torch.zeros_like(g))
            torch.testing.assert_close(g, expect, rtol=1e-4, atol=1e-6, msg=name)
        if s.images:
            block_grads = [g for n, g in grads.items() if n.startswith("image_blocks.")]
            assert block_grads and all(bool(g.abs().sum() > 0) for g in block_grads)
            mixed_in = True
    assert mixed_in
    model.zero_grad(set_to_none=True)


def test_model_loss_never_crosses_a_sample_boundary(model):
    samples = make_samples(seed=2)
    for s in samples:  # every first token labelled: only the model's own boundary check hides it
        s.labels[0] = s.ids[0]
    pre = preprocessor("all_previous")
    packed = collate_packed(pre, samples, ROWS)
    for r, row in enumerate(ROWS):
        start = 0
        for i in row:
            packed["labels"][r, start] = samples[i].ids[0]
            start += len(samples[i].ids)
    with torch.no_grad():
        out = model(**packed)
        sums, counts = per_sample_losses(model, packed)
    assert out.num_label_tokens == int(counts.sum())
    torch.testing.assert_close(out.loss, sums.sum() / counts.sum(), rtol=1e-6, atol=1e-6)
    # The same labels without sequence_ids would count the boundary targets too.
    assert out.num_label_tokens == sum(sum(t != -100 for t in s.labels[1:]) for s in samples)


def test_unpacked_text_path_is_the_backbone_bit_for_bit(model):
    ids = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, model.backbone(ids))
    h, ctx = model.backbone.prepare(input_ids=ids)
    assert ctx.mask is None and ctx.is_causal


def test_packed_backbone_rows_equal_alone(model):
    g = torch.Generator().manual_seed(6)
    a, b = torch.randint(0, 256, (1, 11), generator=g), torch.randint(0, 256, (1, 6), generator=g)
    row = torch.cat([a, b], dim=1)
    seq = torch.tensor([[0] * 11 + [1] * 6])
    with torch.no_grad():
        packed = model.backbone(row, sequence_ids=seq)
        torch.testing.assert_close(packed[:, :11], model.backbone(a), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packed[:, 11:], model.backbone(b), rtol=1e-5, atol=1e-5)
        # Without sequence_ids the second sample reads the first: the mask matters.
        assert not torch.allclose(model.backbone(row)[:, 11:], model.backbone(b), atol=1e-3)
    cache = model.backbone.new_cache(1, 32)
    with pytest.raises(ValueError, match="KV cache"):
        model.backbone.prepare(input_ids=row, sequence_ids=seq, cache=cache)
    with pytest.raises(ValueError, match="mark padding by its own sequence id"):
        model.backbone.prepare(input_ids=row, sequence_ids=seq, attention_mask=(seq == 0).long())
    with pytest.raises(ValueError, match="sequence_ids must have shape"):
        model.backbone.prepare(input_ids=row, sequence_ids=seq[:, :5])


def test_a_packed_stage_trains_as_the_padded_one(tmp_path):
    """`pack: true` in a recipe stage: the same samples packed into rows of max_seq_len give the
    padded stage's losses, label counts and adapters (to fp32 rounding), with fewer rows."""
    from mm_testing import colour_conversations

    from mm.training.metrics import read_metrics
    from mm.training.recipe import parse_recipe
    from mm.training.trainer import Trainer

    def run(pack: bool):
        stage = {
            "name": "s1",
            "trainable": ["image_encoder", "image_adapter"],
            "data": {"shards": "in-memory"},
            "optimizer": {"lr": 3e-3},
            "steps": 3,
            "batch_size": 4,
            "max_seq_len": 256,
            "pack": pack,
            "image": {"tile_size": 28, "max_tiles": 2},
            "log_every": 1,
        }
        recipe = parse_recipe(
            {"name": "t", "model": {"preset": "tiny", "tokenizer": "byte"}, "stages": [stage]}
        )
        out = tmp_path / ("packed" if pack else "padded")
        (result,) = Trainer(
            recipe, output_dir=out, data={"s1": colour_conversations(12, seed=4)}, progress=False
        ).run()
        return (
            result,
            read_metrics(out / "s1" / "metrics.jsonl"),
            MultimodalModel.from_pretrained(out / "s1" / "model"),
        )

    padded, padded_log, padded_model = run(False)
    packed, packed_log, packed_model = run(True)
    assert [r["label_tokens"] for r in packed_log] == [r["label_tokens"] for r in padded_log]
    torch.testing.assert_close(torch.tensor(packed.losses), torch.tensor(padded.losses), rtol=1e-5, atol=1e-6)
    for (name, a), (_, b) in zip(packed_model.named_parameters(), padded_model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_stage_data_packs_a_micro_batch_into_fewer_rows():
    from mm_testing import colour_conversations

    from mm.training.data import StageData

    pre = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=2))
    samples = colour_conversations(8, seed=1)
    padded = StageData(samples, pre, batch_size=8).next_batch()
    packed = StageData(samples, pre, batch_size=8, pack_len=256).next_batch()
    assert padded["input_ids"].shape[0] == 8 and packed["input_ids"].shape[0] < 8
    assert packed["input_ids"].shape[1] <= 256
    assert int((packed["sequence_ids"] >= 0).sum()) == int(padded["attention_mask"].sum())
