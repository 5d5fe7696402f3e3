"""Faults: one adapter that raises, hangs past the deadline, or talks garbage, fifteen times running.

One user's requests to one adapter misbehave (the fake adapter recognises that user's words in
its prompt); everyone else's requests to the same adapter are fine, and they share the worker and
its merged batches with the faulty ones. Each faulty turn must still get a polite answer: the
error or deadline apology, or the SPEC's fallback for that task (SPEC E.3.3: "(읽씹)" for the
answer, no memory, a reset summary, the neutral expression). Other users keep being answered,
the bot recovers when the adapter does, and nothing stored before is lost or changed.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from enum import Enum

import pytest

from core import prompts
from core.engine import ERROR_TEXT, TIMEOUT_TEXT, EngineOptions
from core.types import ExpressionScores, GenerationRequest, IncomingMessage, Reply, ReplyKind, Task
from tests.fakes import FakeGenerator, Harness, make_harness

TRIGGER = "고장"
"""In every message of the faulty user, and so in every prompt built from one."""
FAULTS_IN_A_ROW = 15
DEADLINE_S = 0.3
HANG_S = 1.0
"""Well past the deadline, but finite, as a slow backend or an HTTP timeout would be."""
STALL_S = 0.2
"""The watchdog's limit in the hang test: far above an honest fake call, far below the deadline."""
MEMORY_RULES = {"떡볶이": "[좋아하는 음식: 떡볶이]", "축구": "[취미: 축구]"}

JUNK: dict[Task, tuple[str, ...]] = {
    Task.OUTPUT_MESSAGE: (
        "",
        "\ufffd\ufffd\ufffd",
        ' "따옴표" http://spam',
        "(답변 종료)(답변 종료)",
        "(사용자 질문) 뭐?",
    ),
    Task.MEMORY: ("[[키: 값]]", "http://spam", "\ufffd", "[a: b: c]", "답변 종료"),
    Task.SUMMARY: ("", "x", "\ufffd 요약", "http://spam", "답변 종료 답변 종료"),
    Task.EYES_MOUTH_POSE: (
        "",
        "(눈 반짝, 입 크게, 고개 돌림 없음)",
        "눈  보통, 입 보통, 고개 돌림 없음",
        "\ufffd",
        "(답변 종료)",
    ),
}
"""Continuations every filter of the task rejects."""


class Fault(str, Enum):
    RAISES = "raises"
    HANGS = "hangs"
    GARBAGE = "garbage"


@dataclass
class FaultyAdapter:
    """One task's script: the faulty user's requests misbehave while `active`; all others are fine."""

    task: Task
    fault: Fault
    active: bool = False
    hanging: threading.Event = field(default_factory=threading.Event)
    """Set while a request is held up, so a test can act during the hang."""
    release: threading.Event = field(default_factory=threading.Event)
    hang_s: float = HANG_S
    _healthy: FakeGenerator = field(default_factory=lambda: FakeGenerator(memory_rules=MEMORY_RULES))
    _junk: Iterator[str] = field(init=False)

    def __post_init__(self) -> None:
        self._junk = itertools.cycle(JUNK[self.task])

    def __call__(self, request: GenerationRequest) -> str:
        if self.active and TRIGGER in request.prompt:
            if self.fault is Fault.RAISES:
                raise RuntimeError(f"the {self.task.value} adapter fell over")
            if self.fault is Fault.GARBAGE:
                return next(self._junk)
            self.hanging.set()
            self.release.wait(timeout=self.hang_s)
            self.hanging.clear()
        return self._healthy._default(request)

    def generator(self) -> FakeGenerator:
        return FakeGenerator(memory_rules=MEMORY_RULES, scripts={self.task: self})


def message(user: str, text: str) -> IncomingMessage:
    return IncomingMessage(platform="telegram", user_id=user, chat_id="group", text=text)


FAULTY = "faulty"
HEALTHY = "healthy"


@dataclass(frozen=True)
class Stored:
    """What a user has stored, to compare before and after."""

    memories: list[str]
    summary: str
    scores: ExpressionScores | None

    @classmethod
    async def of(cls, harness: Harness, user: str) -> Stored:
        store, probe = harness.store, message(user, "")
        return cls(
            memories=[memory.text for memory in await store.memories(probe.user_key)],
            summary=await store.summary(probe.conversation_key),
            scores=await store.last_scores(probe.user_key),
        )


@pytest.fixture
def adapters() -> list[FaultyAdapter]:
    return []


@pytest.fixture
async def harnesses(adapters: list[FaultyAdapter]) -> AsyncIterator[list[Harness]]:
    built: list[Harness] = []
    yield built
    for adapter in adapters:
        adapter.release.set()
    for harness in built:
        await harness.worker.stop()


def polite(reply: Reply) -> bool:
    return reply.kind is ReplyKind.ANSWER or (
        reply.kind is ReplyKind.ERROR and reply.text in (ERROR_TEXT, TIMEOUT_TEXT)
    )


