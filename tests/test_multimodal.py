"""The multimodal model: its invariants, and parity with Hugging Face's Llama 3.2 Vision (Mllama)."""

from __future__ import annotations

import json

import pytest
import torch
from mm_testing import hf_vision_as_released, make_hf_llama, make_hf_mllama, random_images

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor, batch_cross_attention_mask
from mm.model.presets import TINY_IMAGE_ENCODER
from mm.text_backbone import CheckpointError, TextBackbone

IMAGE = 300  # <|image|> = text vocabulary size in these tiny models
PROC = ImageProcessor(tile_size=28, max_tiles=4)


def make_batch(prompts, images, *, mode="all_previous", padding_side="left", image_id=IMAGE):
    """Model inputs for token lists and per-sample image lists, as the processor would make them."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        sl = slice(width - len(p), width) if padding_side == "left" else slice(0, len(p))
        ids[i, sl] = torch.tensor(p)
        mask[i, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if any(images):
        proc = PROC(images)
        out.update(
            pixel_values=proc.pixel_values,
            aspect_ratio_ids=proc.aspect_ratio_ids,
            aspect_ratio_mask=proc.aspect_ratio_mask,
            cross_attention_mask=batch_cross_attention_mask(
                prompts,
                proc.num_tiles,
                media_token_id=image_id,
                max_tiles=4,
                length=width,
                padding_side=padding_side,
                mode=mode,
            ),
        )
    return out


def text(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (n,), generator=g).tolist()


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mllama")
    make_hf_mllama(path)
    return path


@pytest.fixture(scope="module")
def hf_mllama(mllama_dir):
    from transformers import MllamaForConditionalGeneration

    return hf_vision_as_released(MllamaForConditionalGeneration.from_pretrained(mllama_dir).eval())


@pytest.fixture(scope="module")
def ours(mllama_dir):
    return MultimodalModel.from_pretrained(mllama_dir).eval()


def test_mllama_layer_mapping(ours):
    # Hugging Face's merged stack of 10 has cross-attention at 3 and 8: backbone layers 3 and 7.
    assert ours.config.cross_attention_layers == (3, 7)
    assert ours.config.text.num_layers == 8
    assert ours.extra_embeddings.weight.shape == (8, 64)
    assert ours.backbone.embed_tokens.weight.shape == (300, 64)


def test_logits_match_mllama_where_both_define_them_alike(ours, hf_mllama):
    """Every token stands at or after an image placeholder, so every token sees an image.

    Both implementations treat such tokens alike. They differ only for tokens that see no image
    (text before the first image): Hugging Face still adds an attention output there
    (transformers#39379), mm adds nothing (Meta's reference); see the next test.
    """
    prompts = [
        [IMAGE] + text(7, 1) + [IMAGE] + text(9, 2),
        [IMAGE, IMAGE] + text(16, 3),  # same length: no padding positions to compare
    ]
    images = [random_images([(50, 20), (20, 70)], 1), random_images([(30, 30), (90, 40)], 2)]
    for mode in ("all_previous", "most_recent"):
        batch = make_batch(prompts, images, mode=mode)
        with torch.no_grad():
            ref = hf_mllama(**batch).logits
            got = ours(**batch).logits
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_text_before_an_image_gets_exactly_the_backbones_output(ours):
    prompt = text(6, 4) + [IMAGE] + text(5, 5)
    batch = make_batch([prompt], [random_images([(40, 40)])])
    with torch.no_grad():
        got = ours(**batch).logits
        text_only = ours.backbone(batch["input_ids"].clamp(max=299))
    assert torch.equal(got[0, :6], text_only[0, :6])
    assert not torch.allclose(got[0, 7:], text_only[0, 7:])  # the image does matter afterwards


def test_text_only_input_is_the_backbone_bit_for_bit(ours):
    ids = torch.randint(3, 300, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ours.backbone(ids))
        assert torch.equal(ours(ids, attention_mask=mask).logits, ours.backbone(ids, attention_mask=mask))


def test_mixed_batch_rows_without_images_are_the_backbone(ours):
    prompts = [
        text(12, 6),
        [IMAGE] + text(11, 7),
        text(12, 8),
        text(3, 9) + [IMAGE] + text(4, 10) + [IMAGE] + text(4, 11),
    ]
    images = [[], random_images([(60, 20)], 3), [], random_images([(20, 20), (40, 90)], 4)]
    batch = make_batch(prompts, images)
    plain = batch["input_ids"].clamp(max=299)
    with torch.no_grad():
        got = ours(**batch).logits
        ref = ours.backbone(plain, attention_mask=batch["attention_mask"])
    assert torch.equal(got[0], ref[0]) and torch.equal(got[2], ref[2])
    # Row 3's first three tokens come before its first image.
    assert torch.equal(got[3, :3], ref[3, :3])
    assert not torch.allclose(got[1], ref[1])


def test_batched_equals_one_at_a_time(ours):
    prompts = [
        [IMAGE] + text(9, 12),
        text(5, 13),
        text(2, 14) + [IMAGE] + text(3, 15) + [IMAGE] + text(2, 16),
    ]
    images = [random_images([(80, 30)], 5), [], random_images([(30, 30), (20, 50)], 6)]
    batch = make_batch(prompts, images)
    with torch.no_grad():
        together = ours(**batch).logits
        for i, (p, im) in enumerate(zip(prompts, images)):
            alone = ours(**make_batch([p], [im])).logits[0]
            torch.testing.assert_close(together[i, -len(p) :], alone, atol=1e-5, rtol=0)


def test_fresh_adapters_change_nothing(tmp_path):
    make_hf_llama(
        tmp_path,
        vocab_size=272,
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
    )
    model = MultimodalModel.from_backbone(
        tmp_path,
        ModelConfig(text=TextBackbone.from_pretrained(tmp_path).config, image_encoder=TINY_IMAGE_ENCODER),
    ).eval()
    assert model.config.cross_attention_layers == (3,)
    prompt = [272] + text(10, 17)
    prompt = [t % 272 for t in prompt[1:]]
    prompts = [[272] + prompt]
    batch = make_batch(prompts, [random_images([(33, 77)])], image_id=272)
    with torch.no_grad():
        got = model(**batch).logits
        # The <|image|> row's embedding is new, so compare with the backbone fed the same embeddings.
        h = model.embed(batch["input_ids"])
        ref = model.backbone(inputs_embeds=h, attention_mask=batch["attention_mask"])
    assert torch.equal(got, ref)


def test_labels_give_the_reference_loss(ours, hf_mllama):
    prompts = [[IMAGE] + text(15, 18), [IMAGE] + text(15, 19)]
    batch = make_batch(prompts, [random_images([(40, 40)], 7), random_images([(40, 90)], 8)])
    labels = batch["input_ids"].clone()
    labels[:, :10] = -100
    with torch.no_grad():
        ref = hf_mllama(**batch, labels=labels).loss
        out = ours(**batch, labels=labels)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=0)
    assert out.num_label_tokens == 2 * 6  # 16 tokens, the first 10 unlabelled


def test_export_loads_in_transformers_with_the_same_logits(ours, hf_mllama, tmp_path):
    from transformers import MllamaForConditionalGeneration

    ours.export_hf(tmp_path / "export")
    back = hf_vision_as_released(MllamaForConditionalGeneration.from_pretrained(tmp_path / "export").eval())
    ref_state = hf_mllama.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_state[k]), k
    prompts = [[IMAGE] + text(10, 20)]
    batch = make_batch(prompts, [random_images([(64, 32)], 9)])
    with torch.no_grad():
        torch.testing.assert_close(back(**batch).logits, ours(**batch).logits, atol=1e-4, rtol=0)
    # And reading the export again gives the same model.
    again = MultimodalModel.from_pretrained(tmp_path / "export")
    for k, v in again.state_dict().items():
        assert torch.equal(v, ours.state_dict()[k]), k


def test_greedy_generation_matches_transformers(ours, hf_mllama):
    prompts = [[IMAGE] + text(8, 21)]
    batch = make_batch(prompts, [random_images([(100, 40)], 10)])
    ref = hf_mllama.generate(**batch, max_new_tokens=12, do_sample=False, eos_token_id=[999], pad_token_id=0)
    got = ours.generate(**batch, max_new_tokens=12, stop_token_ids=())
    assert torch.equal(got, ref[:, batch["input_ids"].shape[1] :])


def test_cached_decoding_equals_full_recompute_and_batching(ours):
    prompts = [[IMAGE] + text(6, 22), text(9, 23), text(2, 24) + [IMAGE] + text(4, 25)]
    images = [random_images([(40, 90)], 11), [], random_images([(70, 30)], 12)]
    batch = make_batch(prompts, images)
    got = ours.generate(**batch, max_new_tokens=8, stop_token_ids=())
    # Full recomputation: append each token and run the whole sequence again.
    for i, (p, im) in enumerate(zip(prompts, images)):
        seq = list(p)
        for _ in range(8):
            one = make_batch([seq], [im])
            with torch.no_grad():
                seq.append(int(ours(**one).logits[0, -1].argmax()))
        assert seq[len(p) :] == got[i].tolist()
        alone = ours.generate(**make_batch([p], [im]), max_new_tokens=8, stop_token_ids=())
        assert alone[0].tolist() == got[i].tolist()


def test_vision_keys_and_values_are_computed_once_per_request(ours, monkeypatch):
    calls = {"encoder": 0}
    original = ours.image_encoder.forward

    def counting(*args, **kwargs):
        calls["encoder"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(ours.image_encoder, "forward", counting)
    batch = make_batch([[IMAGE] + text(5, 26)], [random_images([(30, 30)], 13)])
    ours.generate(**batch, max_new_tokens=6, stop_token_ids=())
    assert calls["encoder"] == 1


def test_save_pretrained_refers_to_the_backbone_and_checks_its_digest(tmp_path):
    make_hf_llama(
        tmp_path / "text",
        vocab_size=272,
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=8,
    )
    model = MultimodalModel.from_backbone(tmp_path / "text", ModelConfig.preset("tiny"))
    assert model.config.cross_attention_layers == (3, 7)
    with torch.no_grad():
        model.image_blocks[0].attn_gate.fill_(0.5)
    model.save_pretrained(tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert files == {"config.json", "adapters.safetensors"}
    size = (tmp_path / "adapter" / "adapters.safetensors").stat().st_size
    backbone_size = (tmp_path / "text" / "model.safetensors").stat().st_size
    assert size < backbone_size
    loaded = MultimodalModel.from_pretrained(tmp_path / "adapter")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k

    # A different text model at that path is refused.
    make_hf_llama(
        tmp_path / "text",
        seed=1,
        vocab_size=272,
        hidden_size=128,
        intermediate_size=352,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=8,
    )
    with pytest.raises(CheckpointError, match="belong to a different text model"):
        MultimodalModel.from_pretrained(tmp_path / "adapter")

    # copy_backbone makes a self-contained folder.
    model.save_pretrained(tmp_path / "full", copy_backbone=True)
    meta = json.loads((tmp_path / "full" / "config.json").read_text())
    assert meta["backbone"]["path"] == "backbone"
    full = MultimodalModel.from_pretrained(tmp_path / "full")
    assert full.backbone.digest() == model.backbone.digest()


def test_unknown_config_keys_are_errors():
    data = ModelConfig.preset("tiny").to_dict()
    assert ModelConfig.from_dict(data) == ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match="unknown keys"):
        ModelConfig.from_dict({**data, "cross_attn_every": 4})


def test_logits_are_computed_when_read(ours, monkeypatch):
    """The Hugging Face-style call ``model(**batch, labels=labels)`` projects to the vocabulary only
    the labelled positions for the loss; the full logits cost nothing until ``.logits`` is read."""
    prompts = [[IMAGE] + text(12, 31)]
    batch = make_batch(prompts, [random_images([(50, 40)], 12)])
    labels = batch["input_ids"].clone()
    labels[:, :8] = -100
    rows = []
    head, head_loss = ours.backbone.head, ours.backbone.head_loss
    monkeypatch.setattr(ours.backbone, "head", lambda h: rows.append(h.shape[:-1].numel()) or head(h))
    monkeypatch.setattr(
        ours.backbone, "head_loss", lambda h, t: rows.append(h.shape[:-1].numel()) or head_loss(h, t)
    )
    with torch.no_grad():
        out = ours(**batch, labels=labels)
        assert rows == [int((labels[:, 1:] != -100).sum())]  # the loss's positions only
        logits = out.logits
        assert rows[1:] == [batch["input_ids"].numel()] and out.logits is logits  # computed once
        eager = ours(**batch).logits
    assert torch.equal(logits, eager)
    assert ours(**batch, labels=labels, return_logits=False).logits is None
