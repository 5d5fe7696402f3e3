"""The inference worker: off the event loop, merging waiting generation jobs, giving up on a hung call."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from core.types import Generation, GenerationRequest, Models, Task
from core.worker import InferenceWorker, ModelStalled
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


@pytest.mark.parametrize(("gather_s", "calls"), [(0.5, [["a", "b"]]), (0.0, [["a"], ["b"]])])
async def test_a_batch_waits_briefly_for_requests_that_arrive_just_after_it(
    gather_s: float, calls: list[list[str]]
) -> None:
    """Turns that start together reach the worker a few milliseconds apart: one batch takes them all."""
    generator = FakeGenerator()
    worker = InferenceWorker(generator, FakeEmbedder(), FakeRenderer(), gather_s=gather_s)
    worker.start()
    try:
        first = asyncio.create_task(worker.generate([request("a")]))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(worker.generate([request("b")]))
        await asyncio.gather(first, second)
    finally:
        await worker.stop()
    assert [[r.prompt for r in call] for call in generator.calls] == calls


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


# ---------------------------------------------------------------------------------------------
# The watchdog: a call that hangs is given up on, and the queue keeps moving
# ---------------------------------------------------------------------------------------------

STALL_S = 0.3
"""Far above what the fakes' honest calls take, and short enough to keep the tests fast."""


@dataclass
class Gate:
    """Holds a model call until opened, and says when one has reached it."""

    reached: threading.Event = field(default_factory=threading.Event)
    opened: threading.Event = field(default_factory=threading.Event)

    def __call__(self) -> str:
        self.reached.set()
        self.opened.wait(timeout=30)
        return "late"

    async def wait_reached(self) -> None:
        assert await asyncio.to_thread(self.reached.wait, 10), "the call never reached the gate"


@dataclass
class GatedGenerator(FakeGenerator):
    """A call holding a prompt that names a gate waits at that gate, then answers as usual."""

    gates: dict[str, Gate] = field(default_factory=dict)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        for gate in [self.gates[r.prompt] for r in requests if r.prompt in self.gates]:
            gate()
        return super().generate(requests)


def watched_worker(generator: FakeGenerator | None = None, *, max_abandoned: int = 2) -> InferenceWorker:
    worker = InferenceWorker(
        generator or FakeGenerator(), FakeEmbedder(), FakeRenderer(), stall_after_s=STALL_S, max_abandoned=max_abandoned
    )
    worker.start()
    return worker


async def eventually(condition: Callable[[], bool], what: str) -> None:
    """Wait for something another thread does; a bug shows as a failure, not a hung test run."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"after 10 s, still not: {what}")


async def test_a_stalled_merged_call_fails_its_jobs_and_the_next_job_is_served() -> None:
    hold, hang = Gate(), Gate()
    generator = GatedGenerator(gates={"hang": hang})
    worker = watched_worker(generator)
    try:
        holder = asyncio.create_task(worker.call(hold))
        await hold.wait_reached()
        stalled = [asyncio.create_task(worker.generate([request(p)])) for p in ("hang", "neighbour")]
        await eventually(lambda: worker.pending() == 2, "both jobs queued")
        hold.opened.set()
        await holder
        outcomes = await asyncio.gather(*stalled, return_exceptions=True)
        later = await worker.generate([request("later")])
        embedding = await worker.encode(["음식"])
    finally:
        hang.opened.set()
        await worker.stop()

    # The hung call is recorded when it returns, after the later one.
    assert sorted([r.prompt for r in call] for call in generator.calls) == [["hang", "neighbour"], ["later"]]
    assert all(isinstance(outcome, ModelStalled) for outcome in outcomes), outcomes
    assert "later" in later[0][0].text
    assert embedding.shape[0] == 1


async def test_the_late_result_of_an_abandoned_call_is_discarded() -> None:
    """The abandoned call returns while the next call is in hand: only that call's own answer lands."""
    hang, hold = Gate(), Gate()
    generator = GatedGenerator(gates={"hang": hang, "next": hold})
    # One abandoned thread at most: while the hung call lives, "next" cannot be given up on.
    worker = watched_worker(generator, max_abandoned=1)
    try:
        with pytest.raises(ModelStalled):
            await worker.generate([request("hang")])
        following = asyncio.create_task(worker.generate([request("next")]))
        await hold.wait_reached()
        hang.opened.set()
        await eventually(lambda: worker.abandoned_threads == 0, "the abandoned thread ended")
        hold.opened.set()
        [[answer]] = await following
    finally:
        hang.opened.set()
        hold.opened.set()
        await worker.stop()

    assert "next" in answer.text and "hang" not in answer.text
    assert [[r.prompt for r in call] for call in generator.calls] == [["hang"], ["next"]]
    assert worker.batches_run == 1, "the abandoned call's result was counted as served"


