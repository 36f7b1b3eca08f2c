"""Video and speech inside the multimodal model: the invariants that keep the backbone's promise."""

from __future__ import annotations

import math

import pytest
import torch
from mm_testing import tiny_av_preprocessor

from mm import ModelConfig, MultimodalModel
from mm.datasets import AudioInputs, VideoInputs
from mm.model.components import set_trainable, trainable_components
from mm.model.video import encode_video_frames

FRAMES = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    m.preprocessor = tiny_av_preprocessor(FRAMES)
    return m


def _open_gates(model, value=0.7):
    with torch.no_grad():
        for block in [*model.image_blocks, *model.video_blocks]:
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


def _frames(seed, n=FRAMES, size=(40, 30)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _tone(seconds=1.0, hz=440.0):
    t = torch.arange(int(16000 * seconds)) / 16000
    return 0.3 * torch.sin(2 * math.pi * hz * t)


def _video_conv(seed, text="What moves?"):
    return [
        {
            "role": "user",
            "content": [{"type": "video", "video": _frames(seed)}, {"type": "text", "text": text}],
        }
    ]


def _audio_conv(seconds, text="Repeat after me in English."):
    return [
        {
            "role": "user",
            "content": [{"type": "text", "text": text}, {"type": "audio", "audio": _tone(seconds)}],
        }
    ]


def test_text_only_is_the_backbone_and_zero_gates_change_nothing(model):
    ids = torch.randint(0, 272, (2, 11))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model.backbone(ids))
    batch = model.preprocessor.prompts([_video_conv(1)])
    without = {k: v for k, v in batch.items() if k != "video"}
    with torch.no_grad():
        # Fresh (zero-gated) video blocks: the video changes nothing, bit for bit.
        assert torch.equal(model(**batch).logits, model(**without).logits)


def test_video_reaches_the_text_once_gates_open(model):
    _open_gates(model)
    try:
        a = model.preprocessor.prompts([_video_conv(1)])
        b = model.preprocessor.prompts([_video_conv(2)])
        with torch.no_grad():
            la, lb = model(**a).logits, model(**b).logits
        assert not torch.allclose(la[:, -1], lb[:, -1])
        # Tokens before the <|video|> placeholder receive nothing from it.
        pos = int((a["input_ids"][0] == model.config.video_token_id).nonzero()[0])
        assert torch.equal(la[0, :pos], lb[0, :pos])
    finally:
        _open_gates(model, 0.0)


def test_cached_frame_features_give_the_loss_of_pixels(model):
    _open_gates(model)
    try:
        pre = model.preprocessor
        conv = _video_conv(3) + [{"role": "assistant", "content": "a red circle"}]
        batch = pre.collate(
            [pre.encode(conv), pre.encode(_video_conv(4) + [{"role": "assistant", "content": "no"}])]
        )
        with torch.no_grad():
            from_pixels = model(**batch).loss
            video = batch["video"]
            features = encode_video_frames(
                model, video.pixel_values, video.aspect_ratio_ids, video.aspect_ratio_mask
            )
            cached = dict(batch, video=VideoInputs(video.cross_attention_mask, features=features))
            from_cache = model(**cached).loss
        assert features.shape[:3] == (2, 1, FRAMES)
        torch.testing.assert_close(from_cache, from_pixels, atol=1e-6, rtol=0)
    finally:
        _open_gates(model, 0.0)


