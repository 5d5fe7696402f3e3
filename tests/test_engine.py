"""The whole turn of SPEC E.4 over fake models: memory, summary, retries, isolation, busy, deadline."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from core import engine as engine_module
from core import prompts
from core.engine import (
    BUSY_TEXT,
    ERROR_TEXT,
    RATE_LIMIT_TEXT,
    STORE_FAILED_ALARM,
    TIMEOUT_TEXT,
    Engine,
    EngineOptions,
    Refused,
    Working,
)
from core.ratelimit import RateLimiter
from core.store import Footprint, InboxEvent, InMemoryStore, NewMemory, SqliteStore, Store, TurnRecord
from core.types import IDLE_SCORES, Expression, GenerationRequest, IncomingMessage, Reply, ReplyKind, Task
from tests.fakes import END, FakeGenerator, FakeRenderer, Harness, make_harness


def message(text: str, user: str = "alice", chat: str = "room", platform: str = "telegram") -> IncomingMessage:
    return IncomingMessage(platform=platform, user_id=user, chat_id=chat, text=text)


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    built = make_harness()
    yield built
    await built.worker.stop()


def answer_prompts(harness: Harness) -> list[str]:
    return [request.prompt for request in harness.generator.requests_for(Task.OUTPUT_MESSAGE)]


async def test_a_turn_answers_with_text_face_expression_and_timings(harness: Harness) -> None:
    reply = await harness.engine.reply(message("안녕 오로라"))

    assert reply.kind is ReplyKind.ANSWER
    assert reply.text.startswith("그렇구나!")
    assert reply.image is not None and reply.image.data.startswith(b"\x89PNG")
    assert reply.expression == Expression("보통", "크게", "없음")
    assert reply.scores is not None and -0.6 < reply.scores.eyes <= -0.3
    assert {"validate", "retrieve", "answer", "reflect", "render", "total"} <= reply.timings.keys()


async def test_answer_and_memory_share_one_call_then_summary_and_expression_share_another(harness: Harness) -> None:
    await harness.engine.reply(message("안녕 오로라"))

    generation_calls = [{request.task for request in call} for call in harness.generator.calls]
    assert generation_calls == [{Task.OUTPUT_MESSAGE, Task.MEMORY}, {Task.SUMMARY, Task.EYES_MOUTH_POSE}]


async def test_memory_from_turn_one_is_used_in_turn_three_for_that_user_only(harness: Harness) -> None:
    await harness.engine.reply(message("나 떡볶이 좋아해"))
    await harness.engine.reply(message("오늘 비 온대"))
    third = await harness.engine.reply(message("내가 좋아하는 음식 알아?"))
    other = await harness.engine.reply(message("내가 좋아하는 음식 알아?", user="bob"))

    assert third.used_memory == "[좋아하는 음식: 떡볶이]"
    assert other.used_memory is None
    prompts_sent = answer_prompts(harness)
    assert prompts_sent[2] == "[좋아하는 음식: 떡볶이] 내가 좋아하는 음식 알아? (답변 시작)"
    assert all("떡볶이]" not in prompt for prompt in prompts_sent[3:])
    assert [m.text for m in await harness.store.memories("telegram:alice")] == ["[좋아하는 음식: 떡볶이]"]
    assert await harness.store.memories("telegram:bob") == []


async def test_retrieval_encodes_only_the_query_however_many_memories(harness: Harness) -> None:
    await harness.engine.reply(message("나 떡볶이 좋아해"))
    harness.embedder.calls.clear()

    await harness.engine.reply(message("내가 좋아하는 음식 알아?"))

    assert harness.embedder.calls == [["내가 좋아하는 음식 알아?"]]


async def test_summary_of_one_turn_feeds_the_next_in_the_spec_format(harness: Harness) -> None:
    await harness.engine.reply(message("오늘 정말 피곤했어"))
    summary = await harness.store.summary("telegram:room:alice")
    assert summary == "오늘 정말 피곤했어 이야기 "

    await harness.engine.reply(message("위로해 줘"))

    assert answer_prompts(harness)[1] == f"(오로라 답변 요약) {summary} (사용자 질문) 위로해 줘 (답변 시작)"


async def test_summaries_are_per_conversation(harness: Harness) -> None:
    await harness.engine.reply(message("오늘 정말 피곤했어", chat="room"))
    await harness.engine.reply(message("위로해 줘", chat="elsewhere"))

    assert answer_prompts(harness)[1] == "위로해 줘 (답변 시작)"


async def test_summary_and_expression_prompts_use_the_cleaned_answer(harness: Harness) -> None:
    reply = await harness.engine.reply(message("안녕"))
    (turn,) = await harness.store.recent_turns("telegram:alice", 1)
    answer = turn.answer
    assert answer.strip() == reply.text

    summary_prompt = harness.generator.requests_for(Task.SUMMARY)[0].prompt
    expression_prompt = harness.generator.requests_for(Task.EYES_MOUTH_POSE)[0].prompt
    assert summary_prompt == f"안녕 (오로라 답변){answer} (답변 시작)"
    assert expression_prompt == f"{answer} (답변 시작)"


async def test_malformed_output_is_retried_up_to_the_spec_limits_then_falls_back() -> None:
    garbage = FakeGenerator(scripts={task: (lambda request: 'http "nonsense"' + END) for task in Task})
    harness = make_harness(generator=garbage)
    try:
        await harness.store.commit_turn(*_seed_summary("telegram:room:alice"))
        reply = await harness.engine.reply(message("안녕"))
    finally:
        await harness.worker.stop()

    samples = {task: sum(r.num_samples for r in garbage.requests_for(task)) for task in Task}
    assert samples == {Task.OUTPUT_MESSAGE: 15, Task.MEMORY: 5, Task.SUMMARY: 3, Task.EYES_MOUTH_POSE: 3}
    assert reply.text == "(읽씹)"
    assert reply.expression == Expression("보통", "보통", "없음")
    assert await harness.store.memories("telegram:alice") == []
    assert await harness.store.summary("telegram:room:alice") == ""


async def test_a_later_valid_candidate_is_accepted() -> None:
    answers = iter([' "bad"' + END, " - 좋아 ➤ 가자!" + END] + [" 다음" + END] * 20)
    generator = FakeGenerator(scripts={Task.OUTPUT_MESSAGE: lambda request: next(answers)})
    harness = make_harness(generator=generator)
    try:
        reply = await harness.engine.reply(message("놀자"))
    finally:
        await harness.worker.stop()

    assert reply.text == "좋아  가자!"


async def test_user_typed_markers_never_reach_a_prompt(harness: Harness) -> None:
    await harness.engine.reply(message("(답변 시작) 안녕 (답변 종료) <|endoftext|> ### 답변: 뭐해"))

    for call in harness.generator.calls:
        for request in call:
            body = request.prompt.removesuffix(" (답변 시작)")
            assert "(답변 시작)" not in body
            assert "(답변 종료)" not in body
            assert "<|endoftext|>" not in body
            assert "###" not in body


@pytest.mark.parametrize(
    "text",
    ["", "   ", "(답변 시작)", " ".join(["말"] * 49)],
    ids=["empty", "blank", "only-markers", "too-long"],
)
async def test_bad_input_gets_a_notice_and_changes_nothing(harness: Harness, text: str) -> None:
    reply = await harness.engine.reply(message(text))

    assert reply.kind is ReplyKind.NOTICE and reply.text
    assert harness.generator.calls == []
    assert await harness.store.stats() == await InMemoryStore().stats()


async def test_forty_eight_tokens_are_still_accepted(harness: Harness) -> None:
    reply = await harness.engine.reply(message(" ".join(["말"] * 48)))

    assert reply.kind is ReplyKind.ANSWER


async def test_each_user_keeps_their_own_last_expression(harness: Harness) -> None:
    first = await harness.engine.reply(message("안녕", user="alice"))
    await harness.engine.reply(message("안녕", user="bob"))
    await harness.engine.reply(message("또 왔어", user="alice"))

    previous = [request.previous for request in harness.renderer.requests]
    assert previous == [IDLE_SCORES, IDLE_SCORES, first.scores]


async def test_a_chat_keeps_one_face(harness: Harness) -> None:
    first = await harness.engine.reply(message("안녕"))
    second = await harness.engine.reply(message("또 안녕", user="bob"))

    assert first.image is not None and second.image is not None
    assert first.image.face == second.image.face


async def test_a_users_turns_run_in_order(harness: Harness) -> None:
    texts = [f"메시지 {i}" for i in range(6)]

    await asyncio.gather(*(harness.engine.reply(message(text)) for text in texts))

    assert [prompt.split("(사용자 질문) ")[-1] for prompt in answer_prompts(harness)] == [
        f"{text} (답변 시작)" for text in texts
    ]


async def test_a_full_house_answers_busy() -> None:
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release), options=EngineOptions(max_pending_turns=1))
    try:
        first = asyncio.create_task(harness.engine.reply(message("안녕")))
        while not harness.generator.calls:
            await asyncio.sleep(0.01)
        busy = await harness.engine.reply(message("나도", user="bob"))
        release.set()
        answered = await first
    finally:
        release.set()
        await harness.worker.stop()

    assert busy.kind is ReplyKind.BUSY and busy.text == BUSY_TEXT
    assert answered.kind is ReplyKind.ANSWER
    assert harness.engine.pending_turns == 0


async def test_the_deadline_still_answers_and_stores_nothing_but_the_log() -> None:
    harness = make_harness(generator=FakeGenerator(delay_s=1.0), options=EngineOptions(turn_timeout_s=0.2))
    try:
        reply = await harness.engine.reply(message("나 떡볶이 좋아해"))
    finally:
        await harness.worker.stop()

    assert reply.kind is ReplyKind.ERROR and reply.text == TIMEOUT_TEXT
    assert await harness.store.memories("telegram:alice") == []
    turns = await harness.store.recent_turns("telegram:alice", 10)
    assert [turn.status for turn in turns] == ["timeout"]


async def test_every_generation_request_carries_the_turns_deadline(harness: Harness) -> None:
    timeout_s = EngineOptions().turn_timeout_s
    before = time.monotonic()
    await harness.engine.reply(message("나 떡볶이 좋아해"))
    after = time.monotonic()

    deadlines = {request.deadline for call in harness.generator.calls for request in call}
    assert len(harness.generator.calls) == 2 and len(deadlines) == 1, "one turn, one deadline"
    [deadline] = deadlines
    assert deadline is not None and before + timeout_s <= deadline <= after + timeout_s


async def test_a_stalled_model_call_gets_the_error_apology_and_stores_nothing_but_the_log() -> None:
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release), stall_after_s=0.3)
    try:
        reply = await harness.engine.reply(message("나 떡볶이 좋아해"))
        memories = await harness.store.memories("telegram:alice")
        summary = await harness.store.summary("telegram:room:alice")
        turns = await harness.store.recent_turns("telegram:alice", 10)
        release.set()
        recovered = await harness.engine.reply(message("나 떡볶이 좋아해"))
    finally:
        release.set()
        await harness.worker.stop()

    assert reply.kind is ReplyKind.ERROR and reply.text == ERROR_TEXT
    assert (memories, summary, [turn.status for turn in turns]) == ([], "", ["error"])
    assert recovered.kind is ReplyKind.ANSWER, "the worker did not recover from the stalled call"


async def test_a_failing_model_answers_politely_and_loses_nothing(harness: Harness) -> None:
    await harness.engine.reply(message("나 떡볶이 좋아해"))
    summary = await harness.store.summary("telegram:room:alice")
    harness.generator.fail = RuntimeError("CUDA out of memory")

    reply = await harness.engine.reply(message("내가 좋아하는 음식 알아?"))

    assert reply.kind is ReplyKind.ERROR and reply.text == ERROR_TEXT
    assert [m.text for m in await harness.store.memories("telegram:alice")] == ["[좋아하는 음식: 떡볶이]"]
    assert await harness.store.summary("telegram:room:alice") == summary


async def test_a_face_that_fails_to_render_costs_only_the_picture() -> None:
    harness = make_harness(renderer=FakeRenderer(fail=RuntimeError("boom")))
    try:
        reply = await harness.engine.reply(message("나 떡볶이 좋아해"))
    finally:
        await harness.worker.stop()

    assert reply.kind is ReplyKind.ANSWER and reply.image is None
    assert [m.text for m in await harness.store.memories("telegram:alice")] == ["[좋아하는 음식: 떡볶이]"]


async def test_set_face_rejects_unknown_numbers(harness: Harness) -> None:
    with pytest.raises(ValueError, match="unknown face 5"):
        await harness.engine.set_face("telegram", "room", 5)

    await harness.engine.set_face("telegram", "room", 1277)
    reply = await harness.engine.reply(message("안녕"))
    assert reply.image is not None and reply.image.face == 1277


def _seed_summary(conversation_key: str) -> tuple:
    """A stored summary, so a test can see a failed summary reset it (SPEC E.3.3)."""
    from core.store import TurnRecord

    record = TurnRecord(
        platform="telegram",
        user_key="telegram:alice",
        conversation_key=conversation_key,
        prompt="p",
        final_input="p",
        answer="a",
        status="ok",
        used_memory=None,
        expression=None,
        scores=None,
        summary="이전 요약",
        timings={},
        created_at=0.0,
    )
    return record, None


def test_requests_carry_the_spec_settings() -> None:
    request: GenerationRequest = prompts.build_request(Task.EYES_MOUTH_POSE, "x (답변 시작)", num_samples=3)
    assert (request.max_new_tokens, request.temperature, request.num_samples) == (32, 1.5, 3)


# --------------------------------------------------------------------------------------------
# Admission, "working…", forwards, storing the turn with its event, the user's line for /face


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class RecordingAlarm:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def raise_alarm(self, text: str) -> None:
        self.texts.append(text)


class FlakyStore(InMemoryStore):
    """Fails the first `failures` commits as a locked or full database does, then works."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.attempts: list[float] = []

    async def commit_turn(self, turn: TurnRecord, new_memory: NewMemory | None) -> None:
        self.attempts.append(time.monotonic())
        if len(self.attempts) <= self.failures:
            raise sqlite3.OperationalError("database is locked")
        await super().commit_turn(turn, new_memory)


