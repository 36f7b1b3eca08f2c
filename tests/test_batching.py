"""Continuous batching (mm.model.batching): rows joining and leaving between steps decode what they
decode alone, whatever they share a batch with (text only, images, two images, video, speech)."""

from __future__ import annotations

import math

import pytest
import torch
from mm_testing import random_images, tiny_av_preprocessor

from mm import ModelConfig, MultimodalModel
from mm.model.batching import DecodeBatch, Sampling
from mm.text_backbone import KVCache

STEPS = 6


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MultimodalModel(ModelConfig.preset("tiny-av")).eval()
    with torch.no_grad():  # open every gate and stir the weights, so every path changes the answer
        for name, p in m.named_parameters():
            if "gate" in name:
                p.fill_(0.8)
            elif not name.startswith("backbone."):
                p.add_(torch.randn_like(p) * 0.05)
    m.preprocessor = tiny_av_preprocessor()
    return m


def _conversations():
    images = random_images([(60, 40), (30, 90), (50, 50)], seed=3)
    frames = random_images([(40, 30)] * 8, seed=4)
    tone = 0.3 * torch.sin(2 * math.pi * 440 * torch.arange(12000) / 16000)
    user = lambda *parts: [{"role": "user", "content": list(parts)}]  # noqa: E731
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    return {
        "text": user(text("Name a colour, any colour at all.")),
        "image": user({"type": "image", "image": images[0]}, text("What is it?")),
        "two images": user(
            {"type": "image", "image": images[1]},
            text("and"),
            {"type": "image", "image": images[2]},
            text("?"),
        ),
        "video": user({"type": "video", "video": frames}, text("Which way?")),
        "speech": user(text("Repeat:"), {"type": "audio", "audio": tone}),
        "longer text": user(
            text("A much longer question than the others, so that its prompt is the longest.")
        ),
    }


def _alone(model, conv) -> list[int]:
    batch = model.preprocessor.prompts([conv])
    return model.generate(batch.pop("input_ids"), **batch, max_new_tokens=STEPS, stop_token_ids=())[
        0
    ].tolist()


def _prompts(model, convs):
    pre = model.preprocessor
    batch = pre.collate([pre.encode(c, add_generation_prompt=True) for c in convs], padding_side="left")
    batch.pop("labels")
    return batch


def test_interleaved_arrivals_decode_what_each_request_decodes_alone(model):
    convs = _conversations()
    expected = {name: _alone(model, conv) for name, conv in convs.items()}
    assert len({tuple(v) for v in expected.values()}) > 1  # the requests do differ
    batch = DecodeBatch(model)
    got: dict[str, list[int]] = {}
    # Arrivals between steps: one, then two more, then three more (the longest prompt last, so the
    # running rows move right in the cache); rows leave when they have their tokens.
    arrivals = [["image"], ["text", "two images"], [], ["video", "speech", "longer text"]]
    for wave in [*arrivals, *[[]] * (STEPS + 2)]:
        if wave:
            first = batch.join(wave, _prompts(model, [convs[n] for n in wave]), [Sampling()] * len(wave))
            for name, token in zip(wave, first):
                got[name] = [token]
        elif len(batch):
            for name, token in zip(list(batch.keys), batch.step()):
                got[name].append(token)
        batch.leave([n for n in batch.keys if len(got[n]) == STEPS])
    assert not len(batch)
    assert got == expected


def test_a_row_leaving_early_frees_its_slot_and_changes_no_other(model):
    convs = _conversations()
    expected = {name: _alone(model, convs[name]) for name in ("image", "video", "text")}
    batch = DecodeBatch(model)
    names = ["image", "video", "text"]
    got = {
        n: [t]
        for n, t in zip(
            names, batch.join(names, _prompts(model, [convs[n] for n in names]), [Sampling()] * 3)
        )
    }
    batch.leave(["video"])  # its client went away after the first token
    assert batch.keys == ["image", "text"]
    while len(got["image"]) < STEPS:
        for name, token in zip(list(batch.keys), batch.step()):
            got[name].append(token)
    assert got["image"] == expected["image"] and got["text"] == expected["text"]