def test_group_size_sets_the_number_of_aggregated_frames(model):
    frames = torch.randn(1, 1, FRAMES, 4, 5, 128)  # [b, v, f, t, p, d]
    from mm.model.video import video_tokens

    assert video_tokens(model, frames).shape == (1, 1, (FRAMES // 4) * 4 * 5, 128)  # model default: 4 -> 1
    assert video_tokens(model, frames, group_size=2).shape == (1, 1, (FRAMES // 2) * 4 * 5, 128)


def test_audio_placeholders_match_the_adapter_and_batching(model):
    pre = model.preprocessor
    short, long = pre.encode(_audio_conv(0.5)), pre.encode(_audio_conv(1.3))
    audio_id = model.config.audio_token_id
    n_short, n_long = short.ids.count(audio_id), long.ids.count(audio_id)
    assert n_long > n_short > 0
    batch = pre.collate([short, long])
    with torch.no_grad():
        hidden, lengths = model.speech_encoder(batch["audio"].features, batch["audio"].lengths)
        _, out_lengths = model.speech_adapter(hidden, lengths)
    assert out_lengths.tolist() == [n_short, n_long]
    with torch.no_grad():
        both = model(**batch).logits
        alone = model(**pre.collate([long])).logits
    torch.testing.assert_close(both[1, : len(long.ids)], alone[0], atol=1e-5, rtol=0)


def test_speech_changes_the_answer_and_gradients_reach_the_speech_modules(model):
    pre = model.preprocessor
    a = pre.collate([pre.encode(_audio_conv(0.8) + [{"role": "assistant", "content": "hello"}])])
    set_trainable(model, ["speech_encoder", "speech_adapter"])
    assert trainable_components(model) == ["speech_encoder", "speech_adapter"]
    try:
        model(**a).loss.backward()
        assert all(p.grad is not None for p in model.speech_adapter.parameters())
        assert all(p.grad is None for p in model.backbone.parameters())
    finally:
        set_trainable(model, ())
        model.zero_grad(set_to_none=True)
    b = pre.collate([pre.encode(_audio_conv(0.8, text="Repeat after me in English."))])
    c = dict(b, audio=AudioInputs(b["audio"].features * 0.0, b["audio"].lengths))
    with torch.no_grad():
        assert not torch.allclose(model(**b).logits[:, -1], model(**c).logits[:, -1])


def test_cached_decoding_with_video_and_audio_equals_recompute(model):
    _open_gates(model, 0.5)
    try:
        pre = model.preprocessor
        conv = [
            {
                "role": "user",
                "content": [
                    {"type": "video", "video": _frames(7)},
                    {"type": "text", "text": "and"},
                    {"type": "audio", "audio": _tone(0.6)},
                ],
            }
        ]
        batch = pre.prompts([conv])
        got = model.generate(**batch, max_new_tokens=5, stop_token_ids=())[0].tolist()
        ids = batch["input_ids"]
        for _ in range(5):
            full = {**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            video = batch["video"]
            last = video.cross_attention_mask[:, -1:]
            full["video"] = video.replace(
                cross_attention_mask=torch.cat(
                    [
                        video.cross_attention_mask,
                        last.expand(1, ids.shape[1] - batch["input_ids"].shape[1], 1),
                    ],
                    1,
                )
            )
            with torch.no_grad():
                nxt = model(**full).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert ids[0, batch["input_ids"].shape[1] :].tolist() == got
    finally:
        _open_gates(model, 0.0)


def test_video_stage_trains_only_the_video_adapter(model):
    names = set_trainable(model, ["video_adapter"])
    try:
        assert trainable_components(model) == ["video_adapter"]
        assert names and all(n.startswith(("video_aggregator.", "video_blocks.")) for n in names)
    finally:
        set_trainable(model, ())


def test_paper_presets_have_the_papers_video_and_speech_sizes():
    from mm.model.info import describe

    c8 = {c["name"]: c["params"] for c in describe("llama3-8b")["components"]}
    c70 = {c["name"]: c["params"] for c in describe("llama3-70b")["components"]}
    # "The video aggregator and cross attention layers have 0.6B and 4.6B parameters" (section 7.2).
    assert abs(c8["video_adapter"] / 0.6e9 - 1) < 0.1 and abs(c70["video_adapter"] / 4.6e9 - 1) < 0.1
    # A 1B Conformer (section 8.1.2) and an adapter of about 100M parameters.
    assert abs(c8["speech_encoder"] / 1e9 - 1) < 0.05 and abs(c8["speech_adapter"] / 100e6 - 1) < 0.1
