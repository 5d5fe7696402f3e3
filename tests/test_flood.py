"""A flood: 50 Telegram users send 10 messages each, all at once, to `ohlora bot`.

The real service (`bot.service.serve`), the real Telegram adapter and python-telegram-bot's real
client talk to a local fake Bot API; behind them the real engine and worker run over fake models
that take a moment per call and echo the message number. The engine admits only a few turns at
a time, so much of the flood is told "busy". What must hold:

- every message gets exactly one reply: its answer, or the busy notice;
- a user's answers arrive in the order of the user's messages, and run in that order;
- nothing answered is lost: every answer is in the turn log, in order, and nothing else is;
- the queue stays bounded while it lasts (admitted turns, worker jobs, per-user locks), empties
  afterwards, leaves no task behind, and the process grows by no more than a loose bound.
"""

from __future__ import annotations

import asyncio
import random
import re
import resource
import statistics
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from pydantic import SecretStr

from bot.service import serve
from core.config import Settings
from core.engine import BUSY_TEXT, RATE_LIMIT_TEXT, EngineOptions
from core.store import SqliteStore
from core.types import GenerationRequest, IncomingMessage, ReplyKind, Task
from tests import fake_telegram_api
from tests.fake_telegram_api import ApiCall, FakeBotApi, Json, user
from tests.fakes import END, FakeGenerator, Harness, make_harness

MESSAGES_PER_USER = 10
RSS_GROWTH_LIMIT_BYTES = 128 * 2**20
"""Loose: the flood (500 updates, their replies, the fake server's records) needs a few megabytes;
a queue that held every message's work, or a cache that grew with each one, would need far more."""

NUMBER = re.compile(r"메시지 (\d+)번")


def numbered_answer(request: GenerationRequest) -> str:
    """Echo the number of the message being answered (the last one in the prompt: a summary of
    an earlier turn may mention an earlier number)."""
    number = NUMBER.findall(request.prompt)[-1]
    return f" {number}번 메시지 잘 받았어!{END}"


def answered_number(reply: ApiCall) -> int | None:
    """The message number an answer echoes; None for the busy notice."""
    if reply.method == "sendMessage" and reply.text == BUSY_TEXT:
        return None
    assert reply.method == "sendPhoto", reply
    match = re.fullmatch(r"(\d+)번 메시지 잘 받았어!", reply.text or "")
    assert match, reply.text
    return int(match.group(1))


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@dataclass
class Watch:
    """The highest queue depths seen while the flood lasts."""

    pending_turns: int = 0
    worker_jobs: int = 0
    user_locks: int = 0
    samples: int = 0
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, harness: Harness) -> None:
        engine, worker = harness.engine, harness.worker
        while not self.stop.is_set():
            self.pending_turns = max(self.pending_turns, engine.pending_turns)
            self.worker_jobs = max(self.worker_jobs, worker.pending())
            self.user_locks = max(self.user_locks, engine.users_in_flight)
            self.samples += 1
            await asyncio.sleep(0.005)


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBotApi]:
    # The flood opens many connections at once: http.server's backlog of 5 would reset some, and
    # without TCP_NODELAY every answer waits ~40 ms for a delayed ACK (headers and body are two writes).
    monkeypatch.setattr(ThreadingHTTPServer, "request_queue_size", 1024)
    monkeypatch.setattr(fake_telegram_api._Handler, "disable_nagle_algorithm", True)
    with FakeBotApi() as server:
        yield server


MakeHarness = Callable[[int], Harness]


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Callable[[int], Harness]]:
    """The engine over a SQLite file and fake models, admitting at most `max_pending_turns`."""
    stores: list[SqliteStore] = [await SqliteStore.open(tmp_path / "ohlora.sqlite3")]
    built: list[Harness] = []

    def build(max_pending_turns: int) -> Harness:
        harness = make_harness(
            store=stores[0],
            generator=FakeGenerator(scripts={Task.OUTPUT_MESSAGE: numbered_answer}, delay_s=0.003),
            options=EngineOptions(max_pending_turns=max_pending_turns),
        )
        built.append(harness)
        return harness

    yield build
    for harness in built:
        await harness.worker.stop()
    await stores[0].close()


@dataclass(frozen=True)
class Flood:
    """Replies per user (their chat id), and what the queue looked like while it lasted."""

    replies: dict[int, list[ApiCall]]
    watch: Watch