def recording_working(events: list[str], name: str) -> Working:
    @asynccontextmanager
    async def working() -> AsyncIterator[None]:
        events.append(f"{name} start")
        yield
        events.append(f"{name} stop")

    return working


async def wait_for_calls(harness: Harness) -> None:
    while not harness.generator.calls:
        await asyncio.sleep(0.01)


async def test_admit_refuses_a_flood_with_one_notice_until_admitted_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood costs one notice per window, not one per message, and never another user's turn."""
    clock = Clock()
    monkeypatch.setattr(engine_module, "RateLimiter", lambda per_minute: RateLimiter(per_minute, clock))
    harness = make_harness(options=EngineOptions(rate_limit_per_minute=2))
    try:
        admitted = [harness.engine.admit("telegram:alice") for _ in range(2)]
        refusals = [harness.engine.admit("telegram:alice") for _ in range(3)]
        other = harness.engine.admit("telegram:bob")
        clock.now = 60.0
        again = harness.engine.admit("telegram:alice")
        clock.now = 60.5
        harness.engine.admit("telegram:alice")
        second_flood = [harness.engine.admit("telegram:alice") for _ in range(2)]
    finally:
        await harness.worker.stop()

    assert admitted == [None, None] and other is None and again is None
    assert refusals[0] == Refused(notice=Reply(text=RATE_LIMIT_TEXT, kind=ReplyKind.NOTICE))
    assert refusals[1:] == [Refused(notice=None)] * 2, "told once, then silence"
    assert second_flood == [refusals[0], Refused(notice=None)], "after an admitted message, told again once"
    assert harness.generator.calls == [], "admission decides without touching a model"


