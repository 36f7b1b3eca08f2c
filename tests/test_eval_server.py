"""lmms-eval and VLMEvalKit through `mm serve`: a request shaped like theirs gets the answer `mm eval` gives.

Both harnesses drive any OpenAI-compatible endpoint. lmms-eval's ``openai_compatible`` model sends one user
message with the prompt as a text part and each image as an ``image_url`` part holding a base64 PNG data URI
(the image re-encoded from its pixels), ``max_tokens`` and ``temperature: 0``, through the official
``openai`` client. VLMEvalKit's GPT-4V wrapper sends the image first, with ``"detail"`` in the
``image_url`` and ``"n": 1``. Here both carry the image before the text, as `mm eval` asks: Llama 3.2
Vision's text attends only to images before it, so the part order is part of the prompt (lmms-eval's own
order, text first, is documented in the README as a difference).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from eval_testing import write_vqav2
from PIL import Image
from serving_testing import RunningServer, save_tiny_model

from mm import MultimodalModel
from mm.eval import evaluate, read_task
from mm.serving.app import create_app

MODEL_ID = "mm-tiny"
QUESTIONS = [(4000 + k, 900 + k, f"What is in picture {k}?", ["dog"] * 10) for k in range(3)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("eval-served") / "model")


@pytest.fixture(scope="module")
def server(model_dir):
    running = RunningServer(create_app(MultimodalModel.from_pretrained(model_dir).eval(), model_id=MODEL_ID))
    yield running
    running.stop()


def _png_data_uri(path: str) -> str:
    """lmms-eval's ``encode_image``: open, convert to RGB, save as PNG, base64."""
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def test_harness_shaped_requests_answer_as_mm_eval(model_dir, server, tmp_path):
    data = write_vqav2(tmp_path, QUESTIONS)
    result = evaluate(
        MultimodalModel.from_pretrained(model_dir).eval(),
        "vqav2",
        data,
        batch_size=2,
        max_new_tokens=MAX_TOKENS,
        progress=False,
    )
    assert len({s.prediction for s in result.samples}) > 1  # the images change the answers
    samples = read_task("vqav2", data).samples
    for sample, scored in zip(samples, result.samples):
        image_part, text_part = sample.messages[0]["content"]
        # lmms-eval: the openai client, a PNG data URI, max_tokens, temperature 0
        reply = server.client.chat.completions.create(
            model=MODEL_ID,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _png_data_uri(image_part["image"])}},
                        {"type": "text", "text": text_part["text"]},
                    ],
                }
            ],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        assert reply.choices[0].message.content.strip() == scored.prediction
        # VLMEvalKit: a raw JSON body, the image's own bytes as a JPEG data URI with "detail", n = 1
        raw = base64.b64encode(Path(image_part["image"]).read_bytes()).decode()
        status, body = server.post(
            {
                "model": MODEL_ID,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": f"data:image/jpeg;base64,{raw}", "detail": "low"},
                            },
                            {"type": "text", "text": text_part["text"]},
                        ],
                    }
                ],
                "max_tokens": MAX_TOKENS,
                "n": 1,
                "temperature": 0,
            }
        )
        assert status == 200, body
        assert body["choices"][0]["message"]["content"].strip() == scored.prediction
