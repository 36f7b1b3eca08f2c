"""The batching engine of ``mm serve``: one worker thread owns the model; the event loop never runs it.

Requests are admitted up to ``max_concurrent_requests`` (counting those being prepared, waiting and
decoding; beyond it the server answers 429), prepared (media fetched and decoded, prompt
tokenised; in a thread pool, or for a small request without media on the event loop), and put on a
queue. The worker batches continuously
(:class:`mm.model.batching.DecodeBatch`): between two decoding steps, waiting requests are
prefilled together and join the running rows (up to ``max_batch_size``), and a row leaves the step
it finishes, or the step after its client went away; its admission slot is free at once. Rows of
any sampling settings, media or none, share the steps; each streams its text to its own request
through its own asyncio queue. Greedy answers equal those the request gets alone, and a seeded
sampled request draws from its own generator, so its answer never depends on its neighbours.

A prefill has a large fixed cost (one pass of every layer and of the image encoder, however few
rows), so requests that arrive together should join in one. While other requests are still
arriving (:meth:`Engine.arriving`: being read and checked) or being prepared, and the batch has
room for them, the worker holds back the waiting ones for at most ``max_join_wait_s`` from the
first one's submission, decoding the running rows meanwhile (or, with none, waiting for the next
arrival). A request with nobody arriving or being prepared beside it, as one sent alone or into a
running batch, is never held back. (Clients that send together, as a batch's clients do when their
answers end at the same step, then cost one prefill instead of two to four.)

A job whose ``emit`` belongs to an event loop (``Job(..., loop=loop)``) gets its deltas through that
loop: the worker hands a loop everything of one prefill or one step in a single
``call_soon_threadsafe`` (one wake-up of the loop per step, not one per row and token; under load
those wake-ups were a tenth of the worker's time).

Torch is imported by the worker when it first decodes, not by importing this module.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

__all__ = ["Engine", "Job"]

log = logging.getLogger(__name__)

_WAKE = object()  # put on the queue to have the worker look again at what it holds back


class Job:
    """One admitted request on its way through the worker.

    Args:
        sample: the encoded conversation (:func:`mm.model.chat.encode_conversation`).
        options: its :class:`mm.model.chat.GenerationOptions`.
        emit: called with each :class:`mm.model.chat.Delta` of the answer, or with the exception
            that ended it: from the worker thread, or, with ``loop``, on that event loop.
        loop: the asyncio event loop ``emit`` must run on, or None.
    """

    def __init__(self, sample, options, emit: Callable[[Any], None], *, loop=None) -> None:
        self.sample = sample
        self.options = options
        self.emit = emit
        self.loop = loop
        self.cancelled = threading.Event()
        self.finished = False
        self.submitted_at: float | None = None  # time.monotonic() at Engine.submit


class Engine:
    """The worker thread that owns the model, its request queue and the admission count.

    Args:
        model: a :class:`~mm.MultimodalModel` with a preprocessor; only the worker thread runs it.
        max_batch_size: requests decoded together.
        max_concurrent_requests: requests admitted at once (:meth:`try_admit` refuses beyond).
        max_join_wait_s: how long waiting requests may be held back for others still arriving or
            being prepared, so they are prefilled together (module docstring); 0 never holds them.
    """

    def __init__(
        self,
        model,
        *,
        max_batch_size: int = 8,
        max_concurrent_requests: int = 16,
        max_join_wait_s: float = 0.01,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_concurrent_requests = max_concurrent_requests
        self.max_join_wait_s = max_join_wait_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # Job, _WAKE, or None: stop
        self._count_lock = threading.Lock()
        self._in_flight = 0
        self._arriving = 0  # arrived (being read and checked), not admitted or refused yet
        self._preparing = 0  # admitted, and neither submitted nor withdrawn yet
        self._model_lock = threading.Lock()  # held while a batch decodes, and by pause()
        self._submitted = 0
        self._started = 0
        self._outbox: dict[Any, list[tuple[Job, Any]]] = {}  # event loop -> (job, item) not yet handed over
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
            self._preparing += 1
            return True

    @contextmanager
    def arriving(self):
        """Count a request from its arrival until it is admitted (or refused): the worker holds back
        a ready request for the ones still arriving as for those being prepared."""
        with self._count_lock:
            self._arriving += 1
        refused = True
        try:
            yield
            refused = False
        finally:
            with self._count_lock:
                self._arriving -= 1
            if refused:  # a request held back for this one need not wait any longer
                self._queue.put(_WAKE)

    def release(self) -> None:
        """Give back a slot (the worker does this for every submitted job)."""
        with self._count_lock:
            self._in_flight -= 1

    def withdraw(self) -> None:
        """Give back the slot of an admitted request that will not be submitted (refused while it was
        being prepared)."""
        with self._count_lock:
            self._in_flight -= 1
            self._preparing -= 1
        self._queue.put(_WAKE)  # a request held back for this one need not wait any longer

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def preparing(self) -> int:
        """Requests arriving or admitted and being prepared, not yet submitted."""
        return self._arriving + self._preparing

    @property
    def waiting(self) -> int:
        """Requests queued for the model and not yet decoding."""
        return self._submitted - self._started

    def submit(self, job: Job) -> None:
        """Queue an admitted job; its slot is released when the worker is done with it."""
        job.submitted_at = time.monotonic()
        with self._count_lock:
            self._submitted += 1
            self._preparing -= 1
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
        from mm.model.batching import DecodeBatch

        pending: deque[Job] = deque()
        running: dict[Job, Any] = {}  # job -> its text state (mm.model.chat row)
        batch = DecodeBatch(self.model)
        closing = False
        while not closing:
            if not pending and not running:
                closing = self._receive(pending)  # idle: wait for work
                continue
            if not running and self._holding(pending, running):  # nothing decodes meanwhile
                left = self.max_join_wait_s - (time.monotonic() - pending[0].submitted_at)
                closing = self._receive(pending, timeout=max(left, 0.0))
                continue
            with self._model_lock:  # (pause() holds it: what arrives meanwhile joins together)
                closing = self._drain(pending)
                if closing or not self._holding(pending, running):
                    self._join(batch, running, pending)
                    self._flush()  # first tokens go out before the step
                if running:
                    self._step(batch, running)
                    self._flush()
        for job in [*pending, *running]:  # shutting down: refuse what never finished
            self._emit(job, RuntimeError("the server is shutting down"))
            if not job.finished:
                self.release()
        self._flush()

    def _receive(self, pending: deque[Job], timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds, if given) for the next item on the queue: a job goes onto
        ``pending``, a wake-up is dropped; ``True`` when the queue asked the worker to stop."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return False
        if item is None:
            return True
        if item is not _WAKE:
            pending.append(item)
        return False

    def _drain(self, pending: deque[Job]) -> bool:
        """Move everything already waiting onto ``pending``; ``True`` when the queue asked the
        worker to stop (only this thread takes from the queue, so a non-empty one never blocks)."""
        while not self._queue.empty():
            if self._receive(pending):
                return True
        return False

    def _holding(self, pending: deque[Job], running: dict) -> bool:
        """Whether the waiting requests' prefill is held back: other requests are still arriving or
        being prepared, the batch has room beyond the waiting ones, and the first of them has waited
        less than ``max_join_wait_s``."""
        return (
            bool(pending)
            and self.preparing > 0
            and len(running) + len(pending) < self.max_batch_size
            and time.monotonic() - pending[0].submitted_at < self.max_join_wait_s
        )

    def _join(self, batch, running: dict, pending: deque[Job]) -> None:
        """Prefill waiting requests (as many as the batch has room for) and add them to it."""
        from mm.model.chat import start_rows

        joining = []
        while pending and len(running) + len(joining) < self.max_batch_size:
            job = pending.popleft()
            self._started += 1
            if job.cancelled.is_set():
                self.release()
            else:
                joining.append(job)
        if not joining:
            return
        try:
            rows, first = start_rows(
                self.model, batch, joining, [j.sample for j in joining], [j.options for j in joining]
            )
        except Exception as e:  # a fault of the model or the server, not of a request
            log.exception("prefilling %d requests failed", len(joining))
            for job in joining:
                self._emit(job, e)
                self.release()
            return
        self.batches += 1
        for job, row, token in zip(joining, rows, first):
            running[job] = row
            self._push(job, row, token)
        self.largest_batch = max(self.largest_batch, len(batch))
        self._leave_finished(batch, running)

    def _step(self, batch, running: dict) -> None:
        """One decoding step of every running row; finished and abandoned rows leave."""
        try:
            tokens = batch.step()
        except Exception as e:
            log.exception("decoding a batch of %d failed", len(batch))
            for job in running:
                self._emit(job, e)
                if not job.finished:
                    self.release()
            running.clear()
            batch.leave(list(batch.keys))
            return
        for job, token in zip(list(batch.keys), tokens):
            if not job.cancelled.is_set():
                self._push(job, running[job], token)
        self._leave_finished(batch, running)

    def _push(self, job: Job, row, token: int) -> None:
        if job.cancelled.is_set():
            return
        delta = row.push(token)
        if delta.finish_reason is not None:
            # The slot is free before the client learns the answer is complete: a client that
            # sends its next request at once is never refused for its own finished one.
            job.finished = True
            self.release()
        self._emit(job, delta)

    def _leave_finished(self, batch, running: dict) -> None:
        """Rows that finished or whose client left give their place (and, if a client left, its slot)
        back now."""
        gone = [job for job in batch.keys if job.finished or job.cancelled.is_set()]
        batch.leave(gone)
        for job in gone:
            del running[job]
            if not job.finished:
                self.release()

    def _emit(self, job: Job, item: Any) -> None:
        if job.loop is not None:
            self._outbox.setdefault(job.loop, []).append((job, item))
            return
        try:
            job.emit(item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancelled.set()

    def _flush(self) -> None:
        """Hand each event loop what its jobs got since the last flush, in one wake-up."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(job.emit, item) for job, item in items])
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                for job, _ in items:
                    job.cancelled.set()


def _deliver(items: list[tuple[Callable[[Any], None], Any]]) -> None:
    """On an event loop: each job's items, in the order the worker emitted them."""
    for emit, item in items:
        emit(item)