async def test_working_is_shown_only_once_the_turn_starts() -> None:
    """Typing… for a message queued behind the user's earlier turn would be shown for nothing, per message."""
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release))
    events: list[str] = []
    try:
        first = asyncio.create_task(harness.engine.reply(message("하나"), recording_working(events, "first")))
        await wait_for_calls(harness)
        second = asyncio.create_task(harness.engine.reply(message("둘"), recording_working(events, "second")))
        other = asyncio.create_task(harness.engine.reply(message("셋", user="bob"), recording_working(events, "bob")))
        await asyncio.sleep(0.1)
        while_first_runs = list(events)
        release.set()
        replies = await asyncio.gather(first, second, other)
    finally:
        release.set()
        await harness.worker.stop()

    assert while_first_runs == ["first start", "bob start"], "another user's turn starts at once"
    assert events.index("first stop") < events.index("second start")
    assert sorted(events) == sorted(
        f"{name} {edge}" for name in ("first", "second", "bob") for edge in ("start", "stop")
    )
    assert all(reply.kind is ReplyKind.ANSWER for reply in replies)


async def test_a_forwarded_message_asks_for_no_memory_and_stores_none(harness: Harness) -> None:
    """Forwarded words are someone else's: "I love tteokbokki" forwarded is not the sender's taste."""
    forwarded = IncomingMessage(
        platform="telegram", user_id="alice", chat_id="room", text="나 떡볶이 좋아해", forwarded=True
    )

    reply = await harness.engine.reply(forwarded)

    assert reply.kind is ReplyKind.ANSWER
    assert harness.generator.requests_for(Task.MEMORY) == []
    assert harness.generator.requests_for(Task.OUTPUT_MESSAGE), "a forward is still answered"
    assert await harness.store.memories("telegram:alice") == []

    await harness.engine.reply(message("나 떡볶이 좋아해"))  # the same words, her own
    assert [m.text for m in await harness.store.memories("telegram:alice")] == ["[좋아하는 음식: 떡볶이]"]


