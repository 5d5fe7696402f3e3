"""What goes out on Discord when Discord refuses part of it, and what comes in besides plain text.

Sends are refused or dropped by `SentRecorder` faults in front of dpytest; messages with
attachments, stickers and forwards are built by `post`. The engine runs over the fake models.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import discord
import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend

from bot.alerts import AdminAlerts
from bot.commands import BLOCKED_TEXT, TEXT_ONLY_TEXT, Commands
from bot.discord_bot import DiscordAdapter
from bot.discord_rules import nonce_for
from bot.inbox import Inbox
from core.config import Settings
from core.engine import ERROR_TEXT
from core.types import Task
from tests.discord_harness import PNG_SIGNATURE, SETTLE_TIMEOUT_S, Sent, SentRecorder, http_error, post
from tests.fakes import END, Harness, make_harness

ADMIN_ALARM = "⚠️ 디스크가 가득 찼어요"
ADMINS = (600000000000000011, 600000000000000012, 600000000000000013)


@dataclass
class World:
    harness: Harness
    adapter: DiscordAdapter
    recorder: SentRecorder
    channel: discord.TextChannel
    alice: discord.Member
    bob: discord.Member

    @property
    def mention(self) -> str:
        assert self.adapter.client.user is not None
        return f"<@{self.adapter.client.user.id}>"

    async def dm(self) -> discord.DMChannel:
        return await self.alice.create_dm()


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.chdir(tmp_path)  # dpytest writes every file the bot sends into the working directory
    harness = make_harness()
    adapter = DiscordAdapter(
        Commands(harness.engine, harness.store, admin_ids=frozenset(), model_profile="fake"),
        Settings(_env_file=None),  # type: ignore[call-arg]
        inbox=Inbox(harness.store, "discord"),
        intents=discord.Intents.all(),
    )
    dpytest.configure(adapter.client, text_channels=1, voice_channels=0, members=2)
    await adapter.client._async_setup_hook()
    config = dpytest.get_config()
    (channel,), (alice, bob) = config.channels, config.members
    assert isinstance(channel, discord.TextChannel)
    try:
        yield World(harness, adapter, SentRecorder(adapter.client), channel, alice, bob)
    finally:
        await harness.worker.stop()
        await asyncio.wait_for(dpytest.empty_queue(), timeout=SETTLE_TIMEOUT_S)


def with_file(sent: Sent) -> bool:
    return bool(sent.files)


def anything(sent: Sent) -> bool:
    return True


# --------------------------------------------------------------------------------------------
# Delivery


async def test_a_face_discord_will_not_take_costs_the_picture_not_the_answer(world: World) -> None:
    world.recorder.fail(with_file, http_error(413, 40005, "Request entity too large"))
    message = await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice)

    (refused,) = world.recorder.refused
    assert refused.files and refused.content == "그렇구나! 안녕 얘기 더 해 줘."
    (sent,) = world.recorder.take()
    assert (sent.content, sent.reference_id, sent.files) == (refused.content, message.id, ())
    assert sent.nonce == refused.nonce == nonce_for(message.id, 0)


async def test_an_answer_discord_refuses_altogether_is_logged_and_never_becomes_an_apology(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    world.recorder.fail(anything, http_error(500, 0, "Internal Server Error"), times=None)
    with caplog.at_level(logging.WARNING, logger="bot"):
        message = await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice)

    assert [(s.files != (), s.content) for s in world.recorder.refused] == [
        (True, "그렇구나! 안녕 얘기 더 해 줘."),
        (False, "그렇구나! 안녕 얘기 더 해 줘."),
    ]
    assert world.recorder.take() == []
    assert all(ERROR_TEXT not in (s.content or "") for s in world.recorder.refused)
    assert any(f"answer to message {message.id} did not go out" in r.getMessage() for r in caplog.records)


async def test_no_permission_to_write_is_logged_once_per_channel_and_not_retried(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    long_answer = " " + "가" * 1500 + " " + "나" * 1000 + END  # two parts: the second is never tried
    world.harness.generator.scripts[Task.OUTPUT_MESSAGE] = lambda request: long_answer
    world.recorder.fail(anything, http_error(403, 50013, "Missing Permissions"), times=None)
    with caplog.at_level(logging.WARNING, logger="bot"):
        await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice)
        await post(f"{world.mention} 또 안녕", channel=world.channel, author=world.bob)

    # Each answer: the face refused, the text alone refused, nothing more.
    assert [(s.files != (), s.content == "가" * 1500) for s in world.recorder.refused] == [
        (True, True),
        (False, True),
    ] * 2
    warnings = [r.getMessage() for r in caplog.records if "no permission to write" in r.getMessage()]
    assert len(warnings) == 1 and str(world.channel.id) in warnings[0]


async def test_a_dropped_connection_is_retried_with_the_same_nonce(world: World) -> None:
    world.recorder.fail(anything, aiohttp.ServerDisconnectedError())
    message = await post(f"{world.mention} 안녕", channel=world.channel, author=world.alice)

    (dropped,) = world.recorder.refused
    (sent,) = world.recorder.take()
    assert dropped.nonce == sent.nonce == nonce_for(message.id, 0)
    assert sent.files and sent.files[0][1].startswith(PNG_SIGNATURE)


async def test_a_typing_indicator_that_fails_costs_nothing_but_the_dots(world: World) -> None:
    world.recorder.typing_fault = http_error(403, 50013, "Missing Permissions")
    await post("안녕", channel=await world.dm(), author=world.alice._user)

    (sent,) = world.recorder.take()
    assert (sent.content or "").startswith("그렇구나!") and "typing" not in world.recorder.events


# --------------------------------------------------------------------------------------------
# Attachments, stickers and forwards


async def test_a_picture_alone_in_a_dm_gets_the_text_only_notice_without_the_model(world: World) -> None:
    message = await post("", channel=await world.dm(), author=world.alice._user, files=["사진.png"])

    (sent,) = world.recorder.take()
    assert (sent.content, sent.reference_id, sent.files) == (TEXT_ONLY_TEXT, message.id, ())
    assert world.harness.generator.calls == [] and "typing" not in world.recorder.events


async def test_a_sticker_alone_said_to_her_in_a_server_gets_the_text_only_notice(world: World) -> None:
    await post(world.mention, channel=world.channel, author=world.alice, stickers=["하트"])
    hers = await world.channel.send("나 여기 있어!")
    world.recorder.take()
    await post("", channel=world.channel, author=world.bob, reply_to=hers, files=["그림.gif"])

    assert [sent.content for sent in world.recorder.take()] == [TEXT_ONLY_TEXT]
    assert world.harness.generator.calls == []


async def test_pictures_in_an_allowed_channel_that_nobody_said_to_her_are_left_alone(world: World) -> None:
    await world.harness.store.set_channel_allowed("discord", str(world.channel.id), True)
    await post("", channel=world.channel, author=world.alice, files=["사진.png"])
    await post("", channel=world.channel, author=world.alice, stickers=["하트"])
    assert world.recorder.take() == [] and world.recorder.events == []

    await post("이 사진 어때?", channel=world.channel, author=world.alice, files=["사진.png"])
    (sent,) = world.recorder.take()
    assert sent.content == "그렇구나! 이 사진 어때? 얘기 더 해 줘."


async def test_a_blocked_user_sending_pictures_is_told_once_like_for_words(world: World) -> None:
    await world.harness.store.set_blocked(f"discord:{world.alice.id}", True)
    dm = await world.dm()
    for _ in range(3):
        await post("", channel=dm, author=world.alice._user, files=["사진.png"])

    assert [sent.content for sent in world.recorder.take()] == [BLOCKED_TEXT]


async def test_a_forward_is_answered_on_its_words_which_never_become_the_senders_memory(world: World) -> None:
    store, generator = world.harness.store, world.harness.generator
    alice = f"discord:{world.alice.id}"
    dm = await world.dm()
    forward = await post("나 떡볶이 좋아해", channel=dm, author=world.alice._user, forward=True)

    (sent,) = world.recorder.take()
    assert sent.reference_id == forward.id and sent.content == "그렇구나! 나 떡볶이 좋아해 얘기 더 해 줘."
    assert generator.requests_for(Task.MEMORY) == []
    assert await store.memories(alice) == []

    await post("나 떡볶이 좋아해", channel=dm, author=world.alice._user)  # her own words do
    assert len(generator.requests_for(Task.MEMORY)) == 1
    assert [memory.text for memory in await store.memories(alice)] == ["[좋아하는 음식: 떡볶이]"]


async def test_a_forwarded_picture_gets_the_text_only_notice(world: World) -> None:
    await post("", channel=await world.dm(), author=world.alice._user, files=["사진.png"], forward=True)

    assert [sent.content for sent in world.recorder.take()] == [TEXT_ONLY_TEXT]


# --------------------------------------------------------------------------------------------
# Admin alerts


async def test_an_alarm_reaches_every_discord_admin_by_dm_even_when_one_cannot_be_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    harness = make_harness()
    alerts = AdminAlerts()
    admin_ids = frozenset({*(f"discord:{admin}" for admin in ADMINS), "telegram:777"})
    adapter = DiscordAdapter(
        Commands(harness.engine, harness.store, admin_ids=admin_ids, model_profile="fake"),
        Settings(_env_file=None, admin_ids=admin_ids),  # type: ignore[call-arg]
        inbox=Inbox(harness.store, "discord"),
        alerts=alerts,
        intents=discord.Intents.all(),
    )
    client = adapter.client
    try:
        dpytest.configure(client, voice_channels=0, members=0)
        (guild,) = dpytest.get_config().guilds
        admins = [
            backend.make_member(backend.make_user(f"관리자{n}", n + 1, id_num=admin), guild)
            for n, admin in enumerate(ADMINS)
        ]
        await client._async_setup_hook()
        recorder = SentRecorder(client)
        dms = [await admin.create_dm() for admin in admins]
        recorder.fail(
            lambda sent: sent.channel_id == dms[1].id, http_error(403, 50007, "Cannot send messages to this user")
        )
        with caplog.at_level(logging.WARNING, logger="bot"):
            await alerts.raise_alarm(ADMIN_ALARM)
    finally:
        await harness.worker.stop()
        await asyncio.wait_for(dpytest.empty_queue(), timeout=SETTLE_TIMEOUT_S)

    assert [(s.channel_id, s.content) for s in recorder.take()] == [(dms[0].id, ADMIN_ALARM), (dms[2].id, ADMIN_ALARM)]
    assert [s.channel_id for s in recorder.refused] == [dms[1].id]
    assert any(f"could not tell admin {ADMINS[1]}" in r.getMessage() for r in caplog.records)
