"""The Discord inbox: a message is answered once, across gateway replays, shutdowns and restarts.

Messages arrive through dpytest and the store is the real SQLite one. A restart is a second
adapter, engine and model over the same database file, handed the same fake Discord
(`hand_over`) and then its first READY.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import discord
import discord.ext.test as dpytest
import pytest

from bot.commands import Commands
from bot.discord_bot import DiscordAdapter, OhloraClient
from bot.discord_rules import nonce_for
from bot.inbox import RESTARTED_TEXT, Inbox
from core.config import Settings
from core.store import InboxEvent, InMemoryStore, PendingEvent, SqliteStore, Store
from core.types import Task
from tests.discord_harness import (
    PNG_SIGNATURE,
    SETTLE_TIMEOUT_S,
    SentRecorder,
    delete,
    hand_over,
    post,
    ready,
    settle,
)
from tests.fakes import FakeGenerator, Harness, make_harness

WAIT_S = 10.0


@dataclass
class Process:
    """One run of the bot: its engine over fake models, and its Discord adapter."""

    harness: Harness
    adapter: DiscordAdapter

    @property
    def client(self) -> OhloraClient:
        return self.adapter.client

    @property
    def generator(self) -> FakeGenerator:
        return self.harness.generator


def start_process(store: Store, *, inbox: Inbox | None = None) -> Process:
    harness = make_harness(store=store)
    commands = Commands(harness.engine, store, admin_ids=frozenset(), model_profile="fake")
    adapter = DiscordAdapter(
        commands,
        Settings(_env_file=None),  # type: ignore[call-arg]
        inbox=inbox or Inbox(store, "discord"),
        intents=discord.Intents.all(),
    )
    return Process(harness, adapter)


@dataclass
class World:
    store: SqliteStore
    first: Process
    recorder: SentRecorder
    channel: discord.TextChannel
    alice: discord.Member
    processes: list[Process]

    @property
    def mention(self) -> str:
        assert self.first.client.user is not None
        return f"<@{self.first.client.user.id}>"

    async def restart(self, *, inbox: Inbox | None = None) -> Process:
        """A new process over the same database; it gets the same Discord, then its first READY."""
        process = start_process(self.store, inbox=inbox)
        self.processes.append(process)
        await hand_over(self.first.client, process.client)
        await ready(process.client)
        return process


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.chdir(tmp_path)  # dpytest writes every file the bot sends into the working directory
    store = await SqliteStore.open(tmp_path / "ohlora.sqlite3")
    first = start_process(store)
    dpytest.configure(first.client, text_channels=1, voice_channels=0, members=1)
    await first.client._async_setup_hook()
    config = dpytest.get_config()
    (channel,), (alice,) = config.channels, config.members
    assert isinstance(channel, discord.TextChannel) and isinstance(alice, discord.Member)
    built = World(store, first, SentRecorder(first.client), channel, alice, [first])
    try:
        yield built
    finally:
        for process in built.processes:
            if process.generator.release is not None:
                process.generator.release.set()
            await process.harness.worker.stop()
        await asyncio.wait_for(dpytest.empty_queue(), timeout=SETTLE_TIMEOUT_S)
        await store.close()


async def until(condition: Callable[[], object | Awaitable[object]], what: str) -> None:
    """Wait (bounded) for `condition()`, sync or async, to hold."""
    deadline = time.monotonic() + WAIT_S
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def pending(store: Store) -> list[PendingEvent]:
    return await store.pending_events("discord")


async def shut_down(process: Process) -> None:
    """What `DiscordAdapter.close` does before it disconnects (which dpytest's fake socket cannot):
    the turns in flight get the grace period, then are cancelled."""
    await process.client.finish_turns(grace_s=0.05)


async def stopped_mid_turn(world: World) -> discord.Message:
    """A mention whose turn is still with the model when the bot shuts down."""
    generator = world.first.generator
    generator.release = threading.Event()
    message = await post(f"{world.mention} 안녕 오로라", channel=world.channel, author=world.alice, wait=False)
    await until(lambda: generator.calls, "the model to be asked")
    await shut_down(world.first)
    generator.release.set()
    return message


def asked(generator: FakeGenerator) -> list[str]:
    """The last word the user said in each answer the model was asked for, in order."""
    return [r.prompt.removesuffix(" (답변 시작)").split()[-1] for r in generator.requests_for(Task.OUTPUT_MESSAGE)]


def answers(sent: Sequence[object]) -> list[str]:
    return [getattr(item, "content", None) or "" for item in sent]


# --------------------------------------------------------------------------------------------


async def test_a_message_the_gateway_delivers_twice_is_answered_once(world: World) -> None:
    first = await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice)
    await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice, message_id=first.id)

    (sent,) = world.recorder.take()
    assert sent.reference_id == first.id
    assert len(world.first.generator.requests_for(Task.OUTPUT_MESSAGE)) == 1
    assert await pending(world.store) == []


async def test_a_turn_cancelled_at_shutdown_is_answered_exactly_once_by_the_next_start(world: World) -> None:
    message = await stopped_mid_turn(world)
    assert world.recorder.take() == []
    (left,) = await pending(world.store)
    assert left.event.event_id == str(message.id) and left.reply is None

    second = await world.restart()
    (sent,) = world.recorder.take()
    assert sent.reference_id == message.id and (sent.content or "").startswith("그렇구나!")
    assert sent.files and sent.files[0][1].startswith(PNG_SIGNATURE)
    assert [r.prompt for r in second.generator.requests_for(Task.OUTPUT_MESSAGE)] == ["안녕 오로라 (답변 시작)"]
    assert await pending(world.store) == []

    await ready(second.client)  # a resume: READY again, nothing left to do
    await post(f"{world.mention} 안녕 오로라", channel=world.channel, author=world.alice, message_id=message.id)
    assert world.recorder.take() == []
    assert len(second.generator.requests_for(Task.OUTPUT_MESSAGE)) == 1


async def test_a_resume_while_a_turn_runs_does_not_answer_that_message_again(world: World) -> None:
    """READY comes again on every resume; only the first one of a process finishes the inbox."""
    await ready(world.first.client)
    generator = world.first.generator
    generator.release = threading.Event()
    message = await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice, wait=False)
    await until(lambda: generator.calls, "the model to be asked")
    world.first.client.dispatch("ready")  # the gateway resumed while the turn runs
    await asyncio.sleep(0.05)
    generator.release.set()
    await settle()

    (sent,) = world.recorder.take()
    assert sent.reference_id == message.id
    assert len(generator.requests_for(Task.OUTPUT_MESSAGE)) == 1


async def test_a_reply_computed_but_not_delivered_is_delivered_by_the_next_start_without_the_model(
    world: World,
) -> None:
    world.recorder.paused = asyncio.Event()  # Discord stops answering sends
    message = await post(f"{world.mention} 떡볶이 좋아해?", channel=world.channel, author=world.alice, wait=False)
    await until(lambda: _answered(world.store), "the reply to be kept in the inbox")
    await shut_down(world.first)
    world.recorder.paused = None
    assert world.recorder.take() == []
    (kept,) = await pending(world.store)
    assert kept.reply is not None and kept.reply.image is not None

    second = await world.restart()
    (sent,) = world.recorder.take()
    assert (sent.reference_id, sent.content) == (message.id, kept.reply.text)
    assert sent.files[0][1] == kept.reply.image.data
    assert sent.nonce == nonce_for(message.id, 0)  # the nonce the first try used: Discord posts it once
    assert second.generator.calls == [] and second.harness.renderer.requests == []
    assert await pending(world.store) == []


async def _received(store: Store, message: discord.Message) -> bool:
    return any(event.event.event_id == str(message.id) for event in await pending(store))


async def _answered(store: Store) -> bool:
    return any(event.reply is not None for event in await pending(store))


async def test_a_message_left_too_long_gets_the_restarted_notice_instead_of_an_answer(world: World) -> None:
    message = await stopped_mid_turn(world)
    an_hour_later = Inbox(world.store, "discord", clock=lambda: time.time() + 3600)

    second = await world.restart(inbox=an_hour_later)
    (sent,) = world.recorder.take()
    assert (sent.reference_id, sent.content, sent.files) == (message.id, RESTARTED_TEXT, ())
    assert second.generator.calls == []
    assert await pending(world.store) == []


async def test_a_message_deleted_while_the_bot_was_down_is_only_finished(world: World) -> None:
    message = await stopped_mid_turn(world)
    delete(message)

    second = await world.restart()
    assert world.recorder.take() == []
    assert second.generator.calls == []
    assert await pending(world.store) == []


async def test_a_message_that_arrives_during_shutdown_is_kept_and_answered_by_the_next_start(world: World) -> None:
    generator = world.first.generator
    generator.release = threading.Event()
    await post(f"{world.mention} 첫째", channel=world.channel, author=world.alice, wait=False)
    await until(lambda: generator.calls, "the model to be asked")
    closing = asyncio.create_task(world.first.client.finish_turns(grace_s=WAIT_S))
    await asyncio.sleep(0)  # shutdown has begun
    late = await post(f"{world.mention} 둘째", channel=world.channel, author=world.alice, wait=False)
    await until(lambda: _received(world.store, late), "the late message to be kept in the inbox")
    generator.release.set()
    await asyncio.wait_for(closing, timeout=WAIT_S)
    assert answers(world.recorder.take()) == ["그렇구나! 첫째 얘기 더 해 줘."]

    second = await world.restart()
    (sent,) = world.recorder.take()
    assert sent.reference_id == late.id
    assert asked(second.generator) == ["둘째"]


async def test_a_users_messages_are_answered_in_the_order_they_arrived(world: World) -> None:
    """A plain message in an allowed channel, then a mention: each waits for the same store reads."""
    await world.store.set_channel_allowed("discord", str(world.channel.id), True)
    for text in ("하나", f"{world.mention} 둘", "셋", f"{world.mention} 넷"):
        await post(text, channel=world.channel, author=world.alice, wait=False)
    await settle()

    assert asked(world.first.generator) == ["하나", "둘", "셋", "넷"]
    assert [text.split()[1] for text in answers(world.recorder.take())] == ["하나", "둘", "셋", "넷"]


class UnwritableInbox(InMemoryStore):
    """A store whose inbox table cannot be written (a locked or full database)."""

    async def receive_events(self, events: Sequence[InboxEvent]) -> list[bool]:
        raise OSError("database or disk is full")


async def test_a_message_is_answered_even_when_the_inbox_cannot_be_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    process = start_process(UnwritableInbox())
    try:
        dpytest.configure(process.client, text_channels=1, voice_channels=0, members=1)
        await process.client._async_setup_hook()
        recorder = SentRecorder(process.client)
        dm = await dpytest.get_config().members[0].create_dm()
        with caplog.at_level(logging.ERROR, logger="bot"):
            await post("안녕", channel=dm, author=dpytest.get_config().members[0]._user)
    finally:
        await process.harness.worker.stop()
        await asyncio.wait_for(dpytest.empty_queue(), timeout=SETTLE_TIMEOUT_S)

    (sent,) = recorder.take()
    assert (sent.content or "").startswith("그렇구나!")
    assert any("could not write message" in record.getMessage() for record in caplog.records)