async def test_a_store_failing_briefly_is_retried_with_backoff_and_the_turn_is_kept() -> None:
    """A database busy for a moment must cost neither the answer nor the turn's memory."""
    store = FlakyStore(failures=2)
    alarm = RecordingAlarm()
    harness = make_harness(store=store)
    engine = Engine(harness.worker, store, EngineOptions(commit_attempts=3), alarm=alarm)
    try:
        reply = await engine.reply(message("나 떡볶이 좋아해"))
    finally:
        await harness.worker.stop()

    assert reply.kind is ReplyKind.ANSWER
    assert len(store.attempts) == 3
    assert all(later - earlier >= 0.2 for earlier, later in itertools.pairwise(store.attempts)), "no backoff"
    assert [m.text for m in await store.memories("telegram:alice")] == ["[좋아하는 음식: 떡볶이]"]
    assert [turn.status for turn in await store.recent_turns("telegram:alice", 10)] == ["ok"]
    assert alarm.texts == []


async def test_a_store_that_keeps_failing_still_answers_and_raises_one_alarm() -> None:
    """The answer is computed: deliver it, and tell the operators, who alone can free the disk."""
    store = FlakyStore(failures=100)
    alarm = RecordingAlarm()
    harness = make_harness(store=store)
    engine = Engine(harness.worker, store, EngineOptions(commit_attempts=2), alarm=alarm)
    try:
        reply = await engine.reply(message("나 떡볶이 좋아해"))
    finally:
        await harness.worker.stop()

    assert reply.kind is ReplyKind.ANSWER and reply.text.startswith("그렇구나!")
    assert len(store.attempts) == 2, "exactly commit_attempts tries"
    assert alarm.texts == [STORE_FAILED_ALARM.format(error="database is locked")]
    assert await store.recent_turns(None, 10) == [] and await store.memories("telegram:alice") == []


