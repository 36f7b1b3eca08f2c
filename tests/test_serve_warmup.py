"""mm serve's warm-up: after it, a first request of each input builds nothing, and answers are unchanged."""

import copy
import re

import pytest
import torch
from PIL import Image

from mm import ModelConfig, MultimodalModel
from mm.datasets import AudioConfig, ImageProcessor, VideoConfig
from mm.datasets.preprocessing import AudioTokens, Preprocessor
from mm.model.chat import chat
from mm.serving.warmup import warm_up, warm_up_conversations
from mm.text_backbone import ByteTokenizer
from mm.text_backbone import linear as lin

FRAMES = 8


def av_model() -> MultimodalModel:
    """tiny-av (image, video and speech), every gate open so each input changes the answer."""
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight[[257, 264, 265]] = 0.0  # never stops by itself
        for block in [*model.image_blocks, *model.video_blocks]:
            block.attn_gate.uniform_(-1.0, 1.0)
            block.mlp_gate.uniform_(-1.0, 1.0)
    model.preprocessor = Preprocessor(
        ByteTokenizer(),
        ImageProcessor(tile_size=28, max_tiles=4),
        video=VideoConfig(num_frames=FRAMES),
        audio=AudioConfig(max_seconds=3.0),
        audio_tokens=AudioTokens(stack=4, conv_kernel=3, conv_stride=2),
    )
    return model


def requests() -> dict[str, list[dict]]:
    """One request per input, unlike the warm-up's (other text, other media)."""
    g = torch.Generator().manual_seed(7)

    def picture(h, w):
        return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")

    def asking(part, question):
        return [{"role": "user", "content": [part, {"type": "text", "text": question}]}]

    return {
        "text": [{"role": "user", "content": "What is the capital of France, and why?"}],
        "image": asking({"type": "image", "image": picture(50, 70)}, "Which colour is at the top?"),
        "video": asking({"type": "video", "video": [picture(30, 30) for _ in range(FRAMES)]}, "What moves?"),
        "audio": asking({"type": "audio", "audio": 0.3 * torch.randn(24_000, generator=g)}, "Repeat it."),
    }


def kept_copies(model: MultimodalModel) -> set:
    """The kept weight copies (linear.packed) of this model's weights."""
    mine = {id(p) for p in model.parameters()}
    return {
        key for key in lin._PACKED if (key in mine if isinstance(key, int) else all(k in mine for k in key))
    }


@pytest.fixture
def copies_for_every_weight(monkeypatch):
    """Every matrix of the tiny models takes the path with kept copies (at their real sizes only
    matrices of 65,536 elements and more do)."""
    if not (lin.ONEDNN and lin.PACK_BYTES):
        pytest.skip("no oneDNN products with kept weight copies on this processor")
    monkeypatch.setattr(lin, "MIN_WEIGHT", 1)


def test_after_the_warm_up_a_first_request_of_each_input_builds_nothing(copies_for_every_weight):
    model = av_model()
    took = warm_up(model)
    assert list(took) == ["text", "image", "video", "audio"] and all(s > 0 for s in took.values())
    built = kept_copies(model)
    screen = model.backbone.__dict__.get("_greedy_screen")
    assert screen is not None
    # the warm-up reached every part a request uses: the backbone, image encoder, projector,
    # image and video blocks, video aggregator and the speech encoder and adapter
    parts = {
        "backbone": model.backbone,
        "image encoder": model.image_encoder,
        "projector": model.projector,
        "image blocks": model.image_blocks,
        "video blocks": model.video_blocks,
        "video aggregator": model.video_aggregator,
        "speech encoder": model.speech_encoder,
        "speech adapter": model.speech_adapter,
    }
    ids = {i for key in built for i in (key if isinstance(key, tuple) else (key,))}
    missing = [name for name, part in parts.items() if not any(id(p) in ids for p in part.parameters())]
    assert not missing, f"no kept copy of any weight of: {missing}"

    for kind, messages in requests().items():
        chat(model, messages, max_new_tokens=4)
        assert kept_copies(model) == built, f"the first {kind} request made weight copies"
        assert model.backbone.__dict__["_greedy_screen"] is screen, (
            f"the first {kind} request rebuilt the head"
        )


def test_without_the_warm_up_the_first_requests_build_them(copies_for_every_weight):
    """The check above can fail: a cold model's first requests make the copies and the screen."""
    model = av_model()
    assert not kept_copies(model) and "_greedy_screen" not in model.backbone.__dict__
    before = set()
    for kind, messages in requests().items():
        chat(model, messages, max_new_tokens=4)
        now = kept_copies(model)
        assert now - before, f"a cold model's first {kind} request made no weight copy"
        before = now
    assert "_greedy_screen" in model.backbone.__dict__


def test_the_warm_up_changes_no_answer(copies_for_every_weight):
    cold = av_model()
    warm = copy.deepcopy(cold)
    warm_up(warm)
    for kind, messages in requests().items():
        assert chat(warm, messages, max_new_tokens=12) == chat(cold, messages, max_new_tokens=12), kind


def test_the_warm_up_asks_only_what_the_model_reads():
    model = av_model()
    assert list(warm_up_conversations(model)) == ["text", "image", "video", "audio"]
    model.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))
    assert list(warm_up_conversations(model)) == ["text", "image"]  # no video or audio settings
    text_only = MultimodalModel(ModelConfig(text=ModelConfig.preset("tiny").text)).eval()
    text_only.preprocessor = Preprocessor(ByteTokenizer())
    assert list(warm_up(text_only)) == ["text"]
    text_only.preprocessor = None
    with pytest.raises(ValueError, match="no preprocessor"):
        warm_up(text_only)


def test_a_failing_warm_up_request_names_its_input(monkeypatch):
    model = av_model()

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(model.speech_encoder, "forward", broken)
    with pytest.raises(ValueError, match="the warm-up request with audio failed: out of memory"):
        warm_up(model)
    failures = []
    took = warm_up(model, on_error=lambda kind, error: failures.append((kind, str(error))))
    assert list(took) == ["text", "image", "video"] and failures == [("audio", "out of memory")]


def test_mm_serve_warns_of_a_failing_warm_up_request_and_serves(monkeypatch, capsys):
    import uvicorn

    from mm.serving import app as app_module

    model = av_model()

    def refuse(*args, **kwargs):
        raise OSError("no")

    monkeypatch.setattr(model.speech_encoder, "forward", refuse)
    monkeypatch.setattr(MultimodalModel, "from_pretrained", classmethod(lambda cls, path: model))
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config.app))
    app_module.serve("folder", port=0)
    err = capsys.readouterr().err
    assert "mm serve: warning: the warm-up request with audio failed (no); requests with audio" in err
    assert re.search(r"mm serve: warmed up in text [\d.]+ s, image [\d.]+ s, video [\d.]+ s\n", err), err
    assert len(served) == 1  # and then it serves
    app_module.serve("folder", port=0, warm=False)
    assert "warm" not in capsys.readouterr().err and len(served) == 2
