"""`mm serve` (mm.serving.app) driven by the official `openai` client, and URL fetching (mm.datasets.media).

Servers run on 127.0.0.1 with a free port: uvicorn in a background thread serving a tiny model
saved to a temporary folder and loaded back, as `mm serve` does; one test starts the real command.
Expected answers come from `mm.model.chat` on a separately loaded copy of the same model (test_chat
checks `mm.model.chat` against `model.generate`).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest
import torch
from PIL import Image
from serving_testing import RunningServer, save_tiny_model

from mm import ModelConfig, MultimodalModel
from mm.cli import build_parser
from mm.datasets import ImageProcessor
from mm.datasets.media import MediaError, MediaPolicy, blocked_address_reason, fetch_url
from mm.datasets.preprocessing import Preprocessor
from mm.model.chat import chat, encode_conversation
from mm.serving.app import ServerLimits, create_app
from mm.text_backbone import ByteTokenizer

MODEL_ID = "tiny-test"
LIMITS = ServerLimits(
    max_image_pixels=20_000,
    max_images=2,
    max_request_bytes=200_000,
    max_tokens=64,
    max_concurrent_requests=8,
    max_batch_size=4,
)


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("served") / "model")


@pytest.fixture(scope="module")
def ref(model_dir):
    """A separate copy of the served model for expected answers."""
    return MultimodalModel.from_pretrained(model_dir).eval()


@pytest.fixture(scope="module")
def server(model_dir):
    app = create_app(
        MultimodalModel.from_pretrained(model_dir).eval(),
        model_id=MODEL_ID,
        limits=LIMITS,
        allowed_media_domains=("localhost",),
    )
    running = RunningServer(app)
    yield running
    running.stop()


def picture(seed, size=(40, 60)):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(
        torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8).numpy()
    )


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_uri(raw: bytes, mime="image/png"):
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_url(url):
    return {"type": "image_url", "image_url": {"url": url}}


def text(t):
    return {"type": "text", "text": t}


def mm_form(messages):
    """The same conversation with PIL images, for mm.model.chat on the reference model."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [
                {
                    "type": "image",
                    "image": Image.open(io.BytesIO(base64.b64decode(p["image_url"]["url"].split(",")[1]))),
                }
                if p["type"] == "image_url"
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


IMAGE_CHAT = [{"role": "user", "content": [image_url(data_uri(png(picture(1)))), text("What is this?")]}]


# ---------------------------------------------------------------------------------------- protocol
def test_models_and_health(server):
    assert [m.id for m in server.client.models.list().data] == [MODEL_ID]
    status, body = server.request("GET", "/health")
    assert status == 200 and body["model"] == MODEL_ID
    assert body["limits"]["max_images"] == 2 and body["limits"]["max_request_bytes"] == 200_000


def test_plain_completion_with_usage(server, ref):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    r = server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=9)
    assert r.object == "chat.completion" and r.model == MODEL_ID
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == chat(ref, messages, max_new_tokens=9)
    assert choice.finish_reason == "length"
    prompt = len(encode_conversation(ref, messages).ids)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (prompt, 9, prompt + 9)