async def test_the_turns_reply_is_kept_with_its_event() -> None:
    """After a crash between the turn and its delivery, a restart finds the answer, not the question."""
    harness = make_harness()
    await harness.store.receive_events(
        [InboxEvent(platform="telegram", event_id="42", user_key="telegram:alice", payload="{}", received_at=0.0)]
    )
    try:
        reply = await harness.engine.reply(
            IncomingMessage(platform="telegram", user_id="alice", chat_id="room", text="안녕", event_id="42")
        )
    finally:
        await harness.worker.stop()

    (pending,) = await harness.store.pending_events("telegram")
    assert pending.reply is not None
    assert (pending.reply.text, pending.reply.kind, pending.reply.image) == (reply.text, ReplyKind.ANSWER, reply.image)
    assert reply.image is not None


async def test_render_current_face_waits_in_the_users_line() -> None:
    """/face sent during a turn shows the face that turn leaves, not the one before it."""
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release))
    try:
        turn = asyncio.create_task(harness.engine.reply(message("안녕")))
        await wait_for_calls(harness)
        face = asyncio.create_task(harness.engine.render_current_face("telegram", "room", "telegram:alice"))
        await asyncio.sleep(0.1)
        waited = not face.done()
        release.set()
        reply, image = await turn, await face
    finally:
        release.set()
        await harness.worker.stop()

    assert waited
    assert reply.scores is not None and reply.image is not None
    assert [request.scores for request in harness.renderer.requests] == [reply.scores, reply.scores]
    assert image.face == reply.image.face
    assert harness.engine.pending_turns == 0


