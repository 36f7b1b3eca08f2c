"""The batching engine of ``mm serve``: one worker thread owns the model; the event loop never runs it.

Requests are admitted up to ``max_concurrent_requests`` (counting those being prepared, waiting and
decoding; beyond it the server answers 429), prepared (media fetched and decoded, prompt
tokenised) in a thread pool, and put on a queue. The worker batches dynamically: it takes the
oldest waiting request and every other waiting request with the same sampling settings (greedy
requests always share), up to ``max_batch_size``, decodes them together, and streams each row's
text to its own request through its own asyncio queue, so rows never see each other's output.
Requests arriving meanwhile form the next batch. Greedy answers equal those the request gets
alone; a seeded sampled request runs alone, so its answer never depends on its neighbours.

Torch is imported by the worker when it first decodes, not by importing this module.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

__all__ = ["Engine", "Job"]

log = logging.getLogger(__name__)


class Job:
    """One admitted request on its way through the worker.

    Args:
        sample: the encoded conversation (:func:`mm.model.chat.encode_conversation`).
        options: its :class:`mm.model.chat.GenerationOptions`.
        emit: called from the worker thread with each :class:`mm.model.chat.Delta` of the answer,
            or with the exception that ended it.
    """

    def __init__(self, sample, options, emit: Callable[[Any], None]) -> None:
        self.sample = sample
        self.options = options
        self.emit = emit
        self.cancelled = threading.Event()
        self.finished = False


class Engine:
    """The worker thread that owns the model, its request queue and the admission count.

    Args:
        model: a :class:`~mm.MultimodalModel` with a preprocessor; only the worker thread runs it.
        max_batch_size: requests decoded together.
        max_concurrent_requests: requests admitted at once (:meth:`try_admit` refuses beyond).
    """

    def __init__(self, model, *, max_batch_size: int = 8, max_concurrent_requests: int = 16) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._model_lock = threading.Lock()  # held while a batch decodes, and by pause()
        self._submitted = 0
        self._started = 0
        self.batches = 0  # batches decoded so far
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._work, name="mm-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ admission
    def try_admit(self) -> bool:
        """Take a slot for a new request; ``False`` when ``max_concurrent_requests`` are in flight."""
        with self._count_lock:
            if self._in_flight >= self.max_concurrent_requests:
                return False
            self._in_flight += 1
            return True

    def release(self) -> None:
        """Give back a slot (the worker does this for every submitted job)."""
        with self._count_lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def waiting(self) -> int:
        """Requests queued for the model and not yet decoding."""
        return self._submitted - self._started

    def submit(self, job: Job) -> None:
        """Queue an admitted job; its slot is released when the worker is done with it."""
        with self._count_lock:
            self._submitted += 1
        self._queue.put(job)

    @contextmanager
    def pause(self):
        """Hold the model: requests are admitted and queued but not decoded until the block ends."""
        with self._model_lock:
            yield

    def close(self, timeout: float = 5.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker
    def _work(self) -> None:
        pending: deque[Job] = deque()
        closing = False
        while not closing:
            if not pending:
                job = self._queue.get()
                if job is None:
                    break
                pending.append(job)
            with self._model_lock:  # (pause() holds it: what arrives meanwhile joins this batch)
                closing = self._drain(pending)
                batch = self._take_batch(pending)
                self.batches += 1
                self.largest_batch = max(self.largest_batch, len(batch))
                self._started += len(batch)
                self._run(batch)
        for job in pending:  # shutting down: refuse what never ran
            self._emit(job, RuntimeError("the server is shutting down"))
            self.release()

    def _drain(self, pending: deque[Job]) -> bool:
        """Move everything already waiting onto ``pending`` (it may join this batch); ``True`` when
        the queue asked the worker to stop."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is None:
                return True
            pending.append(job)

    def _take_batch(self, pending: deque[Job]) -> list[Job]:
        """The oldest pending job and up to ``max_batch_size - 1`` others with its sampling settings."""
        first = pending.popleft()
        key = first.options.batch_key()
        batch, rest = [first], deque()
        while pending:
            job = pending.popleft()
            if len(batch) < self.max_batch_size and job.options.batch_key() == key:
                batch.append(job)
            else:
                rest.append(job)
        pending.extend(rest)
        return batch

    def _emit(self, job: Job, item: Any) -> None:
        try:
            job.emit(item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancelled.set()

    def _run(self, batch: list[Job]) -> None:
        """Decode ``batch`` together, each row's deltas to its own job; release every slot."""
        from mm.model.chat import generate_deltas

        live = [job for job in batch if not job.cancelled.is_set()]
        try:
            if live:
                steps = generate_deltas(
                    self.model,
                    [job.sample for job in live],
                    [job.options for job in live],
                    is_cancelled=lambda i: live[i].cancelled.is_set(),
                )
                for step in steps:
                    for row, delta in step:
                        job = live[row]
                        job.finished = delta.finish_reason is not None
                        self._emit(job, delta)
        except Exception as e:  # a fault of the model or the server, not of a request
            log.exception("decoding a batch of %d failed", len(live))
            for job in live:
                if not job.finished:
                    self._emit(job, e)
        finally:
            for _ in batch:
                self.release()
