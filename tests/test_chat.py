"""The Python chat API (mm.model.chat), its media normalisation (mm.datasets.media) and `mm ask`, on a tiny random model.

Answers of a random model are junk; these tests check the mechanics against an independent path:
the text must be what ``model.generate`` + ``tokenizer.decode`` give, streaming must join to the
non-streamed answer, batches must equal one-at-a-time answers, and stop strings must cut exactly.
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

from mm import ModelConfig, MultimodalModel
from mm.cli import build_parser
from mm.datasets import ImageProcessor
from mm.datasets.media import MediaError, MediaPolicy, normalize_messages
from mm.datasets.preprocessing import Preprocessor
from mm.model.chat import (
    GenerationOptions,
    _StopFilter,
    chat,
    chat_batch,
    chat_stream,
    complete,
    encode_conversation,
    generate_deltas,
)
from mm.serving.ask import ask_messages
from mm.text_backbone import ByteTokenizer

STOPS = (257, 264, 265)  # the tiny preset's stop ids: <|end_of_text|>, <|eom_id|>, <|eot_id|>


def tiny_model(seed: int = 0, config: ModelConfig | None = None) -> MultimodalModel:
    """A tiny random model whose image blocks are open (gates 1) and that never picks a stop token
    by itself (their output rows are zero), so answers run to the token limit."""
    torch.manual_seed(seed)
    model = MultimodalModel(config or ModelConfig.preset("tiny")).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight[list(STOPS)] = 0.0
        for block in model.image_blocks:
            block.attn_gate.fill_(1.0)
            block.mlp_gate.fill_(1.0)
    model.preprocessor = Preprocessor(
        ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4), max_images=3
    )
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def picture(seed: int, size=(40, 60)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def user(*parts):
    return {
        "role": "user",
        "content": [p if isinstance(p, dict) else {"type": "text", "text": p} for p in parts],
    }


def image(im):
    return {"type": "image", "image": im}


def reference(model, messages, n, stop_token_ids=()):
    """Independent path: preprocessor -> model.generate -> tokenizer.decode (special tokens dropped)."""
    batch = model.preprocessor.prompts([normalize_messages(messages)])
    ids = model.generate(batch.pop("input_ids"), **batch, max_new_tokens=n, stop_token_ids=stop_token_ids)[0]
    return ids.tolist()


def decode(model, ids):
    return model.preprocessor.tokenizer.decode(ids, skip_special=True)


CONVERSATIONS = [
    [user("hi")],
    [user(image(picture(1)), "What is in this picture?")],
    [
        {"role": "system", "content": "Be brief."},
        user(image(picture(2)), image(picture(3, (90, 30))), "Compare."),
    ],
]


# ---------------------------------------------------------------------------------------- answers
@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_answer_is_the_decoded_generation(model, k):
    messages = CONVERSATIONS[k]
    c = complete(model, messages, max_new_tokens=12)
    ids = reference(model, messages, 12)
    assert c.text == decode(model, ids)
    assert (c.finish_reason, c.completion_tokens) == ("length", 12)
    assert c.prompt_tokens == len(
        model.preprocessor.encode(normalize_messages(messages), add_generation_prompt=True).ids
    )


def test_a_stop_token_ends_the_answer_before_it(model):
    free = reference(model, CONVERSATIONS[1], 10)
    stop = free[4]  # make the 5th token of the free answer a stop token of an otherwise equal model
    cfg = ModelConfig.preset("tiny")
    cfg = cfg.replace(text=cfg.text.replace(eos_token_ids=(*STOPS, stop)))
    model = tiny_model(config=cfg)
    first = free.index(stop)
    c = complete(model, CONVERSATIONS[1], max_new_tokens=10)
    assert c.text == decode(model, free[:first])
    assert (c.finish_reason, c.completion_tokens) == ("stop", first + 1)
    assert "".join(chat_stream(model, CONVERSATIONS[1], max_new_tokens=10)) == c.text


@pytest.mark.parametrize("k", range(len(CONVERSATIONS)))
def test_streamed_pieces_join_to_the_answer(model, k):
    pieces = list(chat_stream(model, CONVERSATIONS[k], max_new_tokens=16))
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == chat(model, CONVERSATIONS[k], max_new_tokens=16)


def test_batch_of_different_lengths_and_image_counts_equals_one_at_a_time(model):
    alone = [chat(model, c, max_new_tokens=10) for c in CONVERSATIONS]
    assert chat_batch(model, CONVERSATIONS, max_new_tokens=10) == alone
    assert chat_batch(model, CONVERSATIONS[::-1], max_new_tokens=10) == alone[::-1]


def test_images_reach_the_answer_also_from_an_earlier_turn(model):
    def conversation(im):
        return [
            user(image(im), "Describe it."),
            {"role": "assistant", "content": "A picture."},
            user("And the colours?"),
        ]

    a = chat(model, conversation(picture(4)), max_new_tokens=12)
    b = chat(model, conversation(Image.new("RGB", (90, 30), (250, 20, 20))), max_new_tokens=12)
    assert a != b
    assert a == decode(model, reference(model, conversation(picture(4)), 12))


def test_sampling_is_repeatable_with_a_seed(model):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9)
    first = chat(model, CONVERSATIONS[0], seed=3, **kw)
    assert chat(model, CONVERSATIONS[0], seed=3, **kw) == first
    assert {chat(model, CONVERSATIONS[0], seed=s, **kw) for s in range(4, 8)} != {first}


def test_cancelled_rows_get_no_more_deltas_and_decoding_ends_with_the_last(model):
    samples = [encode_conversation(model, c) for c in CONVERSATIONS[:2]]
    options = [GenerationOptions(max_new_tokens=20)] * 2
    seen = {0: 0, 1: 0}
    cancel = set()
    steps = 0
    for step in generate_deltas(model, samples, options, is_cancelled=lambda i: i in cancel):
        steps += 1
        for row, _ in step:
            seen[row] += 1
        if steps == 3:
            cancel.add(0)
        if steps == 6:
            cancel.add(1)
    assert seen == {0: 3, 1: 6} and steps == 6


# ---------------------------------------------------------------------------------------- stop strings
def test_stop_filter_holds_back_possible_prefixes():
    f = _StopFilter(["bcd", "xy"])
    assert f.push("ab") == ("a", False)  # "b" may start "bcd"
    assert f.push("cX") == ("bcX", False)  # it did not
    assert f.push("zx") == ("z", False)
    assert f.push("yq") == ("", True)  # "xy" found: nothing of it is emitted
    g = _StopFilter(["aab"])
    assert g.push("aaa") == ("a", False) and g.flush() == "aa"


def test_stop_strings_cut_the_answer_and_the_stream(model):
    full = chat(model, CONVERSATIONS[1], max_new_tokens=24)
    stop = full[8:10]
    cut = full.find(stop)
    c = complete(model, CONVERSATIONS[1], max_new_tokens=24, stop=[stop, "\x00never\x00"])
    assert (c.text, c.finish_reason) == (full[:cut], "stop")
    pieces = list(chat_stream(model, CONVERSATIONS[1], max_new_tokens=24, stop=[stop]))
    assert "".join(pieces) == full[:cut]
    # a stop string that only begins like the text: what was held back comes out at the end
    almost = full[8] + "\x00"
    assert "".join(chat_stream(model, CONVERSATIONS[1], max_new_tokens=24, stop=almost)) == full


# ---------------------------------------------------------------------------------------- media
def test_openai_image_url_parts_equal_mm_image_parts(model, tmp_path):
    im = picture(6)
    uri = "data:image/png;base64," + base64.b64encode(png_bytes(im)).decode()
    path = tmp_path / "p.png"
    path.write_bytes(png_bytes(im))
    expected = chat(model, [user(image(im), "What?")], max_new_tokens=10)
    for part in (
        {"type": "image_url", "image_url": {"url": uri}},
        image(str(path)),
        image(png_bytes(im)),
    ):
        assert chat(model, [user(part, "What?")], max_new_tokens=10) == expected


@pytest.mark.parametrize(
    ("part", "words"),
    [
        ({"type": "file", "file": {"file_id": "x"}}, "unknown part type 'file'"),
        ({"type": "video_url", "video_url": {"url": "file:///etc/passwd"}}, "scheme file: is not allowed"),
        ({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}, "scheme file: is not allowed"),
        ({"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}, "not allowed"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}, "not an image"),
        ({"type": "image_url", "image_url": {"url": "data:text/plain;base64,AAAA"}}, "expected image/*"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "invalid base64"),
        ({"type": "image_url", "image_url": {}}, "needs 'image_url'"),
    ],
)
def test_bad_parts_are_clear_errors(model, part, words):
    with pytest.raises(MediaError, match=words) as e:
        chat(model, [user(part, "What?")])
    assert e.value.param == "messages[0].content[0]"


def test_media_limits_name_the_limit(model):
    big = png_bytes(picture(7, (200, 100)))
    with pytest.raises(MediaError, match="max_image_pixels"):
        chat(model, [user(image(big), "?")], media_policy=MediaPolicy(max_image_pixels=10_000))
    with pytest.raises(MediaError, match="max_images"):
        chat(model, [user(image(big), image(big), "?")], media_policy=MediaPolicy(max_images=1))
    with pytest.raises(MediaError, match="max_media_bytes"):
        uri = "data:image/png;base64," + base64.b64encode(big).decode()
        chat(
            model,
            [user({"type": "image_url", "image_url": {"url": uri}}, "?")],
            media_policy=MediaPolicy(max_bytes=100),
        )
    with pytest.raises(MediaError, match="name files are not accepted"):
        chat(model, [user(image("/etc/hostname"), "?")], media_policy=MediaPolicy(allow_paths=False))
    with pytest.raises(ValueError, match="the limit is 3"):  # the model's own preprocessor limit
        chat(model, [user(*[image(big)] * 4, "?")])


def test_bad_options_are_errors(model):
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-1.0),
        dict(top_p=0.0),
        dict(stop=[""]),
        dict(seed=1.5),
    ):
        with pytest.raises(ValueError):
            GenerationOptions(**bad)
    with pytest.raises(ValueError, match="unknown role"):
        chat(model, [{"role": "robot", "content": "hi"}])


# ---------------------------------------------------------------------------------------- mm ask
def run_ask(argv):
    args = build_parser().parse_args(["ask", *argv])
    return args.func(args)


def test_mm_ask_prints_the_answer_and_json(tmp_path, capsys):
    saved = tiny_model(seed=1)
    saved.save_pretrained(tmp_path / "model", copy_backbone=True)
    im_path = tmp_path / "q.png"
    im_path.write_bytes(png_bytes(picture(8)))
    loaded = MultimodalModel.from_pretrained(tmp_path / "model").eval()
    expected = complete(loaded, ask_messages("What is it?", [str(im_path)]), max_new_tokens=9)

    argv = ["--model", str(tmp_path / "model"), "--image", str(im_path), "--max-new-tokens", "9"]
    assert run_ask([*argv, "--json", "What is it?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["answer"] == expected.text
    assert (out["tokens"], out["finish_reason"]) == (9, "length")
    assert out["seconds"] >= 0

    assert run_ask([*argv, "What is it?"]) == 0
    assert capsys.readouterr().out == expected.text + "\n"

    assert run_ask(["--model", str(tmp_path / "model"), "--image", str(tmp_path / "missing.png"), "?"]) == 2
    assert "no such file" in capsys.readouterr().err
