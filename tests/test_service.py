"""`serve()`: every configured adapter in one loop, stopped by an event or a signal, store intact.

The signal tests send SIGINT/SIGTERM to this very process while `serve()` runs: the service's
handlers on the running loop must catch them (each test first checks that one is installed, so a
regression fails the test instead of killing pytest). One more runs the service as its own
process, as `ohlora bot` does but over the fake models, and checks its exit code.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from bot.alerts import AdminAlerts
from bot.commands import Commands
from bot.inbox import Inbox
from bot.service import MissingTokens, serve
from core.config import Settings
from core.store import SqliteStore, TurnRecord
from tests.conftest import REPO_ROOT
from tests.fake_telegram_api import FakeBotApi, user
from tests.fakes import FakeGenerator, Harness, make_harness

ALICE = user(1001, "앨리스")


@pytest.fixture
def api() -> Iterator[FakeBotApi]:
    with FakeBotApi() as server:
        yield server


@dataclass
class Service:
    api: FakeBotApi
    harness: Harness
    db_path: Path
    stop: asyncio.Event
    task: asyncio.Task[None] | None = None

    def run(self, settings: Settings, **options: Any) -> None:
        self.task = asyncio.create_task(
            serve(self.harness.engine, self.harness.store, settings, stop=self.stop, **options)
        )

    async def polling(self) -> None:
        await self.api.wait_until(lambda api: bool(api.calls("getUpdates")), "the bot to poll")

    async def finished(self) -> None:
        assert self.task is not None
        await asyncio.wait_for(self.task, timeout=30)

    async def reopened_store(self) -> SqliteStore:
        """The database file as the next start of the service would find it."""
        await self.harness.worker.stop()
        await self.harness.store.close()
        return await SqliteStore.open(self.db_path)


@pytest.fixture
async def service(api: FakeBotApi, tmp_path: Path) -> AsyncIterator[Service]:
    db_path = tmp_path / "ohlora.sqlite3"
    store = await SqliteStore.open(db_path)
    generator = FakeGenerator()
    running = Service(api, make_harness(store=store, generator=generator), db_path, asyncio.Event())
    yield running
    if generator.release is not None:
        generator.release.set()
    if running.task is not None and not running.task.done():
        running.stop.set()
        await asyncio.wait_for(running.task, timeout=30)
    await running.harness.worker.stop()
    await store.close()


def telegram_settings(api: FakeBotApi, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "telegram_token": SecretStr(api.token),
        "telegram_api_base_url": api.base_url,
        "discord_token": None,
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


async def test_without_tokens_serve_says_what_to_set(service: Service) -> None:
    settings = Settings(_env_file=None, telegram_token=None, discord_token=None)  # type: ignore[call-arg]
    with pytest.raises(MissingTokens) as raised:
        await serve(service.harness.engine, service.harness.store, settings)
    for needed in ("DISCORD_TOKEN", "TELEGRAM_TOKEN", ".env"):
        assert needed in MissingTokens.MESSAGE
    assert str(raised.value) == MissingTokens.MESSAGE


async def test_serve_answers_telegram_and_stops_on_the_event(service: Service) -> None:
    handlers_before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    service.run(telegram_settings(service.api))
    await service.polling()
    service.api.send_message(ALICE, "나는 떡볶이 좋아해")
    (photo,) = await service.api.wait_for_calls("sendPhoto", chat_id=1001)

    service.stop.set()
    await service.finished()

    polls = len(service.api.calls("getUpdates"))
    service.api.send_message(ALICE, "아직 있어?")
    await asyncio.sleep(0.2)
    assert len(service.api.calls("getUpdates")) == polls, "the bot kept polling after serve returned"
    assert {number: signal.getsignal(number) for number in handlers_before} == handlers_before
    store = await service.reopened_store()
    try:
        assert [memory.text for memory in await store.memories("telegram:1001")] == ["[좋아하는 음식: 떡볶이]"]
        assert (await store.stats()).turns_total == 1
    finally:
        await store.close()


async def test_serve_prunes_the_turn_log_past_its_retention(service: Service) -> None:
    """What the turn log keeps is bounded while the service runs, not only when someone remembers."""
    store = service.harness.store
    now = time.time()
    for days_old in (40, 35, 1):
        turn = TurnRecord(
            platform="telegram",
            user_key="telegram:1001",
            conversation_key="telegram:1001:1001",
            prompt=f"{days_old}일 전 이야기",
            final_input="",
            answer="",
            status="ok",
            used_memory=None,
            expression=None,
            scores=None,
            summary=None,
            timings={"total": 1.0},
            created_at=now - days_old * 24 * 3600,
        )
        await store.commit_turn(turn, None)
    service.run(telegram_settings(service.api, turn_log_days=30))
    await service.polling()
    deadline = time.monotonic() + 10
    while len(await store.recent_turns(None, 10)) > 1:
        assert time.monotonic() < deadline, "the old turns were not pruned"
        await asyncio.sleep(0.01)
    assert [row.prompt for row in await store.recent_turns(None, 10)] == ["1일 전 이야기"]


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
async def test_a_signal_stops_serve_after_the_turn_in_flight(service: Service, number: signal.Signals) -> None:
    generator = service.harness.generator
    generator.release = threading.Event()
    handler_before = signal.getsignal(number)
    service.run(telegram_settings(service.api))
    await service.polling()
    service.api.send_message(ALICE, "나는 떡볶이 좋아해")
    await service.api.wait_until(lambda _: bool(generator.calls), "the turn to reach the model")

    assert signal.getsignal(number) is not handler_before, f"serve() installed no {number.name} handler"
    os.kill(os.getpid(), number)
    await service.api.wait_until(lambda _: service.stop.is_set(), f"{number.name} to request the stop")
    generator.release.set()
    await service.finished()

    assert service.api.calls("sendPhoto", chat_id=1001), "the turn in flight was not answered"
    store = await service.reopened_store()
    try:
        assert len(await store.memories("telegram:1001")) == 1
        assert (await store.stats()).turns_total == 1
    finally:
        await store.close()


async def test_a_turn_past_the_grace_period_is_cancelled_and_the_store_stays_intact(service: Service) -> None:
    generator = service.harness.generator
    service.run(telegram_settings(service.api), shutdown_grace_s=0.05)
    await service.polling()
    service.api.send_message(ALICE, "나는 떡볶이 좋아해")
    await service.api.wait_for_calls("sendPhoto", chat_id=1001)

    generator.release = threading.Event()
    calls_before = len(generator.calls)
    service.api.send_message(ALICE, "내 취미는 축구야")
    await service.api.wait_until(lambda _: len(generator.calls) > calls_before, "the second turn to start")
    service.stop.set()
    await service.finished()
    generator.release.set()

    assert len(service.api.calls("sendPhoto", chat_id=1001)) == 1
    store = await service.reopened_store()
    try:
        assert [memory.text for memory in await store.memories("telegram:1001")] == ["[좋아하는 음식: 떡볶이]"]
        assert (await store.stats()).turns_total == 1
    finally:
        await store.close()


class FakeDiscordAdapter:
    instances: list[FakeDiscordAdapter] = []

    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        *,
        inbox: Inbox,
        alerts: AdminAlerts,
        shutdown_grace_s: float,
        sync_guild_id: int | None,
    ) -> None:
        self.commands = commands
        self.inbox = inbox
        self.shutdown_grace_s = shutdown_grace_s
        self.events: list[str] = []
        FakeDiscordAdapter.instances.append(self)

    async def start(self) -> None:
        self.events.append("start")

    async def close(self) -> None:
        self.events.append("close")


async def test_both_platforms_run_in_one_loop(service: Service, monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("bot.discord_bot")
    module.DiscordAdapter = FakeDiscordAdapter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bot.discord_bot", module)
    FakeDiscordAdapter.instances.clear()

    service.run(telegram_settings(service.api, discord_token=SecretStr("discord-token")), shutdown_grace_s=3.0)
    await service.polling()
    service.api.send_message(ALICE, "안녕")
    await service.api.wait_for_calls("sendPhoto", chat_id=1001)
    service.stop.set()
    await service.finished()

    (discord,) = FakeDiscordAdapter.instances
    assert discord.events == ["start", "close"]
    assert isinstance(discord.commands, Commands)
    assert discord.shutdown_grace_s == 3.0


SERVICE_PROCESS = """
import asyncio, sys
from bot.service import serve
from core.config import Settings
from core.store import SqliteStore
from tests.fakes import make_harness

