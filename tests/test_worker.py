"""The inference worker: off the event loop, and merging waiting generation jobs into one batch."""

from __future__ import annotations

import asyncio
import threading

from core.types import GenerationRequest, Task
from core.worker import InferenceWorker
from tests.fakes import FakeEmbedder, FakeGenerator, FakeRenderer


def request(prompt: str) -> GenerationRequest:
    return GenerationRequest(task=Task.OUTPUT_MESSAGE, prompt=prompt, max_new_tokens=8, temperature=0.6)


async def test_jobs_waiting_together_become_one_generate_call() -> None:
    release = threading.Event()
    generator = FakeGenerator(release=release)
    worker = InferenceWorker(generator, FakeEmbedder(), FakeRenderer())
    worker.start()
    try:
        first = asyncio.create_task(worker.generate([request("a")]))
        while not generator.calls:
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(worker.generate([request(p), request(p + "!")])) for p in ("b", "c")]
        while worker.pending() < 2:
            await asyncio.sleep(0.01)
        release.set()
        results = await asyncio.gather(first, *waiting)
    finally:
        release.set()
        await worker.stop()

    assert [[r.prompt for r in call] for call in generator.calls] == [["a"], ["b", "b!", "c", "c!"]]
    assert [len(result) for result in results] == [1, 2, 2]
    assert worker.batches_run == 2


async def test_a_failing_merged_batch_is_retried_per_job_so_one_bad_turn_spares_the_others() -> None:
    release = threading.Event()

    class PickyGenerator(FakeGenerator):
        def generate(self, requests):  # type: ignore[no-untyped-def]
            if any(r.prompt == "poison" for r in requests):
                self.calls.append(list(requests))
                raise ValueError("bad input")
            return super().generate(requests)

    generator = PickyGenerator(release=release)
    worker = InferenceWorker(generator, FakeEmbedder(), FakeRenderer())
    worker.start()
    try:
        blocker = asyncio.create_task(worker.generate([request("first")]))
        while not generator.calls:
            await asyncio.sleep(0.01)
        good = asyncio.create_task(worker.generate([request("good")]))
        bad = asyncio.create_task(worker.generate([request("poison")]))
        while worker.pending() < 2:
            await asyncio.sleep(0.01)
        release.set()
        await blocker
        outcome = await asyncio.gather(good, bad, return_exceptions=True)
    finally:
        release.set()
        await worker.stop()

    first, second = outcome
    assert isinstance(first, list) and len(first) == 1
    assert isinstance(second, ValueError)


async def test_the_event_loop_keeps_running_while_the_model_works() -> None:
    generator = FakeGenerator(delay_s=0.3)
    worker = InferenceWorker(generator, FakeEmbedder(), FakeRenderer())
    worker.start()
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        await worker.generate([request("slow")])
    finally:
        ticker.cancel()
        await worker.stop()

    assert ticks >= 5