def expected_fault_reply(task: Task, fault: Fault, reply: Reply) -> bool:
    """The polite answer SPEC E.3.3 and the engine promise for this fault."""
    if fault is Fault.RAISES:
        return reply.kind is ReplyKind.ERROR and reply.text == ERROR_TEXT
    if fault is Fault.HANGS:  # the deadline's apology, or the error one should a watchdog give up first
        return reply.kind is ReplyKind.ERROR and reply.text in (TIMEOUT_TEXT, ERROR_TEXT)
    if reply.kind is not ReplyKind.ANSWER:
        return False
    if task is Task.OUTPUT_MESSAGE:
        return reply.text == prompts.FALLBACK_OUTPUT_MESSAGE
    if task is Task.SUMMARY:
        return reply.summary == prompts.FALLBACK_SUMMARY
    if task is Task.EYES_MOUTH_POSE:
        return reply.expression == prompts.FALLBACK_EXPRESSION
    return reply.text.startswith("그렇구나!")


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(Fault), ids=lambda fault: fault.value)
@pytest.mark.parametrize("task", list(Task), ids=lambda task: task.value)
async def test_an_adapter_failing_fifteen_times_in_a_row(
    task: Task, fault: Fault, adapters: list[FaultyAdapter], harnesses: list[Harness]
) -> None:
    adapter = FaultyAdapter(task, fault)
    adapters.append(adapter)
    harness = make_harness(generator=adapter.generator(), options=EngineOptions(turn_timeout_s=DEADLINE_S))
    harnesses.append(harness)
    engine = harness.engine
    assert (await engine.reply(message(FAULTY, f"{TRIGGER} 나 떡볶이 좋아해"))).kind is ReplyKind.ANSWER
    assert (await engine.reply(message(HEALTHY, "나 축구 좋아해"))).kind is ReplyKind.ANSWER
    faulty_before, healthy_before = await Stored.of(harness, FAULTY), await Stored.of(harness, HEALTHY)
    assert faulty_before.memories == ["[좋아하는 음식: 떡볶이]"] and faulty_before.summary

    adapter.active = True
    faulty_done = asyncio.Event()

    async def faulty_user() -> list[Reply]:
        try:
            # Each would also store a memory ("[취미: 축구]") if the memory adapter worked.
            return [
                await engine.reply(message(FAULTY, f"{TRIGGER} 나 축구도 좋아해 {n}")) for n in range(FAULTS_IN_A_ROW)
            ]
        finally:
            faulty_done.set()

    async def healthy_user() -> list[Reply]:
        replies: list[Reply] = []
        while not faulty_done.is_set() or len(replies) < 3:
            replies.append(await engine.reply(message(HEALTHY, f"내 취미 얘기 {len(replies)}")))
        return replies

    faulty_replies, healthy_replies = await asyncio.gather(faulty_user(), healthy_user())
    adapter.active = False

    assert [expected_fault_reply(task, fault, reply) for reply in faulty_replies] == [True] * FAULTS_IN_A_ROW
    if fault is Fault.HANGS:
        # Without a watchdog a held-up call holds up everyone behind it (see the next test).
        assert all(polite(reply) for reply in healthy_replies)
    else:
        assert all(reply.kind is ReplyKind.ANSWER for reply in healthy_replies)
        assert all(reply.used_memory == "[취미: 축구]" for reply in healthy_replies)

    faulty_after = await Stored.of(harness, FAULTY)
    if fault is not Fault.GARBAGE:
        assert faulty_after == faulty_before, "a failed turn changed what was stored"
        log = await harness.store.recent_turns(message(FAULTY, "").user_key, FAULTS_IN_A_ROW)
        assert len(log) == FAULTS_IN_A_ROW
        assert {row.status for row in log} <= ({"error"} if fault is Fault.RAISES else {"error", "timeout"})
    else:
        # The turns went through on fallbacks: earlier memories stay, a working memory adapter adds.
        assert faulty_after.memories[: len(faulty_before.memories)] == faulty_before.memories
        if task is Task.MEMORY:
            assert faulty_after.memories == faulty_before.memories
        if task is Task.SUMMARY:
            assert faulty_after.summary == prompts.FALLBACK_SUMMARY
    assert (await Stored.of(harness, HEALTHY)).memories == healthy_before.memories

    adapter.release.set()
    recovered = await engine.reply(message(FAULTY, f"{TRIGGER} 내가 좋아하는 음식 알아?"))
    assert recovered.kind is ReplyKind.ANSWER and recovered.used_memory == "[좋아하는 음식: 떡볶이]"
    assert (await engine.reply(message(HEALTHY, "축구 좋아하는 거 기억해?"))).kind is ReplyKind.ANSWER


async def test_another_user_is_answered_while_an_adapter_hangs(
    adapters: list[FaultyAdapter], harnesses: list[Harness]
) -> None:
    """While one user's memory request hangs, the worker's watchdog gives up on that call: the
    held-up user gets an apology, and another user's whole turn goes through on a fresh thread."""
    adapter = FaultyAdapter(Task.MEMORY, Fault.HANGS, active=True, hang_s=30.0)
    adapters.append(adapter)
    harness = make_harness(
        generator=adapter.generator(), options=EngineOptions(turn_timeout_s=5.0), stall_after_s=STALL_S
    )
    harnesses.append(harness)

    held_up = asyncio.create_task(harness.engine.reply(message(FAULTY, f"{TRIGGER} 안녕")))
    while not adapter.hanging.is_set():
        await asyncio.sleep(0.01)
    try:
        other = await harness.engine.reply(message(HEALTHY, "나 축구 좋아해"))
        faulty_reply = await held_up
    finally:
        adapter.release.set()

    assert expected_fault_reply(Task.MEMORY, Fault.HANGS, faulty_reply)
    assert other.kind is ReplyKind.ANSWER, f"the other user was not served during the hang: {other.text}"
    assert [memory.text for memory in await harness.store.memories("telegram:healthy")] == ["[취미: 축구]"]