async def main() -> int:
    settings = Settings(_env_file=None)
    store = await SqliteStore.open(settings.db_path)
    harness = make_harness(store=store)
    try:
        await serve(harness.engine, store, settings)
        return 0
    finally:
        await harness.worker.stop()
        await store.close()

sys.exit(asyncio.run(main()))
"""
"""The composition root of `ohlora bot` with the fake models in place of the loaded ones."""


@pytest.mark.parametrize("number", [signal.SIGTERM, signal.SIGINT])
async def test_the_service_process_exits_0_on_a_signal(api: FakeBotApi, tmp_path: Path, number: signal.Signals) -> None:
    db_path = tmp_path / "ohlora.sqlite3"
    env = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"}
    env.update(
        TELEGRAM_TOKEN=api.token,
        TELEGRAM_API_BASE_URL=api.base_url,
        OHLORA_DB_PATH=str(db_path),
        PYTHONPATH=str(REPO_ROOT),
    )
    child = subprocess.Popen([sys.executable, "-c", SERVICE_PROCESS], cwd=REPO_ROOT, env=env)
    try:
        await api.wait_until(lambda api: bool(api.calls("getUpdates")), "the service to poll", timeout_s=60)
        api.send_message(ALICE, "나는 떡볶이 좋아해")
        await api.wait_for_calls("sendPhoto", chat_id=1001)
        child.send_signal(number)
        exit_code = await asyncio.to_thread(child.wait, 30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()

    assert exit_code == 0
    with closing(sqlite3.connect(db_path)) as database:
        assert database.execute("SELECT text FROM memories").fetchall() == [("[좋아하는 음식: 떡볶이]",)]
