"""The one thread that owns the models, fed by the event loop.

Torch calls block for seconds, so they never run on the event loop. One thread (not a pool) owns
the models because a PEFT model with several adapters is not safe to drive from two threads, and
two threads would only fight over the same CPU cores. Generation jobs that wait in the queue at
the same moment are merged into ONE `generate` call: that is how turns of different users share a
batch, which is where a CPU or GPU gets its throughput.

A call that never returns would hold up every user behind it, so a watchdog can give up on one:
see `InferenceWorker`.

Where the models are loaded matters too: see `InferenceWorker.loading`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from core.types import (
    Embedder,
    FaceRenderer,
    FaceRequest,
    Generation,
    GenerationRequest,
    Models,
    RenderedFace,
    TextGenerator,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    run: Callable[[], T] | None
    """A call to make alone; None for a generation job, which is merged with its neighbours."""
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    requests: Sequence[GenerationRequest] = field(default_factory=tuple)

    def resolve(self, result: Any) -> None:
        self.loop.call_soon_threadsafe(_set_result, self.future, result)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(_set_exception, self.future, error)


@dataclass
class _Step:
    """The jobs a serving thread took from the queue and owes an answer, as the watchdog sees them."""

    jobs: Sequence[_Job[Any]]
    call_started: float = 0.0
    """When the model call now running began (`time.monotonic()`); each call gets the full limit."""
    abandoned: bool = False


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class ModelStalled(RuntimeError):
    """A model call ran past the worker's stall limit; the jobs waiting on it were given up."""


class _Abandoned(BaseException):
    """Ends a serving thread whose call the watchdog gave up on, as soon as that call returns.

    A BaseException, as asyncio's CancelledError is, so that the handlers that pass model errors
    on to the awaiting coroutines let it through: the thread must not touch any job again.
    """


_STOP = object()


class _HomeThread:
    """A daemon thread that loads the models, then waits to be handed the serving loop."""

    def __init__(self, load: Callable[[], Models]) -> None:
        self._load = load
        self._loaded = threading.Event()
        self._handover: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._models: Models | None = None
        self._error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ohlora-inference", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self._models = self._load()
        except BaseException as error:  # noqa: BLE001 - re-raised on the thread that asked
            self._error = error
            return
        finally:
            self._loaded.set()
        self._handover.get()()

    def models(self) -> Models:
        """Wait for the load; its exception, if it raised, is raised here."""
        self._loaded.wait()
        if self._error is not None:
            raise self._error
        assert self._models is not None
        return self._models

    def serve(self, loop: Callable[[], None]) -> None:
        self._handover.put(loop)