def test_streaming_with_an_image(server, ref):
    stream = server.client.chat.completions.create(
        model=MODEL_ID,
        messages=IMAGE_CHAT,
        max_completion_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    content = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert len(with_choices) > 3
    assert content == chat(ref, mm_form(IMAGE_CHAT), max_new_tokens=12)
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_stop_strings(server, ref):
    full = chat(ref, mm_form(IMAGE_CHAT), max_new_tokens=30)
    stop = full[10:12]
    for stream in (False, True):
        r = server.client.chat.completions.create(
            model=MODEL_ID, messages=IMAGE_CHAT, max_tokens=30, stop=stop, stream=stream
        )
        if stream:
            chunks = [c for c in r if c.choices]
            got = (
                "".join(c.choices[0].delta.content or "" for c in chunks),
                chunks[-1].choices[0].finish_reason,
            )
        else:
            got = r.choices[0].message.content, r.choices[0].finish_reason
        assert got == (full[: full.find(stop)], "stop")


def test_multi_turn_with_an_image_in_an_earlier_turn(server, ref):
    def conversation(im):
        return [
            {"role": "user", "content": [image_url(data_uri(png(im))), text("Describe it.")]},
            {"role": "assistant", "content": "A picture."},
            {"role": "user", "content": [text("And the colours?")]},
        ]

    answers = []
    for im in (picture(2), Image.new("RGB", (90, 30), (250, 20, 20))):
        r = server.client.chat.completions.create(model=MODEL_ID, messages=conversation(im), max_tokens=10)
        answers.append(r.choices[0].message.content)
        assert answers[-1] == chat(ref, mm_form(conversation(im)), max_new_tokens=10)
    assert answers[0] != answers[1]


REQUESTS = [
    (IMAGE_CHAT, 8, False),
    ([{"role": "user", "content": "a longer question about nothing in particular"}], 12, True),
    (
        [
            {
                "role": "user",
                "content": [
                    image_url(data_uri(png(picture(4, (90, 30))))),
                    image_url(data_uri(png(picture(5)))),
                    text("Compare"),
                ],
            }
        ],
        6,
        False,
    ),
    ([{"role": "user", "content": "hi"}], 10, True),
]


def ask(server, messages, n, stream):
    r = server.client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=n, stream=stream)
    if stream:
        return "".join(c.choices[0].delta.content or "" for c in r if c.choices)
    return r.choices[0].message.content


def test_concurrent_requests_are_batched_without_cross_talk(server, ref):
    expected = [chat(ref, mm_form(m), max_new_tokens=n) for m, n, _ in REQUESTS]
    results = [None] * len(REQUESTS)

    def worker(i):
        results[i] = ask(server, *REQUESTS[i])

    before = server.engine.batches
    with server.engine.pause():  # let all four arrive, so they are decoded as one batch
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(REQUESTS))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while server.engine.waiting < len(REQUESTS):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    assert results == expected
    assert server.engine.largest_batch == 4 and server.engine.batches == before + 1

    # and without pausing, several at once from threads
    results = [None] * len(REQUESTS)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == expected


# ---------------------------------------------------------------------------------------- bad requests
def user_parts(*parts):
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


