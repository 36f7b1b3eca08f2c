"""`mm serve` under clients that wait, leave, send nonsense or send slowly (hardening items 8-12)."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from serving_testing import RunningServer, save_tiny_model

from mm import MultimodalModel
from mm.serving.app import ServerLimits, create_app, server_config

MODEL_ID = "tiny-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("served") / "model")


def _serve(model_dir, limits: ServerLimits, *, deadline: bool = False) -> RunningServer:
    app = create_app(MultimodalModel.from_pretrained(model_dir).eval(), model_id=MODEL_ID, limits=limits)
    config = server_config(app, limits, log_level="warning") if deadline else None
    return RunningServer(app, config)


def _ask(text="Say something.", **extra) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": text}], "max_tokens": 8, **extra}


def _wait(condition, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------- item 8
@pytest.mark.parametrize("clients,limit,requests", [(12, 16, 64), (4, 4, 24)])
def test_clients_waiting_for_their_answers_are_never_refused_below_the_limit(
    model_dir, clients, limit, requests
):
    """Each client sends its next request only after its answer: never more than ``clients`` in
    flight, so none may get 429 (slots were freed only when a whole batch finished)."""
    running = _serve(model_dir, ServerLimits(max_concurrent_requests=limit, max_batch_size=8, max_tokens=64))
    try:
        per_client = requests // clients

        def client(k):
            return [
                running.post(_ask(f"Question {k}-{i}", max_tokens=4 + (k + i) % 9))[0]
                for i in range(per_client)
            ]

        with ThreadPoolExecutor(clients) as pool:
            statuses = [s for batch in pool.map(client, range(clients)) for s in batch]
        assert statuses == [200] * (per_client * clients)
        _wait(lambda: running.engine.in_flight == 0, what="every slot back")
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------- item 9
def _hang_up_after(port: int, payload: dict, seconds: float) -> None:
    body = json.dumps(payload).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(seconds)


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_stops_its_row(model_dir, stream):
    """Requests for many tokens whose clients leave after 0.3 s: their rows stop and their slots come
    back long before the answers would have been complete; a new request is served meanwhile."""
    limits = ServerLimits(max_concurrent_requests=4, max_batch_size=4, max_tokens=1900)
    running = _serve(model_dir, limits)
    jobs = []
    submit = running.engine.submit

    def recording_submit(job):
        counted = {"deltas": 0}
        emit = job.emit

        def counting(item):
            counted["deltas"] += 1
            emit(item)

        job.emit = counting
        jobs.append((job, counted))
        submit(job)

    running.engine.submit = recording_submit
    try:
        payload = _ask("Tell me a very long story.", max_tokens=1900, stream=stream)  # the context: 2048
        threads = [
            threading.Thread(target=_hang_up_after, args=(running.port, payload, 0.3)) for _ in range(4)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        _wait(lambda: len(jobs) == 4 and running.engine.in_flight == 0, what="the abandoned rows to leave")
        assert all(job.cancelled.is_set() and not job.finished for job, _ in jobs)
        assert all(counted["deltas"] < 1900 for _, counted in jobs)
        status, body = running.post(_ask())  # the slots are free again
        assert status == 200 and body["usage"]["completion_tokens"] == 8
    finally:
        running.stop()


# ---------------------------------------------------------------------------------------- item 10
@pytest.fixture(scope="module")
def server(model_dir):
    running = _serve(model_dir, ServerLimits(max_tokens=64))
    yield running
    running.stop()


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 2**64),
        ("seed", -1),
        ("seed", 2**63),
        ("max_tokens", 2**70),
        ("max_completion_tokens", -5),
        ("n", 2**80),
        ("temperature", 1e308 * 10),
        ("top_p", float("nan")),
    ],
)
def test_out_of_range_values_are_400s_naming_the_field(server, field, value):
    payload = _ask(temperature=0.5) | {field: value}
    raw = json.dumps(payload, allow_nan=True).encode()
    status, body = server.post(raw)
    assert status == 400, body
    assert body["error"]["param"] == field
    status, _ = server.post(_ask())  # and the server is fine
    assert status == 200


def test_a_refused_request_keeps_the_connection_usable(server):
    """After a 400 for a huge seed, the client's next request on the same keep-alive connection works."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        for payload, expected in (
            (_ask(temperature=0.5, seed=2**64), 400),
            (_ask(), 200),
            (_ask(seed=3), 200),
        ):
            conn.request(
                "POST", "/v1/chat/completions", json.dumps(payload), {"Content-Type": "application/json"}
            )
            response = conn.getresponse()
            response.read()
            assert response.status == expected
    finally:
        conn.close()