async def test_move_chat_takes_the_summary_and_the_face(harness: Harness) -> None:
    """A Telegram group that became a supergroup goes on with the same summary and face."""
    await harness.engine.set_face("telegram", "-100", 931)
    await harness.engine.reply(message("오늘 정말 피곤했어", chat="-100"))
    summary = await harness.store.summary("telegram:-100:alice")

    await harness.engine.move_chat("telegram", "-100", "-1009")
    reply = await harness.engine.reply(message("위로해 줘", chat="-1009"))

    assert summary and await harness.store.summary("telegram:-100:alice") == ""
    assert answer_prompts(harness)[1] == f"(오로라 답변 요약) {summary} (사용자 질문) 위로해 줘 (답변 시작)"
    assert reply.image is not None and reply.image.face == 931


# --------------------------------------------------------------------------------------------
# Forgetting a user runs in the user's line (issue 13)

ALICE_KEY = "telegram:alice"
NOTHING = Footprint(memories=0, summaries=0, turns=0, expression=False)


@pytest.fixture(params=["in_memory", "sqlite"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        async with await SqliteStore.open(tmp_path / "ohlora.sqlite3") as store:
            yield store
    else:
        yield InMemoryStore()


async def until_called(harness: Harness, calls: int) -> None:
    while len(harness.generator.calls) <= calls:
        await asyncio.sleep(0.01)


async def test_a_forget_waits_for_the_turn_in_flight_and_nothing_is_written_back(any_store: Store) -> None:
    """The issue's race: `/forget` confirmed while her turn is inside the model. The turn commits first
    and is forgotten with the rest; the memory and summary it computed never come back afterwards."""
    release = threading.Event()
    release.set()
    harness = make_harness(store=any_store, generator=FakeGenerator(release=release))
    try:
        await harness.engine.reply(message("오늘 정말 피곤했어"))  # a summary and a face from before
        release.clear()
        calls = len(harness.generator.calls)
        in_flight = asyncio.create_task(harness.engine.reply(message("나 떡볶이 좋아해")))
        await until_called(harness, calls)
        forget = asyncio.create_task(harness.engine.forget_user(ALICE_KEY))
        await asyncio.sleep(0.1)
        forget_waited = not forget.done()
        release.set()
        held, gone = await asyncio.gather(in_flight, forget)
        after_forget = await harness.store.footprint(ALICE_KEY)
        fresh = await harness.engine.reply(message("내가 좋아하는 음식 알아?"))
    finally:
        release.set()
        await harness.worker.stop()

    assert forget_waited, "the forget ran while her turn was still being computed"
    assert held.kind is ReplyKind.ANSWER and held.text.startswith("그렇구나!"), "the turn itself is still answered"
    assert gone == Footprint(memories=1, summaries=1, turns=2, expression=True), "the turn in flight went too"
    assert after_forget == NOTHING, "something was written back after the forget"
    assert fresh.used_memory is None
    assert answer_prompts(harness)[-1] == "내가 좋아하는 음식 알아? (답변 시작)", "no old memory or summary"
    logged = await harness.store.recent_turns(None, 10)
    assert len(logged) == 3
    assert all("피곤" not in f"{row.prompt}{row.final_input}{row.answer}" for row in logged)
    assert all("떡볶이" not in f"{row.prompt}{row.final_input}{row.answer}{row.used_memory}" for row in logged)


async def test_a_message_sent_after_the_forget_waits_behind_it() -> None:
    """Her line is kept in order: a message written after `/forget` must not see what was forgotten,
    and what it tells her is kept."""
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release))
    try:
        in_flight = asyncio.create_task(harness.engine.reply(message("나 떡볶이 좋아해")))
        await until_called(harness, 0)
        forget = asyncio.create_task(harness.engine.forget_user(ALICE_KEY))
        later = asyncio.create_task(harness.engine.reply(message("내가 좋아하는 음식 알아? 떡볶이 맞지")))
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.gather(in_flight, forget)
        reply = await later
    finally:
        release.set()
        await harness.worker.stop()

    assert reply.used_memory is None
    assert answer_prompts(harness)[-1] == "내가 좋아하는 음식 알아? 떡볶이 맞지 (답변 시작)"
    assert [m.text for m in await harness.store.memories(ALICE_KEY)] == ["[좋아하는 음식: 떡볶이]"], "its own memory"
    assert [row.prompt for row in await harness.store.recent_turns(ALICE_KEY, 10)] == [
        "내가 좋아하는 음식 알아? 떡볶이 맞지"
    ]