BIG = png(picture(9, (200, 150)))  # 30000 pixels > max_image_pixels 20000
BAD = [
    (b'{"model": "tiny-test", "messages": [', 400, "not valid JSON"),
    (b"[1, 2]", 400, "must be a JSON object"),
    (b"[" * 100_000, 400, "nested too deeply"),
    ({"model": MODEL_ID, "messages": "hi"}, 400, "'messages' must be a non-empty list"),
    ({"model": MODEL_ID, "messages": [{"role": "robot", "content": "x"}]}, 400, "unknown role"),
    (user_parts({"type": "input_audio", "input_audio": {}}), 400, "an input_audio part needs"),
    (user_parts({"type": "audio_url", "audio_url": {}}), 400, "unknown part type 'audio_url'"),
    (user_parts({"type": "image", "image": "/etc/passwd"}), 400, "name files are not accepted"),
    (user_parts(image_url(data_uri(b"not an image at all"))), 400, "not an image"),
    (
        user_parts(image_url(data_uri(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"))),
        400,
        "accepted format",
    ),
    (user_parts(image_url(data_uri(png(picture(1))[:60]))), 400, "truncated"),
    (user_parts(image_url("https://example.com/cat.png")), 400, "--allow-media-domain"),
    (user_parts(image_url("file:///etc/passwd")), 400, "scheme file: is not allowed"),
    (user_parts(image_url("http://localhost:9/cat.png")), 400, "loopback"),
    (user_parts(*[image_url(data_uri(png(picture(1))))] * 3, text("?")), 400, "max_images"),
    (user_parts(image_url(data_uri(BIG))), 400, "max_image_pixels"),
    ({**user_parts(text("hi")), "max_tokens": 65}, 400, "max_tokens"),
    ({**user_parts(text("hi")), "n": 2}, 400, "'n' must be 1"),
    ({**user_parts(text("hi")), "temperature": "hot"}, 400, "'temperature' must be a number"),
    ({**user_parts(text("hi")), "top_p": 0}, 400, "'top_p' must be in"),
    ({**user_parts(text("hi")), "stop": ["a", ""]}, 400, "'stop'"),
    ({**user_parts(text("hi")), "tools": [{"type": "function"}]}, 400, "'tools' is not supported"),
    ({**user_parts(text("hi")), "model": "gpt-4o"}, 404, "does not exist"),
]


@pytest.mark.parametrize(("payload", "status", "words"), BAD, ids=[w for _, _, w in BAD])
def test_bad_requests_get_their_status_and_the_server_stays_up(server, payload, status, words):
    got, body = server.post(payload)
    assert got == status, body
    err = body["error"]
    assert words in err["message"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert server.healthy()
    # Refused while arriving or being prepared, it is no longer counted: no request is held back for it.
    assert server.engine.preparing == 0 and server.engine.in_flight == 0


def test_openai_client_sees_errors_as_exceptions(server):
    with pytest.raises(openai.BadRequestError, match="max_images"):
        server.client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": [image_url(data_uri(png(picture(1))))] * 3}]
        )
    with pytest.raises(openai.NotFoundError):
        server.client.chat.completions.create(model="other", messages=[{"role": "user", "content": "x"}])
    status, body = server.request("GET", "/nowhere")
    assert status == 404 and "error" in body
    assert server.healthy()


def test_request_bytes_limit_is_413_declared_or_counted(server):
    payload = json.dumps(user_parts(image_url(data_uri(os.urandom(180_000))))).encode()
    assert len(payload) > LIMITS.max_request_bytes
    for chunked in (False, True):  # Content-Length checked before reading; chunked body counted
        body = iter([payload[i : i + 8192] for i in range(0, len(payload), 8192)]) if chunked else payload
        status, body = server.post(body, chunked=chunked)
        assert status == 413
        assert "max_request_bytes" in body["error"]["message"]
        assert server.healthy()
    with pytest.raises(openai.APIStatusError) as e:
        server.client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": [image_url(data_uri(os.urandom(180_000)))]}]
        )
    assert e.value.status_code == 413


def test_too_many_concurrent_requests_is_429(model_dir, ref):
    app = create_app(
        MultimodalModel.from_pretrained(model_dir).eval(),
        model_id=MODEL_ID,
        limits=ServerLimits(max_concurrent_requests=1),
    )
    running = RunningServer(app)
    try:
        first = {}
        messages = [{"role": "user", "content": "hello"}]
        with running.engine.pause():  # the first request is admitted and waits for the model
            t = threading.Thread(target=lambda: first.update(answer=ask(running, messages, 5, False)))
            t.start()
            deadline = time.monotonic() + 30
            while running.engine.in_flight < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="max_concurrent_requests"):
                ask(running, messages, 5, False)
            status, body = running.post({"model": MODEL_ID, "messages": messages})
            assert status == 429 and body["error"]["code"] == "too_many_concurrent_requests"
            assert running.healthy()
        t.join(60)
        assert first["answer"] == chat(ref, messages, max_new_tokens=5)
        assert ask(running, messages, 5, True) == first["answer"]  # the slot was given back
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------- videos
VIDEO_FRAMES = 8
VIDEO_LIMITS = ServerLimits(
    max_image_pixels=20_000, max_videos=1, max_media_bytes=60_000, max_request_bytes=200_000, max_tokens=64
)


def clip_frames(seed, size=28, frames=VIDEO_FRAMES):
    from mm.demo.data import make_video_qa

    (sample,) = make_video_qa(1, split="train", seed=seed, num_frames=frames, size=size)
    return sample.frames


def mp4(frames, tmp_path, name="clip.mp4"):
    from mm.demo.data import write_mp4

    return write_mp4(frames, tmp_path / name).read_bytes()


def video_url(url):
    return {"type": "video_url", "video_url": {"url": url}}


@pytest.fixture(scope="module")
def video_model_dir(tmp_path_factory):
    """A tiny-av model whose video gates are open (the video decides the answer) and never stops."""
    from mm.datasets import VideoConfig

    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    with torch.no_grad():
        model.backbone.lm_head.weight[[257, 264, 265]] = 0.0
        for block in model.video_blocks:
            block.attn_gate.fill_(1.0)
            block.mlp_gate.fill_(1.0)
    model.preprocessor = Preprocessor(
        ByteTokenizer(),
        ImageProcessor(tile_size=28, max_tiles=4),
        video=VideoConfig(num_frames=VIDEO_FRAMES),
    )
    path = tmp_path_factory.mktemp("served-video") / "model"
    model.save_pretrained(path, copy_backbone=True)
    return path


@pytest.fixture(scope="module")
def video_server(video_model_dir):
    app = create_app(
        MultimodalModel.from_pretrained(video_model_dir).eval(), model_id=MODEL_ID, limits=VIDEO_LIMITS
    )
    running = RunningServer(app)
    yield running
    running.stop()


def test_a_video_url_request_answers_as_model_chat_and_mm_ask_do(
    video_server, video_model_dir, tmp_path, capsys
):
    from mm.cli import main

    ref = MultimodalModel.from_pretrained(video_model_dir).eval()
    clips = [mp4(clip_frames(seed), tmp_path, f"{seed}.mp4") for seed in (1, 2)]
    answers, last_logits = [], []
    for raw in clips:
        messages = [{"role": "user", "content": [video_url(data_uri(raw, "video/mp4")), text("Which way?")]}]
        got = ask(video_server, messages, 10, stream=False)
        mine = [{"role": "user", "content": [{"type": "video", "video": raw}, text("Which way?")]}]
        assert got == chat(ref, mine, max_new_tokens=10)
        assert ask(video_server, messages, 10, stream=True) == got
        answers.append(got)
        batch = ref.preprocessor.collate([ref.preprocessor.encode(mine, add_generation_prompt=True)])
        with torch.no_grad():
            last_logits.append(ref(**batch).logits[0, -1])
    # The clip, not only the question, reaches the answer (a random model's greedy text may not show it).
    assert (last_logits[0] - last_logits[1]).abs().max() > 1e-3
    status, body = video_server.request("GET", "/health")
    assert body["limits"]["max_videos"] == 1 and body["limits"]["max_media_bytes"] == 60_000

    # `mm ask --video FILE` answers like model.chat (a path is decoded by the same path)
    code = main(
        ["ask", "--model", str(video_model_dir), "--video", str(tmp_path / "1.mp4"), "--max-new-tokens", "10"]
        + ["Which way?"]
    )
    assert code == 0 and capsys.readouterr().out == answers[0] + "\n"
    code = main(["ask", "--model", str(video_model_dir), "--video", str(tmp_path / "missing.mp4"), "?"])
    assert code == 2 and "missing.mp4" in capsys.readouterr().err


def bad_videos(tmp_path):
    good = mp4(clip_frames(3), tmp_path)
    wide = mp4(clip_frames(3, size=160), tmp_path, "wide.mp4")  # 160 x 160 > max_image_pixels 20000
    return [
        (good[: len(good) // 2], "video/mp4", "invalid_video", "video"),  # cut off mid-stream
        (b"not a video at all" * 10, "video/mp4", "invalid_video", "video"),
        (b"", "video/mp4", "invalid_video", "video"),
        (good, "image/png", "invalid_data_uri", "expected video/*"),
        (os.urandom(70_000), "video/mp4", "media_too_large", "max_media_bytes"),
        (wide, "video/mp4", "video_too_large", "max_pixels_per_frame"),
    ]


def test_bad_videos_get_400_naming_the_part_and_the_server_stays_up(video_server, tmp_path):
    for raw, mime, code, words in bad_videos(tmp_path):
        status, body = video_server.post(user_parts(text("?"), video_url(data_uri(raw, mime))))
        assert status == 400, (code, body)
        err = body["error"]
        assert (err["code"], err["param"]) == (code, "messages[0].content[1]"), err
        assert words in err["message"], err
        assert video_server.healthy()
    two = user_parts(*[video_url(data_uri(mp4(clip_frames(4), tmp_path), "video/mp4"))] * 2)
    status, body = video_server.post(two)
    assert status == 400 and body["error"]["code"] == "too_many_videos", body
    assert "max_videos" in body["error"]["message"]
    status, body = video_server.post(user_parts({"type": "video", "video": "/etc/passwd"}))
    assert status == 400 and "name files are not accepted" in body["error"]["message"]
    # and a good clip still answers
    status, body = video_server.post(
        user_parts(video_url(data_uri(mp4(clip_frames(5), tmp_path), "video/mp4")))
    )
    assert status == 200 and body["choices"][0]["finish_reason"] == "length", body


def test_a_model_without_video_refuses_video_parts(server, tmp_path):
    raw = mp4(clip_frames(6), tmp_path)
    status, body = server.post(user_parts(video_url(data_uri(raw, "video/mp4")), text("?")))
    assert status == 400 and "takes no video" in body["error"]["message"], body
    assert server.healthy()


# ---------------------------------------------------------------------------------------- URL fetching
class _Handler(http.server.BaseHTTPRequestHandler):
    image = png(picture(11))
    hosts: list[str] = []

    def do_GET(self):
        type(self).hosts.append(self.headers.get("Host"))
        if self.path == "/img.png":
            self._send(200, self.image, length=True)
        elif self.path == "/same-host":
            self._redirect("/img.png")
        elif self.path == "/other-host":
            self._redirect("http://elsewhere.test/img.png")
        elif self.path == "/big":
            self._send(200, b"\0" * 50_000, length=True)
        elif self.path == "/big-unannounced":
            self.send_response(200)
            self.end_headers()
            for _ in range(100):  # 100 KB, no Content-Length
                self.wfile.write(b"\0" * 1000)
        elif self.path == "/slow":
            time.sleep(1.5)
            self._send(200, self.image, length=True)
        else:
            self._send(404, b"missing", length=True)

    def _send(self, status, data, length):
        self.send_response(status)
        if length:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _redirect(self, where):
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_host():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


def test_blocked_addresses():
    for ip in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "240.0.0.1",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "::",
    ):
        assert blocked_address_reason(ip) is not None, ip
    for ip in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert blocked_address_reason(ip) is None, ip


def test_fetch_refuses_by_host_scheme_and_address(media_host):
    url = f"http://localhost:{media_host}/img.png"
    with pytest.raises(MediaError, match="not allowed"):
        fetch_url(url, MediaPolicy())
    with pytest.raises(MediaError, match="loopback"):  # allowed by name, refused by address
        fetch_url(url, MediaPolicy(allowed_domains={"localhost"}))
    for bad in (
        "file:///etc/passwd",
        "ftp://localhost/x",
        "gopher://localhost/",
        "http://user:pw@localhost/x",
    ):
        with pytest.raises(MediaError):
            fetch_url(bad, MediaPolicy(allowed_domains={"localhost"}))
    # one private address among the answers is enough to refuse (no choosing the public one)
    mixed = MediaPolicy(allowed_domains={"images.test"}, resolver=lambda h, p: ["8.8.8.8", "10.0.0.7"])
    with pytest.raises(MediaError, match="10.0.0.7, a private address"):
        fetch_url(f"http://images.test:{media_host}/img.png", mixed)


def local_policy(port, **kw):
    """``images.test`` resolves to the local test server, whose loopback address the check lets through."""
    return MediaPolicy(
        allowed_domains={"images.test"},
        resolver=lambda host, p: ["127.0.0.1"] if host == "images.test" else [],
        address_check=lambda ip: None if ip == "127.0.0.1" else "not the test server",
        **kw,
    )


def test_fetch_connects_to_the_checked_address_and_follows_same_host_redirects(media_host):
    policy = local_policy(media_host)
    _Handler.hosts.clear()
    assert fetch_url(f"http://images.test:{media_host}/img.png", policy) == _Handler.image
    assert _Handler.hosts == [f"images.test:{media_host}"]  # the name is only in the Host header
    assert fetch_url(f"http://IMAGES.test.:{media_host}/same-host", policy) == _Handler.image
    with pytest.raises(MediaError, match="redirects to another host"):
        fetch_url(f"http://images.test:{media_host}/other-host", policy)
    with pytest.raises(MediaError, match="HTTP 404"):
        fetch_url(f"http://images.test:{media_host}/nothing", policy)


def test_fetch_size_cap_and_timeout(media_host):
    policy = local_policy(media_host, max_bytes=20_000, timeout_s=0.5)
    with pytest.raises(MediaError, match="announces 50000 bytes"):
        fetch_url(f"http://images.test:{media_host}/big", policy)
    with pytest.raises(MediaError, match="download abandoned"):
        fetch_url(f"http://images.test:{media_host}/big-unannounced", policy)
    with pytest.raises(MediaError, match="timed out"):
        fetch_url(f"http://images.test:{media_host}/slow", policy)


def test_server_fetches_allowed_urls(model_dir, ref, media_host):
    app = create_app(
        MultimodalModel.from_pretrained(model_dir).eval(),
        model_id=MODEL_ID,
        media_policy=local_policy(media_host, allow_paths=False),
    )
    running = RunningServer(app)
    try:
        messages = [
            {"role": "user", "content": [image_url(f"http://images.test:{media_host}/img.png"), text("?")]}
        ]
        expected = chat(
            ref,
            [{"role": "user", "content": [{"type": "image", "image": _Handler.image}, text("?")]}],
            max_new_tokens=8,
        )
        assert ask(running, messages, 8, False) == expected
        messages[0]["content"][0] = image_url(f"http://images.test:{media_host}/other-host")
        status, body = running.post({"model": MODEL_ID, "messages": messages})
        assert status == 400 and "redirects to another host" in body["error"]["message"]
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------- the command
def test_mm_serve_command(model_dir, ref):
    args = build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--max-images", "3", "--allow-media-domain", "a.test"]
    )
    assert (args.max_images, args.allow_media_domain, args.port) == (3, ["a.test"], 8000)
    assert not args.no_warm_up
    assert build_parser().parse_args(["serve", "--model", "m", "--no-warm-up"]).no_warm_up

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = "import sys; from mm.cli import main; sys.exit(main(sys.argv[1:]))"
    cmd = [
        sys.executable,
        "-c",
        code,
        "serve",
        "--model",
        str(model_dir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="dummy", max_retries=0)
        deadline = time.monotonic() + 60
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None, proc.stdout.read().decode()
                assert time.monotonic() < deadline, "mm serve did not start"
                time.sleep(0.2)
        assert [m.id for m in models.data] == [model_dir.name]
        r = client.chat.completions.create(
            model=model_dir.name, messages=[{"role": "user", "content": "hi"}], max_tokens=6
        )
        assert r.choices[0].message.content == chat(
            ref, [{"role": "user", "content": "hi"}], max_new_tokens=6
        )
    finally:
        proc.terminate()
        proc.wait(20)
    # before taking requests it answered a short one of each input the model reads (mm.serving.warmup)
    log = proc.stdout.read().decode()
    assert re.search(r"mm serve: warmed up in text \d+\.\d\d s, image \d+\.\d\d s\n", log), log
