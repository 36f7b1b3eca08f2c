"""The Llama 3 image encoder against Hugging Face's MllamaVisionModel, its key map, and the
open_clip / timm backends against the libraries' own outputs. Tiny random models only."""

from __future__ import annotations

import json
import math
import socket

import pytest
import torch
from mm_testing import hf_vision_as_released
from safetensors import safe_open
from safetensors.torch import save_file

from mm.encoders.image_encoder import ImageEncoder, ImageEncoderConfig
from mm.encoders.image_encoder_keys import (
    HF_CHECKPOINT_PREFIX,
    HF_MODULE_PREFIX,
    hf_to_mm,
    mm_to_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from mm.encoders.vision_backends import (
    OpenClipVisionBackend,
    TimmVisionBackend,
    VisionBackend,
    build_image_encoder,
)

TINY = ImageEncoderConfig(
    image_size=28,  # 2×2 patches + class token = 5 tokens, padded to 8
    patch_size=14,
    width=32,
    num_layers=4,
    num_global_layers=2,
    num_heads=4,
    mlp_dim=64,
    norm_eps=1e-3,  # unlike the 1e-5 of ln_pre / ln_post, so mixing them up shows
    intermediate_layers=(3, 1),  # out of order on purpose: the output keeps this order
)

# Two samples × three images × four tiles: several aspect ratios, padding tiles, and an image slot
# with id 0 (no image) as the processor pads it (first tile marked real).
ASPECT_RATIO_IDS = torch.tensor([[1, 6, 2], [8, 0, 3]])
ASPECT_RATIO_MASK = torch.tensor(
    [[[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], [[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 0]]]
)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to open a connection fails the test: nothing here may download."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _pixels(config: ImageEncoderConfig, b: int = 2, n: int = 3) -> torch.Tensor:
    size = config.image_size
    return torch.randn(b, n, config.max_num_tiles, config.num_channels, size, size)


def _hf_vision_model(config: ImageEncoderConfig, attn_implementation: str = "sdpa"):
    from transformers import MllamaVisionConfig, MllamaVisionModel

    hf_config = MllamaVisionConfig(**config.to_hf(), attn_implementation=attn_implementation)
    model = MllamaVisionModel(hf_config).eval()
    with torch.no_grad():  # gates start at 0 or π/4 and norms at 1: make every tensor matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return hf_vision_as_released(model)


# ---------------------------------------------------------------------------- parity
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_matches_mllama_vision_model(attn_implementation):
    hf = _hf_vision_model(TINY, attn_implementation)
    assert all(p.abs().min() > 0 for n, p in hf.named_parameters() if "gate" in n)
    encoder = ImageEncoder(ImageEncoderConfig.from_hf(hf.config.to_dict())).eval()
    encoder.load_state_dict(state_dict_from_hf(hf.state_dict(), prefix=""), strict=True)
    pixels = _pixels(TINY)
    with torch.no_grad():
        expected = hf(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK).last_hidden_state
        got = encoder(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)
    assert got.shape == (2, 3, 4, TINY.num_patches, TINY.output_dim)
    # The reference computes padding tiles the same deterministic way (they are not garbage), so
    # the whole tensor is compared, padding tiles included.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_loads_a_saved_mllama_checkpoint(tmp_path):
    """Through the real files: save_pretrained of a whole Mllama model, its config.json and prefix."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    text = dict(
        vocab_size=300,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        cross_attention_layers=[1],
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = MllamaConfig(vision_config=TINY.to_hf(), text_config=text, image_token_index=299)
    model = MllamaForConditionalGeneration(config).eval()
    with torch.no_grad():
        for p in model.model.vision_model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(tmp_path)
    hf_vision_as_released(model)

    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    vision_keys = {k for k in tensors if "vision" in k}
    assert vision_keys and all(k.startswith(HF_CHECKPOINT_PREFIX) for k in vision_keys)
    assert all(k.startswith(HF_MODULE_PREFIX) for k in model.state_dict() if "vision" in k)

    vision_config = json.loads((tmp_path / "config.json").read_text())["vision_config"]
    encoder = ImageEncoder(ImageEncoderConfig.from_hf(vision_config)).eval()
    encoder.load_state_dict(state_dict_from_hf(tensors), strict=True)
    pixels = _pixels(TINY)
    with torch.no_grad():
        expected = model.model.vision_model(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK).last_hidden_state
        got = encoder(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_full_size_shapes_and_parameter_count_on_meta():
    from transformers import MllamaVisionConfig, MllamaVisionModel

    config = ImageEncoderConfig()  # Llama 3.2 Vision: 560-pixel tiles
    with torch.device("meta"):
        encoder = ImageEncoder(config)
        hf = MllamaVisionModel(MllamaVisionConfig(image_size=560))
        out = encoder(
            torch.empty(1, 2, 4, 3, 560, 560),
            torch.ones(1, 2, dtype=torch.long),
            torch.ones(1, 2, 4, dtype=torch.long),
        )
    assert config.num_patches == 1601 and config.output_dim == 7680
    assert out.shape == (1, 2, 4, 1601, 7680)
    count = sum(p.numel() for p in encoder.parameters())
    assert count == sum(p.numel() for p in hf.parameters())
    shapes = {hf_to_mm(k): v.shape for k, v in hf.state_dict().items()}
    assert shapes == {k: v.shape for k, v in encoder.state_dict().items()}


# ---------------------------------------------------------------------------- behaviour
def test_images_are_encoded_independently():
    encoder = ImageEncoder(TINY).eval()
    pixels = _pixels(TINY)
    with torch.no_grad():
        together = encoder(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)
        for i in range(2):
            for j in range(3):
                alone = encoder(
                    pixels[i : i + 1, j : j + 1],
                    ASPECT_RATIO_IDS[i : i + 1, j : j + 1],
                    ASPECT_RATIO_MASK[i : i + 1, j : j + 1],
                )
                torch.testing.assert_close(together[i, j], alone[0, 0], atol=1e-5, rtol=1e-5)


def test_image_without_real_tiles_is_finite():
    encoder = ImageEncoder(TINY).eval()
    pixels = _pixels(TINY, b=1, n=1)
    ids = torch.tensor([[0]])
    with torch.no_grad():
        empty = encoder(pixels, ids, torch.zeros(1, 1, 4, dtype=torch.long))
        first_tile = encoder(pixels, ids, torch.tensor([[[1, 0, 0, 0]]]))
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty, first_tile)


def test_activation_checkpointing_gives_the_same_gradients():
    plain = ImageEncoder(TINY)
    checkpointed = ImageEncoder(TINY, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    pixels = _pixels(TINY)
    for model in (plain, checkpointed):
        model(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_bad_inputs_are_named():
    encoder = ImageEncoder(TINY)
    pixels = _pixels(TINY)
    with pytest.raises(ValueError, match="tiles per image"):
        encoder(pixels[:, :, :3], ASPECT_RATIO_IDS, ASPECT_RATIO_MASK[..., :3])
    with pytest.raises(ValueError, match="tiles must be"):
        encoder(pixels[..., :14], ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)
    with pytest.raises(ValueError, match="aspect_ratio_ids"):
        encoder(pixels, ASPECT_RATIO_IDS[:, :2], ASPECT_RATIO_MASK)
    with pytest.raises(ValueError, match="aspect_ratio_mask"):
        encoder(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK[:, :2])
    with pytest.raises(ValueError, match="pixel_values"):
        encoder(pixels[0], ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)


# ---------------------------------------------------------------------------- config
def test_config_round_trips_through_hf():
    from transformers import MllamaVisionConfig

    for config in (TINY, ImageEncoderConfig()):
        assert ImageEncoderConfig.from_hf(MllamaVisionConfig(**config.to_hf()).to_dict()) == config
        assert ImageEncoderConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert ImageEncoderConfig().aspect_ratio_id(2, 2) == 6


def test_config_errors():
    with pytest.raises(ValueError, match="vision_output_dim"):
        ImageEncoderConfig.from_hf({**TINY.to_hf(), "vision_output_dim": 7680})
    with pytest.raises(ValueError, match="unknown keys in image encoder config"):
        ImageEncoderConfig.from_dict({"widht": 32})
    with pytest.raises(ValueError, match="intermediate_layers"):
        TINY.replace(intermediate_layers=(4,))
    with pytest.raises(ValueError, match="hidden_act"):
        ImageEncoderConfig.from_hf({**TINY.to_hf(), "hidden_act": "quick_gelu"})


# ---------------------------------------------------------------------------- key map
def test_key_map_covers_every_tensor_both_ways():
    hf = _hf_vision_model(TINY)
    hf_keys = list(hf.state_dict())
    mm_keys = list(ImageEncoder(TINY).state_dict())
    assert sorted(hf_to_mm(k) for k in hf_keys) == sorted(mm_keys)
    assert sorted(mm_to_hf(k) for k in mm_keys) == sorted(hf_keys)
    for prefix in ("", HF_CHECKPOINT_PREFIX, HF_MODULE_PREFIX):
        for k in hf_keys:
            assert mm_to_hf(hf_to_mm(prefix + k, prefix), prefix) == prefix + k
        for k in mm_keys:
            assert hf_to_mm(mm_to_hf(k, prefix), prefix) == k
    state = {k: torch.zeros(1) for k in mm_keys}
    assert state_dict_from_hf(state_dict_to_hf(state)).keys() == state.keys()


def test_key_map_rejects_unknown_names():
    for name in ("transformer.layers.0.gate_attn", "patch_embedding.bias", "lm_head.weight", "foo"):
        with pytest.raises(KeyError):
            hf_to_mm(name)
    for name in ("layers.0.attn_gate", "patch_embed.bias", "global_layers.x.attn.q_proj.weight"):
        with pytest.raises(KeyError):
            mm_to_hf(name)
    with pytest.raises(KeyError, match="prefix"):
        hf_to_mm("class_embedding", HF_CHECKPOINT_PREFIX)
    with pytest.raises(KeyError):  # a non-vision tensor under the vision prefix
        state_dict_from_hf({HF_CHECKPOINT_PREFIX + "lm_head.weight": torch.zeros(1)})


# ---------------------------------------------------------------------------- open_clip backend
OPEN_CLIP_TINY = {
    "embed_dim": 16,
    "vision_cfg": {
        "image_size": 28,
        "patch_size": 14,
        "width": 32,
        "layers": 3,
        "head_width": 8,
        "mlp_ratio": 2.0,
    },
}


def _block_outputs(blocks, run):
    """Outputs of every block, recorded by forward hooks while ``run()`` executes."""
    outputs = {}
    handles = [
        block.register_forward_hook(lambda _m, _i, out, i=i: outputs.__setitem__(i, out))
        for i, block in enumerate(blocks)
    ]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return result, outputs


def test_open_clip_backend_features_are_the_towers_own():
    backend = OpenClipVisionBackend(OPEN_CLIP_TINY, layers=(0, -2)).eval()
    assert isinstance(backend, VisionBackend)
    assert backend.layers == (0, 1) and backend.num_patches == 5 and backend.output_dim == 96
    pixels = _pixels(TINY)
    with torch.no_grad():
        features = backend(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)
        assert features.shape == (2, 3, 4, 5, 96)
        real = ASPECT_RATIO_MASK.bool()
        assert (features[~real] == 0).all()

        visual = backend.visual
        visual.output_tokens = True  # open_clip's own forward: (pooled class token, patch tokens)
        (pooled, tokens), blocks = _block_outputs(visual.transformer.resblocks, lambda: visual(pixels[real]))
    ours = features[real]  # [N, p, 3 * d]
    torch.testing.assert_close(ours[:, 0, :32], pooled)
    torch.testing.assert_close(ours[:, 1:, :32], tokens)
    torch.testing.assert_close(ours[..., 32:64], blocks[0])
    torch.testing.assert_close(ours[..., 64:], blocks[1])


def test_open_clip_backend_reads_a_local_checkpoint(tmp_path):
    source = OpenClipVisionBackend(OPEN_CLIP_TINY)
    source_state = {k: v.clone() for k, v in source.visual.state_dict().items()}
    checkpoint = {f"visual.{k}": v for k, v in source_state.items()}
    checkpoint["visual.proj"] = torch.randn(32, 16)  # pruned by the backend, present in real files
    checkpoint["text_projection"] = torch.randn(16, 16)  # text tower tensors are skipped
    path = tmp_path / "open_clip_model.safetensors"
    save_file(checkpoint, path)

    loaded = OpenClipVisionBackend(OPEN_CLIP_TINY, pretrained=str(path))
    for name, value in loaded.visual.state_dict().items():
        torch.testing.assert_close(value, source_state[name], msg=name)

    bigger = OpenClipVisionBackend(OPEN_CLIP_TINY, pretrained=str(path), image_size=56)
    assert bigger.image_size == 56 and bigger.num_patches == 17
    position = bigger.visual.positional_embedding
    assert position.shape == (17, 32)
    torch.testing.assert_close(position[0], source_state["positional_embedding"][0])  # class token kept


def test_open_clip_backend_never_downloads():
    with pytest.raises(FileNotFoundError, match="never downloads"):
        OpenClipVisionBackend("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(ValueError, match="hf-hub"):
        OpenClipVisionBackend("hf-hub:timm/ViT-B-16-SigLIP")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenClipVisionBackend("ViT-Q-99")


# ---------------------------------------------------------------------------- timm backend
TIMM_TINY = dict(img_size=32, depth=3, embed_dim=32, num_heads=4, reg_tokens=2)


def test_timm_backend_features_are_the_models_own():
    backend = TimmVisionBackend("vit_tiny_patch16_224", layers=(1, 0), **TIMM_TINY).eval()
    assert isinstance(backend, VisionBackend)
    assert backend.num_patches == 1 + 2 + 4  # class token, 2 register tokens, 2×2 patches
    assert backend.output_dim == 96
    pixels = torch.randn(2, 3, 4, 3, 32, 32)
    with torch.no_grad():
        features = backend(pixels, ASPECT_RATIO_IDS, ASPECT_RATIO_MASK)
        assert features.shape == (2, 3, 4, 7, 96)
        real = ASPECT_RATIO_MASK.bool()
        assert (features[~real] == 0).all()
        model = backend.model
        final, blocks = _block_outputs(model.blocks, lambda: model.forward_features(pixels[real]))
    ours = features[real]
    torch.testing.assert_close(ours[..., :32], final)
    torch.testing.assert_close(ours[..., 32:64], blocks[1])
    torch.testing.assert_close(ours[..., 64:], blocks[0])


def test_timm_backend_reads_a_local_checkpoint(tmp_path):
    import timm

    torch.manual_seed(1)
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TIMM_TINY)
    path = tmp_path / "vit.safetensors"
    save_file(source.state_dict(), path)
    torch.manual_seed(2)
    backend = TimmVisionBackend("vit_tiny_patch16_224", checkpoint_path=str(path), layers=(0,), **TIMM_TINY)
    source_state = source.state_dict()
    for name, value in backend.model.state_dict().items():
        torch.testing.assert_close(value, source_state[name], msg=name)
    assert not any(name.startswith("head") for name in backend.model.state_dict())


def test_timm_backend_never_downloads(tmp_path):
    with pytest.raises(ValueError, match="Hugging Face Hub"):
        TimmVisionBackend("hf-hub:timm/vit_base_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match="pretrained"):
        TimmVisionBackend("vit_tiny_patch16_224", pretrained=True)
    with pytest.raises(FileNotFoundError):
        TimmVisionBackend("vit_tiny_patch16_224", checkpoint_path=tmp_path / "missing.pth")


# ---------------------------------------------------------------------------- builder
def test_build_image_encoder():
    llama = build_image_encoder({"type": "llama3", **json.loads(json.dumps(TINY.to_dict()))})
    assert isinstance(llama, ImageEncoder) and llama.config == TINY
    assert isinstance(llama, VisionBackend) and llama.output_dim == 96

    clip = build_image_encoder({"type": "open_clip", "model_name": OPEN_CLIP_TINY, "layers": [1]})
    assert isinstance(clip, OpenClipVisionBackend) and clip.output_dim == 64

    vit = build_image_encoder({"type": "timm", "model_name": "vit_tiny_patch16_224", "kwargs": TIMM_TINY})
    assert isinstance(vit, TimmVisionBackend) and vit.output_dim == 32

    with pytest.raises(ValueError, match="unknown keys"):
        build_image_encoder({"type": "timm", "model_name": "vit_tiny_patch16_224", "img_size": 32})
    with pytest.raises(ValueError, match="missing keys"):
        build_image_encoder({"type": "open_clip"})
    with pytest.raises(ValueError, match="unknown keys in image encoder config"):
        build_image_encoder({"type": "llama3", "depth": 3})
    with pytest.raises(ValueError, match="type must be"):
        build_image_encoder({"type": "siglip"})


def test_global_layer_gates_start_at_quarter_pi():
    encoder = ImageEncoder(TINY)
    for layer in encoder.global_layers:
        assert layer.attn_gate.item() == pytest.approx(math.pi / 4)
        assert layer.mlp_gate.item() == pytest.approx(math.pi / 4)
    assert not hasattr(encoder.layers[0], "attn_gate")
