"""The one thread that owns the models, fed by the event loop.

Torch calls block for seconds, so they never run on the event loop. One thread (not a pool) owns
the models because a PEFT model with several adapters is not safe to drive from two threads, and
two threads would only fight over the same CPU cores. Generation jobs that wait in the queue at
the same moment are merged into ONE `generate` call: that is how turns of different users share a
batch, which is where a CPU or GPU gets its throughput.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
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


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


_STOP = object()


class InferenceWorker:
    """Runs model calls on a dedicated thread; awaitable from the event loop."""

    def __init__(
        self,
        generator: TextGenerator,
        embedder: Embedder,
        renderer: FaceRenderer,
        *,
        max_batch_requests: int = 32,
    ) -> None:
        self._generator = generator
        self._embedder = embedder
        self._renderer = renderer
        self._max_batch_requests = max_batch_requests
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self.batches_run = 0
        """How many `generate` calls reached the model; lets tests and stats see the merging."""

    @property
    def generator(self) -> TextGenerator:
        return self._generator

    @property
    def renderer(self) -> FaceRenderer:
        return self._renderer

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="ohlora-inference", daemon=True)
            self._thread.start()

    async def stop(self) -> None:
        """Finish the job in hand, then end the thread; queued jobs still get their answers."""
        if self._thread is not None:
            self._jobs.put(_STOP)
            await asyncio.to_thread(self._thread.join)
            self._thread = None

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

    def _serve(self) -> None:
        waiting: deque[Any] = deque()
        while True:
            job = waiting.popleft() if waiting else self._jobs.get()
            if job is _STOP:
                return
            if job.future.cancelled():
                continue
            if job.run is not None:
                self._run_alone(job)
                continue
            batch = [job]
            size = len(job.requests)
            while size < self._max_batch_requests:
                try:
                    other = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if other is not _STOP and other.run is None and not other.future.cancelled():
                    batch.append(other)
                    size += len(other.requests)
                else:
                    waiting.append(other)
            self._run_generation(batch)

    def _run_alone(self, job: _Job[Any]) -> None:
        try:
            job.resolve(job.run())  # type: ignore[misc]
        except Exception as error:  # noqa: BLE001 - handed to the awaiting coroutine
            job.fail(error)

    def _run_generation(self, batch: list[_Job[Any]]) -> None:
        requests = [request for job in batch for request in job.requests]
        try:
            results = self._generator.generate(requests)
            self.batches_run += 1
        except Exception as error:  # noqa: BLE001 - handed to the awaiting coroutines
            if len(batch) == 1:
                batch[0].fail(error)
                return
            logger.warning("merged generation of %d turns failed; retrying each alone", len(batch))
            for job in batch:
                self._run_generation([job])
            return
        start = 0
        for job in batch:
            end = start + len(job.requests)
            job.resolve(results[start:end])
            start = end