def test_seeded_sampling_is_the_rows_own(model):
    convs = _conversations()
    batch = model.preprocessor.prompts([convs["text"]])
    alone = model.generate(
        batch.pop("input_ids"), **batch, max_new_tokens=STEPS, stop_token_ids=(), temperature=0.9, seed=7
    )[0].tolist()
    together = DecodeBatch(model)
    names = ["image", "text"]
    sampling = [Sampling(), Sampling(temperature=0.9, seed=7)]
    first = together.join(names, _prompts(model, [convs[n] for n in names]), sampling)
    got = [first[1]]
    for _ in range(STEPS - 1):
        got.append(together.step()[1])
    assert got == alone


def test_kv_cache_join_compact_and_grow():
    def cache(b, length, fill):
        c = KVCache(
            num_layers=1,
            batch_size=b,
            num_kv_heads=1,
            head_dim=2,
            capacity=length,
            dtype=torch.float32,
            device="cpu",
        )
        c.reserve(length)
        c.write(0, 0, torch.full((b, 1, length, 2), float(fill)), torch.full((b, 1, length, 2), -float(fill)))
        return c

    a, b = cache(1, 3, 1), cache(2, 5, 2)
    a.join(b)  # b is longer: a's tokens move right, and every row's tokens end at slot 5
    assert a.length == 5 and a.batch_size == 3
    assert a.valid.tolist()[0][:5] == [False, False, True, True, True]
    assert a.keys[0][0, 0, 2:5].eq(1).all() and a.keys[0][1:, 0, :5].eq(2).all()
    a.select_rows(torch.tensor([0]))  # the long rows leave: two slots are nobody's
    a.compact()
    assert a.length == 3 and a.valid[0, :3].all() and a.keys[0][0, 0, :3].eq(1).all()
    a.ensure_capacity(a.capacity + 1)
    assert a.capacity >= 2 * 5 and a.keys[0][0, 0, :3].eq(1).all()


def test_the_engine_wakes_an_event_loop_once_per_step_and_keeps_each_answer_in_order(model):
    """mm serve's worker hands an event loop everything of one prefill or one step in one call (not
    one per row and token), and each job still gets exactly its deltas, in order, as decoded alone."""
    import asyncio
    import threading

    from mm.model.chat import GenerationOptions, encode_conversation, generate_deltas
    from mm.serving.engine import Engine, Job

    steps = 6
    conversations = [_conversations()[k] for k in ("text", "image", "two images", "longer text")]
    samples = [encode_conversation(model, c) for c in conversations]
    options = GenerationOptions(max_new_tokens=steps)
    alone = [[delta for step in generate_deltas(model, [s], [options]) for _, delta in step] for s in samples]

    class CountingLoop(asyncio.SelectorEventLoop):
        wakeups = 0

        def call_soon_threadsafe(self, *args, **kwargs):
            CountingLoop.wakeups += 1
            return super().call_soon_threadsafe(*args, **kwargs)

    loop = CountingLoop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    engine = Engine(model, max_batch_size=8, max_concurrent_requests=8)
    got = [[] for _ in samples]
    done = threading.Semaphore(0)

    def collector(i):
        def emit(item):  # runs on the loop
            assert threading.current_thread() is thread
            got[i].append(item)
            if item.finish_reason is not None:
                done.release()

        return emit

    try:
        with engine.pause():  # all four join in one prefill
            for i, sample in enumerate(samples):
                assert engine.try_admit()
                engine.submit(Job(sample, options, collector(i), loop=loop))
        for _ in samples:
            assert done.acquire(timeout=60)
        wakeups = CountingLoop.wakeups
    finally:
        engine.close()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
    assert got == alone  # every delta, in order, as the request decodes alone
    # one wake-up for the prefill (the first tokens) and one per later step: 6, against 24 deltas
    assert wakeups == steps < sum(map(len, got)) == len(samples) * steps
    assert engine.in_flight == 0


class _Answers:
    """Collects an engine job's deltas (emitted on the worker thread); ``done(i)`` once job i finished."""

    def __init__(self, n: int) -> None:
        import threading

        self.deltas = [[] for _ in range(n)]
        self.finished = [threading.Event() for _ in range(n)]

    def emit(self, i: int):
        def emit(item):
            if isinstance(item, BaseException):
                raise AssertionError(f"job {i} failed: {item!r}")
            self.deltas[i].append(item)
            if item.finish_reason is not None:
                self.finished[i].set()

        return emit


