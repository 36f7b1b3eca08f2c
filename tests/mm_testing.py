"""Test helpers shared by several test files (importable because pytest's `pythonpath` holds tests/)."""

from __future__ import annotations

import torch


def make_hf_llama(path, *, dtype=torch.float32, max_shard_size=None, seed=0, **overrides):
    """Write a random tiny ``LlamaForCausalLM`` with transformers and return the HF model (eval, fp32)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1: make every weight matter
            p.add_(torch.randn_like(p) * 0.02)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.to(dtype).save_pretrained(path, **kwargs)
    return model.float()


def hf_vision_as_released(model):
    """Make a transformers Mllama model compute what released Llama 3.2 Vision checkpoints mean.

    ``intermediate_layers_indices`` name the vision layers whose *inputs* join the features (Meta's
    reference ``ImageTransformer.forward``, and transformers 4.45, whose ``hidden_states`` tuple
    starts with the embeddings). transformers 5.x's rewritten ``MllamaVisionEncoder`` collects the
    *outputs* of those layers instead, one layer too deep; for the parity tests its in-memory index
    list is shifted by one, so that it computes the released function. Returns ``model``.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return model
    vision = model if hasattr(model, "intermediate_layers_indices") else None
    if vision is None:
        inner = model.model if hasattr(model, "model") and hasattr(model.model, "vision_model") else model
        vision = inner.vision_model
    indices = list(vision.intermediate_layers_indices)
    if min(indices) < 1:
        raise ValueError(f"transformers 5.x cannot express the input of vision layer 0 ({indices})")
    vision.intermediate_layers_indices = [i - 1 for i in indices]
    return model


def make_hf_mllama(
    path=None,
    *,
    seed=0,
    vocab_size=300,
    cross_attention_layers=(3, 8),
    num_hidden_layers=10,
    **text_overrides,
):
    """Write (when ``path``) a random tiny ``MllamaForConditionalGeneration`` and return it (eval, fp32).

    Every parameter is perturbed, the tanh gates included, so that no branch is trivially zero.
    Tiles are 28 px (2x2 patches of 14 px + class token). The returned model computes the released
    semantics of its vision feature layers (:func:`hf_vision_as_released`).
    """
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    text = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        cross_attention_layers=list(cross_attention_layers),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        max_position_embeddings=512,
    )
    text.update(text_overrides)
    vision = dict(
        hidden_size=32,
        num_hidden_layers=4,
        num_global_layers=2,
        attention_heads=4,
        intermediate_size=64,
        vision_output_dim=96,
        image_size=28,
        patch_size=14,
        max_num_tiles=4,
        intermediate_layers_indices=[1, 2],
    )
    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(
        MllamaConfig(vision_config=vision, text_config=text, image_token_index=vocab_size)
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.copy_(torch.empty_like(p).uniform_(-1.0, 1.0))
            else:
                p.add_(torch.randn_like(p) * 0.02)
    if path is not None:
        model.save_pretrained(path)
    return hf_vision_as_released(model)


def random_images(sizes, seed=0):
    """PIL RGB images of the given (width, height) sizes with random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def byte_samples_with_images(specs, seed=0):
    """Encoded samples of byte tokens: each spec is ``(length, placeholder positions, image sizes)``;
    about 70% of the tokens (never a placeholder) are labelled."""
    from mm.datasets.preprocessing import EncodedSample
    from mm.text_backbone import ByteTokenizer

    tok = ByteTokenizer()
    g = torch.Generator().manual_seed(seed)
    out = []
    for k, (n, where, sizes) in enumerate(specs):
        ids = [tok.bos_id] + torch.randint(0, 256, (n - 1,), generator=g).tolist()
        for p in where:
            ids[p] = tok.image_id
        learn = torch.rand(n, generator=g) < 0.7
        labels = [t if bool(m) and t != tok.image_id else -100 for t, m in zip(ids, learn)]
        out.append(EncodedSample(ids=ids, labels=labels, images=random_images(sizes, seed=seed + k)))
    return out


COLOURS = {"red": (230, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 230), "yellow": (240, 220, 20)}


def colour_conversations(n, seed=0, size=28):
    """In-memory conversations: a plain coloured image and the question what colour it is."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    out = []
    for _ in range(n):
        name = names[int(rng.integers(len(names)))]
        image = Image.new("RGB", (size + int(rng.integers(0, 20)), size), COLOURS[name])
        out.append(
            [
                {
                    "role": "user",
                    "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}],
                },
                {"role": "assistant", "content": name},
            ]
        )
    return out


def write_colour_folder(folder, n, seed=0, size=28, corrupt=()):
    """The same task as files for `mm data pack`: KEY.png + KEY.json; keys in ``corrupt`` get broken PNG bytes."""
    import io
    import json
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, conv in enumerate(colour_conversations(n, seed, size)):
        key = f"s{i:05d}"
        buf = io.BytesIO()
        conv[0]["content"][0]["image"].save(buf, format="PNG")
        data = buf.getvalue()
        if i in corrupt:
            data = data[: len(data) // 3]
        (folder / f"{key}.png").write_bytes(data)
        conv[0]["content"][0]["image"] = f"{key}.png"
        (folder / f"{key}.json").write_text(json.dumps({"messages": conv}))
    return folder


def random_backbone(**overrides):
    """A small text backbone (any config field overridden) in eval mode, every weight moved off its
    initial value by noise of 0.05."""
    from mm.text_backbone import TextBackbone, TextConfig

    torch.manual_seed(0)
    cfg = dict(
        vocab_size=2000,
        embed_dim=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_dim=128,
        max_seq_len=256,
    )
    bb = TextBackbone(TextConfig(**{**cfg, **overrides})).eval()
    with torch.no_grad():
        for p in bb.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return bb


def randomised(m):
    """``m`` with every weight moved off its initial value and every gate open (a zero gate hides a
    wrong path); trainable everywhere but the backbone, as the trainer leaves it."""
    from mm.model.components import component_of

    with torch.no_grad():
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * 0.05)
            if name.endswith("_gate"):
                p.copy_(torch.empty_like(p).uniform_(0.4, 1.0) * (1 if torch.rand(()) < 0.5 else -1))
    for name, p in m.named_parameters():
        p.requires_grad_(component_of(name) != "backbone")
    return m


def tiny_image_preprocessor(**options):
    """The preprocessor of a ``tiny`` model: byte tokens, 28 px tiles, up to 4 of them."""
    from mm.datasets import ImageProcessor
    from mm.datasets.preprocessing import Preprocessor
    from mm.text_backbone import ByteTokenizer

    return Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4), **options)


def tiny_av_preprocessor(num_frames=8):
    """The preprocessor of a ``tiny-av`` model: byte tokens, 28 px tiles, ``num_frames`` video
    frames, 16 kHz audio stacked 4 to a token through a stride-2 convolution."""
    from mm.datasets import AudioConfig, ImageProcessor, VideoConfig
    from mm.datasets.preprocessing import AudioTokens, Preprocessor
    from mm.text_backbone import ByteTokenizer

    return Preprocessor(
        ByteTokenizer(),
        ImageProcessor(tile_size=28, max_tiles=4),
        video=VideoConfig(num_frames=num_frames),
        audio=AudioConfig(),
        audio_tokens=AudioTokens(stack=4, conv_kernel=3, conv_stride=2),
    )
