"""Fixed-shape decoding (``cuda_graph=True``): the tokens of the eager path, and a step a CUDA graph
can record (same operations and shapes every token, nothing read back to the host)."""

from __future__ import annotations

import math

import pytest
import torch
from mm_testing import tiny_av_preprocessor
from torch.utils._python_dispatch import TorchDispatchMode

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.model.generation import GenerationState
from mm.model.static_decode import StaticDecoder
from mm.model.vision import image_state
from mm.text_backbone import ByteTokenizer


def _image(seed, size=(50, 30)):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _user(*parts):
    content = [
        {"type": "image", "image": p} if not isinstance(p, str) else {"type": "text", "text": p}
        for p in parts
    ]
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultimodalModel(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        for block in m.image_blocks:  # random gates: a closed gate would hide a wrong image path
            block.attn_gate.uniform_(-1.0, 1.0)
            block.mlp_gate.uniform_(-1.0, 1.0)
    m.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))
    return m


@pytest.fixture(scope="module")
def batch(model):
    # left padding, an image first, no image, an image after some text
    conversations = [
        _user(_image(1), "What is here?"),
        _user("A longer question without any image at all."),
        _user("Look:", _image(2, (30, 70)), "and?"),
    ]
    return model.preprocessor.prompts(conversations)


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 0.8, "top_p": 0.9, "seed": 3}], ids=["greedy", "sampled"]
)
def test_fixed_shape_decoding_gives_the_eager_tokens(model, batch, sampling):
    eager = model.generate(**batch, max_new_tokens=12, stop_token_ids=(), **sampling)
    fixed = model.generate(**batch, max_new_tokens=12, stop_token_ids=(), cuda_graph=True, **sampling)
    assert eager.shape == (3, 12)
    assert torch.equal(fixed, eager)
    # and every row is the row alone
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        keep = one["attention_mask"][0].bool()
        one = {
            k: v[:, keep] if k in ("input_ids", "attention_mask", "cross_attention_mask") else v
            for k, v in one.items()
        }
        if not bool(one["cross_attention_mask"].any()):
            one = {"input_ids": one["input_ids"], "attention_mask": one["attention_mask"]}
        alone = model.generate(**one, max_new_tokens=12, stop_token_ids=(), cuda_graph=True, **sampling)
        if not sampling:
            assert torch.equal(alone[0], eager[i])


def test_stop_tokens_end_rows_as_the_eager_path_does(model, batch):
    eager = model.generate(**batch, max_new_tokens=10, stop_token_ids=())
    stop = (int(eager[0, 3]),)  # row 0 stops at its 4th token; the others pad after theirs, if any
    a = model.generate(**batch, max_new_tokens=10, stop_token_ids=stop)
    b = model.generate(**batch, max_new_tokens=10, stop_token_ids=stop, cuda_graph=True)
    assert torch.equal(a, b)


def test_video_and_audio_rows_decode_alike():
    torch.manual_seed(1)
    m = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    with torch.no_grad():
        for block in [*m.image_blocks, *m.video_blocks]:
            block.attn_gate.uniform_(-1.0, 1.0)
            block.mlp_gate.uniform_(-1.0, 1.0)
    m.preprocessor = tiny_av_preprocessor()
    tone = 0.3 * torch.sin(2 * math.pi * 440.0 * torch.arange(9600) / 16000)
    conv = [
        {
            "role": "user",
            "content": [
                {"type": "video", "video": [_image(k, (40, 30)) for k in range(8)]},
                {"type": "text", "text": "and"},
                {"type": "audio", "audio": tone},
            ],
        }
    ]
    batch = m.preprocessor.prompts([conv])
    eager = m.generate(**batch, max_new_tokens=8, stop_token_ids=())
    fixed = m.generate(**batch, max_new_tokens=8, stop_token_ids=(), cuda_graph=True)
    assert torch.equal(fixed, eager)


class _Recorder(TorchDispatchMode):
    """Every operation with the shapes of its tensor arguments."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))


def _decoder(model, batch, new_tokens):
    b, s = batch["input_ids"].shape
    with torch.inference_mode():
        vision = image_state(
            model,
            batch["pixel_values"],
            batch["aspect_ratio_ids"],
            batch["aspect_ratio_mask"],
            batch["cross_attention_mask"],
        )
        state = GenerationState(
            cache=model.backbone.new_cache(b, s + new_tokens),
            vision=vision,
            last_mask_row=batch["cross_attention_mask"][:, -1:],
        )
        h, ctx = model.backbone.prepare(
            inputs_embeds=model.input_embeddings(batch["input_ids"], None),
            attention_mask=batch["attention_mask"],
            cache=state.cache,
        )
        model.run_layers(h, ctx, vision=vision, cross_attention_mask=batch["cross_attention_mask"])
    return StaticDecoder(model, state, batch["attention_mask"], model.backbone.head, graph=False), state


def test_each_step_is_recordable_as_one_graph(model, batch):
    decoder, state = _decoder(model, batch, new_tokens=4)
    ids = torch.tensor([[65], [66], [67]])
    buffers = [decoder.ids.data_ptr(), state.cache.keys[0].data_ptr(), state.cache.values[-1].data_ptr()]
    runs = []
    with torch.inference_mode():
        decoder(ids)
        for _ in range(2):
            slot, pos = int(decoder.slot), decoder.pos.clone()
            with _Recorder() as rec:
                decoder(ids)
            runs.append(rec.ops)
            assert int(decoder.slot) == slot + 1 and torch.equal(decoder.pos, pos + 1)
    names = {name for name, _ in runs[0]}
    # nothing read back to the host (int(t), t.item(), bool(t), torch.equal) and no data-dependent shape
    host_reads = {
        "aten.item.default",
        "aten._local_scalar_dense.default",
        "aten.is_nonzero.default",
        "aten.equal.default",
    }
    assert not names & (
        host_reads | {"aten.nonzero.default", "aten.masked_select.default", "aten.unique_dim.default"}
    )
    assert runs[0] == runs[1]  # the same operations on the same shapes, token after token
    assert [
        decoder.ids.data_ptr(),
        state.cache.keys[0].data_ptr(),
        state.cache.values[-1].data_ptr(),
    ] == buffers
    with torch.inference_mode():
        decoder(ids)  # the cache's last slot
        with pytest.raises(ValueError, match="KV cache is full"):
            decoder(ids)


def test_a_graph_needs_a_cuda_device(model, batch):
    with pytest.raises(ValueError, match="CUDA device"):
        StaticDecoder(
            model, _decoder(model, batch, 2)[1], batch["attention_mask"], model.backbone.head, graph=True
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_decoding_gives_the_eager_tokens_on_a_gpu(model, batch):
    gpu = model.to("cuda")
    try:
        on = {k: v.to("cuda") for k, v in batch.items()}
        eager = gpu.generate(**on, max_new_tokens=16, stop_token_ids=())
        graphed = gpu.generate(**on, max_new_tokens=16, stop_token_ids=(), cuda_graph=True)
        assert torch.equal(graphed, eager)
    finally:
        model.to("cpu")