async def flood(api: FakeBotApi, harness: Harness, users: int, *, user_major: bool) -> Flood:
    """Every user's messages, all pushed at once, through `serve()`; returns once all are answered
    and the service has stopped."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_token=SecretStr(api.token),
        telegram_api_base_url=api.base_url,
        discord_token=None,
    )
    stop = asyncio.Event()
    service = asyncio.create_task(serve(harness.engine, harness.store, settings, stop=stop, shutdown_grace_s=10.0))
    watch = Watch()
    watching = asyncio.create_task(watch.run(harness))
    try:
        await api.wait_until(lambda api: bool(api.calls("getUpdates")), "the service to poll")
        senders = [user(number, f"사용자{number}") for number in range(1, users + 1)]
        pairs = [(sender, n) for n in range(MESSAGES_PER_USER) for sender in senders]
        if user_major:
            pairs.sort(key=lambda pair: pair[0]["id"])
        for sender, n in pairs:
            api.send_message(sender, f"메시지 {n}번")
        await api.wait_until(lambda api: len(api.sent()) >= len(pairs), "a reply to every message", timeout_s=120)
    finally:
        watch.stop.set()
        await watching
        stop.set()
        await asyncio.wait_for(service, timeout=30)
    return Flood({chat_id: api.sent(chat_id) for chat_id in range(1, users + 1)}, watch)


async def logged_prompts(harness: Harness, chat_id: int) -> list[str]:
    rows = list(reversed(await harness.store.recent_turns(f"telegram:{chat_id}", 1000)))
    assert {row.status for row in rows} <= {"ok"}
    return [row.prompt for row in rows]


async def test_a_users_messages_are_answered_in_the_order_they_were_sent(api: FakeBotApi, make: MakeHarness) -> None:
    """No busy here: every message is answered, so every answer must come in order.

    With updates handled concurrently, each message first awaits the "typing…" request and the
    blocked-user lookup; only then does it reach the engine's per-user lock, in whatever order
    those awaits finished.
    """
    users = 20
    harness = make(users * MESSAGES_PER_USER)
    result = await flood(api, harness, users, user_major=False)

    in_order = list(range(MESSAGES_PER_USER))
    answers = {chat_id: [answered_number(call) for call in calls] for chat_id, calls in result.replies.items()}
    assert {chat_id: numbers for chat_id, numbers in answers.items() if numbers != in_order} == {}
    for chat_id in answers:
        assert await logged_prompts(harness, chat_id) == [f"메시지 {n}번" for n in in_order]


@pytest.mark.slow
async def test_fifty_users_flooding_telegram_are_answered_or_told_busy_in_order(
    api: FakeBotApi, make: MakeHarness
) -> None:
    users, max_pending_turns = 50, 8
    harness = make(max_pending_turns)
    tasks_before = len(asyncio.all_tasks())
    rss_before = peak_rss_bytes()

    result = await flood(api, harness, users, user_major=True)

    answered: dict[int, list[int]] = {}
    for chat_id, calls in result.replies.items():
        replies = [answered_number(call) for call in calls]
        assert len(replies) == MESSAGES_PER_USER, f"user {chat_id} got {len(replies)} replies"
        answered[chat_id] = [number for number in replies if number is not None]
    total = sum(len(numbers) for numbers in answered.values())
    assert max_pending_turns <= total < users * MESSAGES_PER_USER, "the flood should get answers and busy notices"
    assert {chat_id: numbers for chat_id, numbers in answered.items() if numbers != sorted(numbers)} == {}
    for chat_id, numbers in answered.items():
        assert await logged_prompts(harness, chat_id) == [f"메시지 {n}번" for n in numbers], chat_id

    watch = result.watch
    assert watch.samples > 10
    assert watch.pending_turns <= max_pending_turns
    assert watch.user_locks <= max_pending_turns
    assert watch.worker_jobs <= max_pending_turns
    assert harness.engine.pending_turns == 0 and harness.worker.pending() == 0
    assert harness.engine.users_in_flight == 0
    assert len(asyncio.all_tasks()) == tasks_before
    assert peak_rss_bytes() - rss_before < RSS_GROWTH_LIMIT_BYTES


async def test_no_per_user_lock_outlives_its_turns(make: MakeHarness) -> None:
    """The engine's per-user locks are dropped when idle, or a long-running bot would keep one for
    every user it ever met."""
    harness = make(1000)

    async def session(user_id: int) -> list[ReplyKind]:
        kinds = []
        for n in range(3):
            message = IncomingMessage(platform="telegram", user_id=str(user_id), chat_id="group", text=f"메시지 {n}번")
            kinds.append((await harness.engine.reply(message)).kind)
        return kinds

    kinds = await asyncio.gather(*(session(user_id) for user_id in range(40)))

    assert all(kind is ReplyKind.ANSWER for per_user in kinds for kind in per_user)
    assert harness.engine.users_in_flight == 0


ONE_USER_FLOOD = 300
VICTIM_MESSAGES = 12
MODEL_CALL_S = 0.15
"""Long against the event loop's own work on a flood, short enough for a quick test: a turn is
two model calls, so a lone turn takes about 0.3 s."""


def answered_beyond(api: FakeBotApi, count: int) -> bool:
    return len(api.sent(2)) > count


async def victims_latency(api: FakeBotApi, harness: Harness, *, flooder: Json | None) -> list[float]:
    """Seconds from each of the victim's messages to its answer, sent one after another, with or
    without another user's flood arriving just before the first.

    A real user's messages are not timed to the flooder's turns: each waits a random moment after
    the last answer (seeded), or every message would land just as a flooder's model call begins.
    """
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_token=SecretStr(api.token),
        telegram_api_base_url=api.base_url,
        discord_token=None,
    )
    victim = user(2, "피해자")
    stop = asyncio.Event()
    service = asyncio.create_task(serve(harness.engine, harness.store, settings, stop=stop, shutdown_grace_s=10.0))
    latencies = []
    pauses = random.Random(7)
    try:
        await api.wait_until(lambda api: bool(api.calls("getUpdates")), "the service to poll")
        if flooder is not None:
            for n in range(ONE_USER_FLOOD):
                api.send_message(flooder, f"메시지 {n}번")
        for n in range(VICTIM_MESSAGES):
            await asyncio.sleep(pauses.uniform(0.0, 2 * MODEL_CALL_S))
            answered = len(api.sent(2))
            sent_at = time.monotonic()
            api.send_message(victim, f"메시지 {n}번")
            await api.wait_until(partial(answered_beyond, count=answered), "the victim's answer")
            latencies.append(api.sent(2)[-1].at - sent_at)
    finally:
        stop.set()
        await asyncio.wait_for(service, timeout=30)
    return latencies


@pytest.mark.slow
async def test_one_users_flood_barely_slows_another_users_turns(api: FakeBotApi, tmp_path: Path) -> None:
    """300 messages from one user: the rate limit turns all but a few away the moment they arrive,
    with one notice and no "typing…", so the other user's turns take at most 1.5x their idle time."""
    store = await SqliteStore.open(tmp_path / "ohlora.sqlite3")
    flooder = user(1, "도배꾼")

    def harness() -> Harness:
        generator = FakeGenerator(scripts={Task.OUTPUT_MESSAGE: numbered_answer}, delay_s=MODEL_CALL_S)
        return make_harness(store=store, generator=generator, options=EngineOptions(rate_limit_per_minute=12))

    idle_harness, flood_harness = harness(), harness()
    try:
        idle = await victims_latency(api, idle_harness, flooder=None)
        flooded = await victims_latency(api, flood_harness, flooder=flooder)
        unfinished = await store.pending_events("telegram")
    finally:
        await idle_harness.worker.stop()
        await flood_harness.worker.stop()
        await store.close()

    ratio = statistics.mean(flooded) / statistics.mean(idle)
    print(f"victim's turn: idle {statistics.mean(idle):.3f} s, during the flood {statistics.mean(flooded):.3f} s")
    assert ratio <= 1.5, (idle, flooded)
    to_flooder = api.calls("sendMessage", "sendPhoto", "sendChatAction", chat_id=1)
    photos = [call for call in to_flooder if call.method == "sendPhoto"]
    notices = [call for call in to_flooder if call.method == "sendMessage"]
    assert len(photos) <= 12 and [call.text for call in notices] == [RATE_LIMIT_TEXT]
    assert len(to_flooder) <= 3 * 12 + 1, "the turned-away messages cost no API calls"
    assert unfinished == []
