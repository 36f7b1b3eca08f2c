"""Test helpers for the server: a tiny served model and uvicorn running in a background thread."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import torch
import uvicorn

from mm import ModelConfig, MultimodalModel
from mm.datasets import ImageProcessor
from mm.datasets.preprocessing import Preprocessor
from mm.text_backbone import ByteTokenizer


def save_tiny_model(path):
    torch.manual_seed(0)
    model = MultimodalModel(ModelConfig.preset("tiny")).eval()
    with torch.no_grad():  # never stops by itself (zero stop-token rows); images matter (open gates)
        model.backbone.lm_head.weight[[257, 264, 265]] = 0.0
        for block in model.image_blocks:
            block.attn_gate.fill_(1.0)
            block.mlp_gate.fill_(1.0)
    model.preprocessor = Preprocessor(ByteTokenizer(), ImageProcessor(tile_size=28, max_tiles=4))
    model.save_pretrained(path, copy_backbone=True)
    return path


class RunningServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a background thread."""

    def __init__(self, app, config=None):
        self.app = app
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{self.port}/v1", api_key="dummy", max_retries=0, timeout=60
        )

    @property
    def engine(self):
        return self.app.state.engine

    def request(self, method, path, body=None, headers=None, chunked=False):
        """Raw HTTP: ``(status, parsed JSON body)``."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {}, encode_chunked=chunked)
            response = conn.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            conn.close()

    def post(self, payload, **kw):
        data = json.dumps(payload).encode() if isinstance(payload, (dict, list)) else payload
        return self.request("POST", "/v1/chat/completions", data, {"Content-Type": "application/json"}, **kw)

    def healthy(self):
        status, body = self.request("GET", "/health")
        return status == 200 and body["status"] == "ok"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
