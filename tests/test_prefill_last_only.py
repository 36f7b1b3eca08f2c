"""A prefill's last layer computes its queries, attention output and MLP at the last position only
(``last_only``): the cache it leaves is the full pass's bit for bit, and the last position's hidden
state and logits equal the full pass's within fp32 rounding."""

from __future__ import annotations

import pytest
import torch
from mm_testing import byte_samples_with_images, random_backbone, randomised, tiny_image_preprocessor

from mm import ModelConfig, MultimodalModel


def _prefill(bb, ids, mask, last_only):
    cache = bb.new_cache(ids.shape[0], ids.shape[1] + 3)
    with torch.inference_mode():
        logits = bb(ids, attention_mask=mask, cache=cache, last_only=last_only)
    return logits[:, -1], cache


@pytest.mark.parametrize("width", [64, 256], ids=["f-linear", "onednn-width"])
@pytest.mark.parametrize("padded", [False, True], ids=["one-length", "left-padded"])
def test_a_last_only_prefill_leaves_the_full_cache_and_the_last_logits(width, padded):
    bb = random_backbone(vocab_size=1000, embed_dim=width, intermediate_dim=2 * width, max_seq_len=64)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 1000, (3, 17), generator=g)
    mask = None
    if padded:
        mask = (torch.arange(17)[None] >= torch.tensor([0, 5, 11])[:, None]).long()  # left padding
    pruned, cache = _prefill(bb, ids, mask, True)
    full, ref_cache = _prefill(bb, ids, mask, False)
    torch.testing.assert_close(pruned, full, atol=1e-5, rtol=1e-5)
    for k, rk, v, rv in zip(cache.keys, ref_cache.keys, cache.values, ref_cache.values, strict=True):
        assert torch.equal(k, rk) and torch.equal(v, rv)  # every position's keys and values
    assert cache.length == ref_cache.length == 17
    # decoding on from either cache gives the same next logits
    new = torch.randint(3, 1000, (3, 1), generator=g)
    step_mask = None if mask is None else torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], 1)
    with torch.inference_mode():
        a = bb(new, attention_mask=step_mask, cache=cache)
        b = bb(new, attention_mask=step_mask, cache=ref_cache)
    assert torch.equal(a, b)


def test_without_a_cache_the_last_position_sees_every_key():
    """No cache and no padding is SDPA's is_causal case: the single last query must attend to every
    key (kept causal, it would see the first key alone)."""
    bb = random_backbone(vocab_size=1000, max_seq_len=64)
    ids = torch.randint(3, 1000, (2, 21), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(bb(ids, last_only=True), bb(ids)[:, -1:], atol=1e-5, rtol=1e-5)


def test_packed_rows_run_in_full():
    bb = random_backbone(vocab_size=1000, max_seq_len=64)
    ids = torch.randint(3, 1000, (1, 12), generator=torch.Generator().manual_seed(5))
    seq = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        h = bb.hidden_states(ids, sequence_ids=seq, last_only=True)
        assert torch.equal(h, bb.hidden_states(ids, sequence_ids=seq))  # every position, computed in full


def test_an_image_prompts_prefill_through_the_blocks():
    """The multimodal layers (image blocks in front of backbone layers, gates open): the pruned
    prefill's last hidden state equals the full one's, and the cache is the same bit for bit."""
    torch.manual_seed(0)
    model = randomised(MultimodalModel(ModelConfig.preset("tiny")).eval())
    batch = tiny_image_preprocessor().collate(byte_samples_with_images([(21, [1, 9], [(40, 30), (28, 56)])]))
    ids, cam = batch["input_ids"], batch["cross_attention_mask"]
    out = {}
    with torch.inference_mode():
        vision = model.vision_state(
            batch["pixel_values"], batch["aspect_ratio_ids"], batch["aspect_ratio_mask"], cam
        )
        for last_only in (True, False):
            cache = model.backbone.new_cache(1, ids.shape[1])
            embeds = model.input_embeddings(ids, None)
            h, ctx = model.backbone.prepare(
                input_ids=ids if embeds is None else None, inputs_embeds=embeds, cache=cache
            )
            h = model.run_layers(h, ctx, vision=vision, cross_attention_mask=cam, last_only=last_only)
            out[last_only] = (h[:, -1], cache)
    assert model._image_block_at  # image blocks run in front of backbone layers
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-5, rtol=1e-5)
    for k, rk in zip(out[True][1].keys, out[False][1].keys, strict=True):
        assert torch.equal(k, rk)