async def test_past_the_cap_on_abandoned_threads_jobs_wait_for_the_stuck_call(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first, second = Gate(), Gate()
    worker = watched_worker(max_abandoned=1)
    try:
        with pytest.raises(ModelStalled):
            await worker.call(first)
        stuck = asyncio.create_task(worker.call(second))
        waiting = asyncio.create_task(worker.encode(["음식"]))
        await eventually(lambda: any("still running" in r.getMessage() for r in caplog.records), "the cap logged")
        assert not stuck.done() and not waiting.done()
        assert worker.abandoned_threads == 1

        first.opened.set()  # the abandoned call returns: its slot frees, and the stuck one is given up on
        with pytest.raises(ModelStalled):
            await stuck
        assert (await waiting).shape[0] == 1
    finally:
        first.opened.set()
        second.opened.set()
        await worker.stop()

    capped = [record for record in caplog.records if "still running" in record.getMessage()]
    assert [record.levelno for record in capped] == [logging.ERROR]


async def test_stop_returns_while_an_abandoned_call_still_hangs() -> None:
    hang = Gate()
    worker = watched_worker()
    try:
        stalled = asyncio.create_task(worker.call(hang))
        await hang.wait_reached()
        await worker.stop()  # the call in hand is given up on; its replacement takes the stop

        with pytest.raises(ModelStalled):
            await stalled
        assert worker.abandoned_threads == 1 and not hang.opened.is_set()
    finally:
        hang.opened.set()
    await eventually(lambda: worker.abandoned_threads == 0, "the abandoned thread ended")


def test_the_stall_limit_and_the_gathering_window_are_checked() -> None:
    with pytest.raises(ValueError, match="stall_after_s"):
        InferenceWorker(FakeGenerator(), FakeEmbedder(), FakeRenderer(), stall_after_s=0)
    with pytest.raises(ValueError, match="gather_s"):
        InferenceWorker(FakeGenerator(), FakeEmbedder(), FakeRenderer(), gather_s=-1)


async def test_models_are_served_by_the_thread_that_loaded_them() -> None:
    """Per-thread runtime state (torch's OpenMP teams) is only shared if loading and serving share a thread."""
    loaded_on: list[int] = []
    generator = FakeGenerator()

    def load() -> Models:
        loaded_on.append(threading.get_ident())
        return Models(generator, FakeEmbedder(), FakeRenderer())

    worker = InferenceWorker.loading(load)
    assert len(loaded_on) == 1, "loading() returns once the models are loaded"
    worker.start()
    try:
        served_on = await worker.call(threading.get_ident)
        generations = await worker.generate([request("a")])
    finally:
        await worker.stop()
    assert served_on == loaded_on[0] != threading.get_ident()
    assert len(generations[0]) == 1 and [r.prompt for r in generator.calls[0]] == ["a"]


def test_a_load_that_fails_raises_where_the_worker_was_asked_for() -> None:
    def load() -> Models:
        raise FileNotFoundError("no checkpoint")

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        InferenceWorker.loading(load)