def test_requests_being_prepared_together_are_prefilled_together_and_a_lone_one_is_never_held(model):
    """mm serve's worker holds a ready request back (at most max_join_wait_s) while another admitted
    request is still being prepared, so both are prefilled in one pass; with nobody being prepared,
    or once the other is withdrawn, a request starts at once, however long the allowed wait."""
    import time

    from mm.model.chat import GenerationOptions, encode_conversation, generate_deltas
    from mm.serving.engine import Engine, Job

    conversations = _conversations()
    samples = [encode_conversation(model, conversations[k]) for k in ("image", "text", "two images")]
    options = GenerationOptions(max_new_tokens=STEPS)
    alone = [[d for step in generate_deltas(model, [s], [options]) for _, d in step] for s in samples]
    answers = _Answers(len(samples))
    engine = Engine(model, max_batch_size=8, max_concurrent_requests=8, max_join_wait_s=60.0)
    try:
        # Alone: nobody else is being prepared, so the job starts at once (not after 60 s).
        assert engine.try_admit()
        engine.submit(Job(samples[0], options, answers.emit(0)))
        assert answers.finished[0].wait(30) and engine.batches == 1

        # Two admitted together: the first one submitted waits for the second ...
        assert engine.try_admit() and engine.try_admit()
        engine.submit(Job(samples[1], options, answers.emit(1)))
        time.sleep(0.5)
        assert engine.batches == 1 and engine.waiting == 1 and answers.deltas[1] == []
        engine.submit(Job(samples[2], options, answers.emit(2)))  # ... and both join in one prefill
        assert answers.finished[1].wait(30) and answers.finished[2].wait(30)
        assert engine.batches == 2 and engine.largest_batch == 2

        # The one being prepared is refused instead (withdrawn): the waiting job starts at once.
        answers.deltas[0].clear()
        answers.finished[0].clear()
        assert engine.try_admit() and engine.try_admit()
        engine.submit(Job(samples[0], options, answers.emit(0)))
        time.sleep(0.2)
        assert answers.deltas[0] == []
        engine.withdraw()
        assert answers.finished[0].wait(30) and engine.batches == 3
    finally:
        engine.close()
    assert answers.deltas == alone  # held back or not, each answer is the one it gets alone
    assert engine.in_flight == 0


def test_a_held_request_waits_at_most_max_join_wait_while_the_batch_keeps_decoding(model):
    """A request held back for one still being prepared starts once it has waited max_join_wait_s,
    and the rows already decoding keep decoding meanwhile."""
    import time

    from mm.model.chat import GenerationOptions, encode_conversation
    from mm.serving.engine import Engine, Job

    conversations = _conversations()
    long = GenerationOptions(max_new_tokens=400)
    short = GenerationOptions(max_new_tokens=STEPS)
    answers = _Answers(2)
    engine = Engine(model, max_batch_size=8, max_concurrent_requests=8, max_join_wait_s=1.0)
    try:
        assert engine.try_admit()
        engine.submit(Job(encode_conversation(model, conversations["text"]), long, answers.emit(0)))
        while not answers.deltas[0]:
            time.sleep(0.01)
        assert engine.try_admit() and engine.try_admit()  # the second of them is never submitted
        held = time.monotonic()
        engine.submit(Job(encode_conversation(model, conversations["image"]), short, answers.emit(1)))
        # Counted as the wait begins: the running row stops by itself after 260 tokens, which a fast
        # machine decodes within the wait (the worker takes the job within one step of this).
        decoded = len(answers.deltas[0])
        time.sleep(0.5)
        assert answers.deltas[1] == [] and engine.waiting == 1
        while not answers.deltas[1]:
            time.sleep(0.005)
        waited = time.monotonic() - held
        assert 1.0 <= waited < 20.0  # held for max_join_wait_s, then started without the other
        assert len(answers.deltas[0]) >= decoded + 10  # the running row was decoded while the other waited
        engine.withdraw()
        assert answers.finished[0].wait(60) and answers.finished[1].wait(60)
    finally:
        engine.close()
    assert engine.in_flight == 0