def test_seed_out_of_range_is_a_clear_error_in_python(model_dir):
    model = MultimodalModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="seed"):
        model.chat([{"role": "user", "content": "hi"}], temperature=0.5, seed=2**64)


# ---------------------------------------------------------------------------------------- item 11
def _slow_sender(port: int, chunks: list[bytes], pause: float) -> tuple[bytes, float]:
    """Send ``chunks`` one per ``pause`` seconds; return what the server answered and when it closed."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.settimeout(0.05)
        received = b""
        for chunk in chunks:
            try:
                s.sendall(chunk)
            except OSError:
                break
            end = time.monotonic() + pause
            while time.monotonic() < end:
                try:
                    data = s.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    return received, time.monotonic() - start
                received += data
    return received, time.monotonic() - start


def test_slow_headers_and_bodies_time_out_with_408(model_dir):
    limits = ServerLimits(request_timeout_s=1.5)
    running = _serve(model_dir, limits, deadline=True)
    try:
        body = json.dumps(_ask()).encode()
        headers = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        # Headers, one byte every 0.3 s: closed with 408 within about the deadline, not minutes later.
        answer, seconds = _slow_sender(running.port, [headers[i : i + 1] for i in range(len(headers))], 0.3)
        assert answer.startswith(b"HTTP/1.1 408") and seconds < 6
        # Headers at once, then the body one byte every 0.3 s.
        answer, seconds = _slow_sender(
            running.port, [headers] + [body[i : i + 1] for i in range(len(body))], 0.3
        )
        assert answer.startswith(b"HTTP/1.1 408") and seconds < 6
        # Nothing at all after connecting.
        answer, seconds = _slow_sender(running.port, [b""] * 40, 0.3)
        assert answer.startswith(b"HTTP/1.1 408") and seconds < 6
        status, _ = running.post(_ask())  # a prompt client is served as before
        assert status == 200
    finally:
        running.stop()


def test_mm_serve_publishes_the_request_timeout(server):
    status, health = server.request("GET", "/health")
    assert status == 200 and health["limits"]["request_timeout_s"] == 30.0
    assert health["limits"]["max_join_wait_s"] == 0.01


def test_the_join_wait_is_checked_and_set_by_its_flag():
    from mm.cli import build_parser
    from mm.serving.app import limits_from_args

    assert ServerLimits(max_join_wait_s=0).max_join_wait_s == 0  # 0: never hold a request back
    for bad in (-0.001, 1.5, "0.01", True):
        with pytest.raises(ValueError, match="max_join_wait_s"):
            ServerLimits(max_join_wait_s=bad)
    args = build_parser().parse_args(["serve", "--model", "m", "--max-join-wait", "0.002"])
    assert limits_from_args(args).max_join_wait_s == 0.002


# ---------------------------------------------------------------------------------------- item 12
@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": ""}],
        [{"role": "user", "content": []}],
        [{"role": "user", "content": "   \n\t"}],
        [{"role": "user", "content": [{"type": "text", "text": ""}, {"type": "text", "text": " "}]}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": ""}],
    ],
)
def test_empty_questions_are_refused(server, model_dir, messages):
    status, body = server.post({"model": MODEL_ID, "messages": messages, "max_tokens": 4})
    assert status == 400 and "empty" in body["error"]["message"], body
    model = MultimodalModel.from_pretrained(model_dir)
    with pytest.raises(ValueError, match="empty"):
        model.chat(messages)


def test_no_messages_at_all_is_refused(server, model_dir):
    status, body = server.post({"model": MODEL_ID, "messages": [], "max_tokens": 4})
    assert status == 400 and body["error"]["param"] == "messages"
    with pytest.raises(ValueError, match="no messages"):
        MultimodalModel.from_pretrained(model_dir).chat([])