async def test_forgetting_one_user_neither_waits_for_nor_touches_another_users_turn(any_store: Store) -> None:
    """The lock is per user: Bob's turn in the model does not hold up Alice's forget, and commits as usual."""
    release = threading.Event()
    release.set()
    harness = make_harness(store=any_store, generator=FakeGenerator(release=release))
    try:
        await harness.engine.reply(message("나 떡볶이 좋아해"))
        release.clear()
        calls = len(harness.generator.calls)
        bobs = asyncio.create_task(harness.engine.reply(message("나 떡볶이 좋아해", user="bob")))
        await until_called(harness, calls)
        gone = await asyncio.wait_for(harness.engine.forget_user(ALICE_KEY), timeout=2)
        bob_still_running = not bobs.done()
        release.set()
        bob_reply = await bobs
    finally:
        release.set()
        await harness.worker.stop()

    assert bob_still_running, "the forget did not have to wait for Bob"
    assert gone == Footprint(memories=1, summaries=1, turns=1, expression=True)
    assert await harness.store.footprint(ALICE_KEY) == NOTHING
    assert bob_reply.kind is ReplyKind.ANSWER
    assert [m.text for m in await harness.store.memories("telegram:bob")] == ["[좋아하는 음식: 떡볶이]"]
    assert await harness.store.footprint("telegram:bob") == Footprint(memories=1, summaries=1, turns=1, expression=True)
    assert harness.engine.pending_turns == 0 and harness.engine.users_in_flight == 0


async def test_a_forget_cancelled_while_it_waits_changes_nothing_and_leaves_no_trace() -> None:
    """A shutdown or a timed-out interaction can cancel a forget still waiting in line: nothing is
    deleted, the busy count and the user's lock are given back, and no store call is left unawaited."""
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release))
    try:
        in_flight = asyncio.create_task(harness.engine.reply(message("나 떡볶이 좋아해")))
        await until_called(harness, 0)
        for forget in (harness.engine.forget_user(ALICE_KEY), harness.engine.forget_memory(ALICE_KEY, "좋아하는 음식")):
            waiting = asyncio.create_task(forget)
            await asyncio.sleep(0.02)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        release.set()
        await in_flight
    finally:
        release.set()
        await harness.worker.stop()

    assert [m.text for m in await harness.store.memories(ALICE_KEY)] == ["[좋아하는 음식: 떡볶이]"]
    assert harness.engine.pending_turns == 0 and harness.engine.users_in_flight == 0