class InferenceWorker:
    """Runs model calls on a dedicated thread; awaitable from the event loop.

    With `stall_after_s` set, a watchdog fails the jobs of a call that has run longer than that
    with `ModelStalled`, abandons its thread (whatever the call returns later is discarded, and
    the thread ends) and starts a fresh serving thread, so the queue keeps moving.

    The price is honest: the abandoned call may still be using the models while the new thread
    starts on them, and a PEFT model driven with mixed adapters is not safe to use from two
    threads. So the limit must sit well above the time any honest call takes. The LLM honours the
    deadline each request carries by stopping early on its own, which keeps honest calls short;
    the watchdog is for calls that ignore it (a wedged driver, a backend that never answers). At
    most `max_abandoned` abandoned threads may be alive at once; past that the worker logs an
    error (once) and stops replacing threads, and jobs wait for the stuck call as they would without a
    watchdog.
    """

    def __init__(
        self,
        generator: TextGenerator,
        embedder: Embedder,
        renderer: FaceRenderer,
        *,
        max_batch_requests: int = 32,
        gather_s: float = 0.02,
        stall_after_s: float | None = None,
        max_abandoned: int = 2,
    ) -> None:
        if stall_after_s is not None and stall_after_s <= 0:
            raise ValueError("stall_after_s must be positive, or None for no watchdog")
        if gather_s < 0:
            raise ValueError("gather_s cannot be negative")
        self._generator = generator
        self._embedder = embedder
        self._renderer = renderer
        self._max_batch_requests = max_batch_requests
        self._gather_s = gather_s
        """How long a generation batch waits for more requests before it starts. Turns that
        begin together reach the worker a few milliseconds apart (each one's memory lookup
        finishes on this thread, then its task on the event loop submits the generation), and a
        batch that starts without the last of them costs that turn a whole round of its own: in
        the bench's eight users at once, a third generate call instead of two. A generate call
        takes seconds, so the wait costs a turn about 1 %."""
        self._stall_after_s = stall_after_s
        self._max_abandoned = max_abandoned
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: deque[Any] = deque()
        """Jobs taken from the queue while merging a batch but not mergeable; served next, in order."""
        self._thread: threading.Thread | None = None
        """The serving thread; replaced when the watchdog abandons one."""
        self._home: _HomeThread | None = None
        """The thread that loaded the models (see `loading`), until it becomes the serving thread."""
        self._stopped = threading.Event()
        self._watch = threading.Condition()
        """Guards the fields below; notified whenever the watchdog has something new to look at."""
        self._in_hand: _Step | None = None
        self._abandoned = 0
        self._stopping = False
        self._reported_full = False
        self._watchdog: threading.Thread | None = None
        self.batches_run = 0
        """How many `generate` calls reached the model; lets tests and stats see the merging."""

    @classmethod
    def loading(cls, load: Callable[[], Models], **options: Any) -> InferenceWorker:
        """Run `load` on a new thread, which becomes the serving thread at `start()`.

        Runtimes may keep per-thread state, and torch does: each thread that runs parallel CPU
        code gets an OpenMP thread team of its own. With two teams on the same cores, libgomp stops
        letting idle team threads spin and puts them to sleep after every parallel region. Loading
        on the main thread and decoding on this one cost 34,000 context switches per 33-token
        batch and about 10 % of decoding speed on a 2-core machine; loading here costs none.
        Blocks until the models are loaded; an exception from `load` is raised here.
        """
        home = _HomeThread(load)
        models = home.models()
        worker = cls(models.generator, models.embedder, models.renderer, **options)
        worker._home = home
        return worker

    @property
    def generator(self) -> TextGenerator:
        return self._generator

    @property
    def renderer(self) -> FaceRenderer:
        return self._renderer

    @property
    def abandoned_threads(self) -> int:
        """Serving threads given up on whose calls have not returned yet."""
        with self._watch:
            return self._abandoned

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopped.clear()
        self._stopping = False
        self._start_serving()
        if self._stall_after_s is not None:
            self._watchdog = threading.Thread(
                target=self._watch_calls, args=(self._stall_after_s,), name="ohlora-watchdog", daemon=True
            )
            self._watchdog.start()

    async def stop(self) -> None:
        """Answer the jobs already queued, then end the serving thread.

        A call that hangs meanwhile is given up on as at any other time; abandoned threads are not
        waited for: they end on their own when their calls return.
        """
        if self._thread is None:
            return
        self._jobs.put(_STOP)
        await asyncio.to_thread(self._stopped.wait)
        with self._watch:
            self._stopping = True
            self._watch.notify_all()
        if self._watchdog is not None:
            await asyncio.to_thread(self._watchdog.join)
        self._thread = self._watchdog = None

    def pending(self) -> int:
        return self._jobs.qsize()

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        return await self._submit(None, requests)

    async def encode(self, texts: Sequence[str]) -> np.ndarray:
        return await self._submit(lambda: self._embedder.encode(texts))

    async def render(self, request: FaceRequest) -> RenderedFace:
        return await self._submit(lambda: self._renderer.render(request))

    async def call(self, run: Callable[[], T]) -> T:
        """Any other model-side call (the tokenizer, say) on the thread that owns the models.

        Fast tokenizers are not safe to use from a second thread while a batch call pads with them.
        """
        return await self._submit(run)

    async def _submit(self, run: Callable[[], T] | None, requests: Sequence[GenerationRequest] = ()) -> Any:
        if self._thread is None:
            raise RuntimeError("the inference worker is not running")
        loop = asyncio.get_running_loop()
        job: _Job[Any] = _Job(run=run, future=loop.create_future(), loop=loop, requests=requests)
        self._jobs.put(job)
        return await job.future

    # -- the serving thread ----------------------------------------------------------------------

    def _start_serving(self) -> None:
        if self._home is not None:
            self._thread, home, self._home = self._home.thread, self._home, None
            home.serve(self._serve)
            return
        self._thread = threading.Thread(target=self._serve, name="ohlora-inference", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            while (jobs := self._take()) is not None:
                step, first = _Step(jobs), jobs[0]
                if first.run is None:
                    self._run_generation(step, jobs)
                else:
                    self._run_alone(step, first, first.run)
        except _Abandoned:
            with self._watch:
                self._abandoned -= 1
                self._watch.notify_all()
            return
        self._stopped.set()

    def _take(self) -> list[_Job[Any]] | None:
        """The next job, merged with the generation jobs queued behind it or arriving within
        `gather_s`; None when told to stop."""
        while True:
            job = self._held.popleft() if self._held else self._jobs.get()
            if job is _STOP:
                return None
            if not job.future.cancelled():
                break
        if job.run is not None:
            return [job]
        batch = [job]
        size = len(job.requests)
        deadline = time.monotonic() + self._gather_s
        while size < self._max_batch_requests:
            try:
                other = self._jobs.get(timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                break
            if other is not _STOP and other.run is None and not other.future.cancelled():
                batch.append(other)
                size += len(other.requests)
            else:
                self._held.append(other)
        return batch

    def _watched(self, step: _Step, call: Callable[[], T]) -> T:
        """Make one model call in sight of the watchdog; raises _Abandoned if it gave up meanwhile."""
        with self._watch:
            step.call_started = time.monotonic()
            self._in_hand = step
            self._watch.notify_all()
        try:
            return call()
        finally:
            with self._watch:
                if step.abandoned:
                    raise _Abandoned
                self._in_hand = None

    def _run_alone(self, step: _Step, job: _Job[T], run: Callable[[], T]) -> None:
        try:
            job.resolve(self._watched(step, run))
        except Exception as error:  # noqa: BLE001 - handed to the awaiting coroutine
            job.fail(error)

    def _run_generation(self, step: _Step, batch: list[_Job[Any]]) -> None:
        requests = [request for job in batch for request in job.requests]
        try:
            results = self._watched(step, lambda: self._generator.generate(requests))
            self.batches_run += 1
        except Exception as error:  # noqa: BLE001 - handed to the awaiting coroutines
            if len(batch) == 1:
                batch[0].fail(error)
                return
            logger.warning("merged generation of %d turns failed; retrying each alone", len(batch))
            for job in batch:
                self._run_generation(step, [job])
            return
        start = 0
        for job in batch:
            end = start + len(job.requests)
            job.resolve(results[start:end])
            start = end

    # -- the watchdog ----------------------------------------------------------------------------

    def _watch_calls(self, limit_s: float) -> None:
        """Sleep until the call in hand has run `limit_s`, then give up on it if the cap allows."""
        with self._watch:
            while not self._stopping:
                step = self._in_hand
                if step is None:
                    self._watch.wait()
                    continue
                left = step.call_started + limit_s - time.monotonic()
                if left > 0:
                    self._watch.wait(left)
                elif self._abandoned < self._max_abandoned:
                    self._abandon(step, limit_s)
                else:
                    if not self._reported_full:
                        self._reported_full = True
                        logger.error(
                            "a model call has run past the %g s stall limit, and %d abandoned calls are "
                            "still running: jobs now wait for it; restart the service if this persists",
                            limit_s,
                            self._abandoned,
                        )
                    self._watch.wait()  # until another call is in hand or an abandoned thread ends

    def _abandon(self, step: _Step, limit_s: float) -> None:
        """Fail the step's jobs and hand the queue to a fresh thread; the caller holds `_watch`."""
        step.abandoned = True
        self._in_hand = None
        self._abandoned += 1
        logger.error(
            "a model call ran past the %g s stall limit: %d waiting turns get an apology and its thread "
            "is abandoned (%d abandoned, at most %d)",
            limit_s,
            len(step.jobs),
            self._abandoned,
            self._max_abandoned,
        )
        # Jobs of this step already answered (before a merged batch's per-job retry stalled) keep
        # their answer: it was queued on their loop before this failure.
        for job in step.jobs:
            job.fail(ModelStalled(f"the model call did not return within {limit_s:g} s"))
        self._start_serving()
