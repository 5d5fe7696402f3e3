"""The command layer every adapter shares: blocks decided at once, the two kinds of power, /face metered.

Adapters only translate; who may do what is decided here, so it is tested here once, over fakes,
for every platform.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bot.commands import BLOCKED_TEXT, NOT_ADMIN_TEXT, Caller, CommandResult, Commands
from core.engine import RATE_LIMIT_TEXT, EngineOptions
from core.store import InMemoryStore, chat_scope
from core.types import IncomingMessage, Reply, ReplyKind
from tests.fakes import Harness, make_harness

ADMIN = Caller("discord", "9", "dm-9")
ALICE = Caller("discord", "1", "guild-1")
BOB = Caller("discord", "2", "guild-1")
GUILD_ADMIN = Caller("discord", "5", "guild-1", platform_admin=True)
"""Manage Server in guild-1: that guild's settings, nobody's data."""


def says(caller: Caller, text: str = "안녕") -> IncomingMessage:
    return IncomingMessage(platform=caller.platform, user_id=caller.user_id, chat_id=caller.chat_id, text=text)


class CountingStore(InMemoryStore):
    """Counts the reads of the block list, which must happen once, not once per message."""

    def __init__(self) -> None:
        super().__init__()
        self.block_reads = 0

    async def blocked_users(self) -> list[str]:
        self.block_reads += 1
        return await super().blocked_users()


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    built = make_harness(store=CountingStore())
    yield built
    await built.worker.stop()


def commands_of(harness: Harness) -> Commands:
    return Commands(harness.engine, harness.store, admin_ids=frozenset({ADMIN.user_key}), model_profile="fake")


async def test_blocks_are_read_from_the_store_once(harness: Harness) -> None:
    """A block check must cost no database wait, or a flood would queue on the database instead."""
    await harness.store.set_blocked(ALICE.user_key, True)
    commands = commands_of(harness)

    for _ in range(3):
        await commands.chat(says(ALICE))
        await commands.chat(says(BOB))
    await commands.memory(BOB)
    await commands.reset(ALICE)

    assert isinstance(harness.store, CountingStore) and harness.store.block_reads == 1


async def test_a_blocked_user_is_told_once_then_hears_nothing_but_may_still_forget(harness: Harness) -> None:
    """One notice, then silence for every command that uses her or shows data; deleting data stays a right."""
    commands = commands_of(harness)
    await commands.chat(says(ALICE, "나 떡볶이 좋아해"))
    summary = await harness.store.summary(ALICE.conversation_key)
    calls, renders = len(harness.generator.calls), len(harness.renderer.requests)
    assert (await commands.block(ADMIN, ALICE.user_key, True)).ok

    first = await commands.chat(says(ALICE))
    later = [
        await commands.chat(says(ALICE)),
        await commands.face(ALICE),
        await commands.memory(ALICE),
        await commands.reset(ALICE),
    ]
    forgot = await commands.forget(ALICE, None)

    assert first == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)
    assert later == [None, None, None, None]
    assert (len(harness.generator.calls), len(harness.renderer.requests)) == (calls, renders), "no model was used"
    assert await harness.store.summary(ALICE.conversation_key) == summary, "/reset was refused"
    assert forgot.ok and await harness.store.memories(ALICE.user_key) == []
    assert (await commands.chat(says(BOB))) is not None, "others are unaffected"


async def test_a_blocked_users_first_command_carries_the_notice(harness: Harness) -> None:
    """Whatever she tries first tells her why; a Discord interaction must get some answer."""
    await harness.store.set_blocked(ALICE.user_key, True)
    commands = commands_of(harness)

    assert await commands.face(ALICE) == CommandResult(BLOCKED_TEXT, ok=False)
    assert await commands.chat(says(ALICE)) is None


async def test_the_block_notice_is_given_once_across_restarts(harness: Harness) -> None:
    """A restarted bot must not greet every blocked user with the notice again."""
    await commands_of(harness).block(ADMIN, ALICE.user_key, True)
    assert await commands_of(harness).chat(says(ALICE)) == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)

    assert await commands_of(harness).chat(says(ALICE)) is None


async def test_unblocking_lets_the_user_talk_and_a_new_block_notifies_again(harness: Harness) -> None:
    """Unblocking clears the cached block and its notice, here and after a restart."""
    commands = commands_of(harness)
    await commands.chat(says(ALICE))  # the blocks are cached before the admin acts
    await commands.block(ADMIN, ALICE.user_key, True)
    assert await commands.chat(says(ALICE)) == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)

    await commands.block(ADMIN, ALICE.user_key, False)
    answered = await commands.chat(says(ALICE))
    assert answered is not None and answered.kind is ReplyKind.ANSWER
    assert not await harness.store.is_blocked(ALICE.user_key)

    await commands.block(ADMIN, ALICE.user_key, True)
    assert await commands.chat(says(ALICE)) == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)
    await commands.block(ADMIN, ALICE.user_key, False)
    await commands.block(ADMIN, ALICE.user_key, True)
    assert await commands_of(harness).chat(says(ALICE)) == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)


async def test_a_platform_admin_manages_the_chat_but_not_users_data(harness: Harness) -> None:
    """Manage Server in one guild covers that guild's face and channels, never anyone's memories or blocks."""
    commands = commands_of(harness)
    await commands.chat(says(BOB, "나 떡볶이 좋아해"))
    assert commands.may_manage_chat(GUILD_ADMIN) and not commands.is_bot_admin(GUILD_ADMIN)

    assert (await commands.set_face(GUILD_ADMIN, 931)).ok
    assert (await commands.allow_channel(GUILD_ADMIN, "700", True)).ok
    refused = [
        await commands.memory_of(GUILD_ADMIN, BOB.user_key),
        await commands.clear_memory_of(GUILD_ADMIN, BOB.user_key),
        await commands.block(GUILD_ADMIN, BOB.user_key, True),
        await commands.stats(GUILD_ADMIN),
    ]

    assert refused == [CommandResult(NOT_ADMIN_TEXT, ok=False)] * 4
    assert await harness.store.face_for(chat_scope("discord", "guild-1")) == 931
    assert await harness.store.allowed_channels("discord") == ["700"]
    assert [m.text for m in await harness.store.memories(BOB.user_key)] == ["[좋아하는 음식: 떡볶이]"]
    assert await harness.store.blocked_users() == []
    assert (await commands.chat(says(BOB))) is not None


async def test_a_plain_member_manages_nothing(harness: Harness) -> None:
    commands = commands_of(harness)

    assert await commands.set_face(ALICE, 931) == CommandResult(NOT_ADMIN_TEXT, ok=False)
    assert await commands.allow_channel(ALICE, "700", True) == CommandResult(NOT_ADMIN_TEXT, ok=False)
    assert await harness.store.face_for(chat_scope("discord", "guild-1")) is None
    assert await harness.store.allowed_channels("discord") == []


async def test_bot_admins_are_named_per_platform(harness: Harness) -> None:
    """`discord:9` is an admin; a Telegram account with the number 9 is someone else."""
    commands = commands_of(harness)
    await commands.chat(says(BOB, "나 떡볶이 좋아해"))
    twin = Caller("telegram", ADMIN.user_id, "dm-9")

    assert not commands.is_bot_admin(twin) and not commands.may_manage_chat(twin)
    assert await commands.memory_of(twin, BOB.user_key) == CommandResult(NOT_ADMIN_TEXT, ok=False)
    listed = await commands.memory_of(ADMIN, BOB.user_key)
    assert "[좋아하는 음식: 떡볶이]" in listed.text
    assert (await commands.stats(ADMIN)).text.startswith("turns: 1")


async def test_face_is_metered_by_the_rate_limit() -> None:
    """A render costs as much as a message: a flood of /face gets one notice, then silence."""
    harness = make_harness(options=EngineOptions(rate_limit_per_minute=2))
    commands = commands_of(harness)
    try:
        results = [await commands.face(ALICE) for _ in range(5)]
        chat_after = await commands.chat(says(ALICE))
        other = await commands.face(BOB)
    finally:
        await harness.worker.stop()

    assert all(result is not None and result.image is not None for result in results[:2])
    assert results[2] == CommandResult(RATE_LIMIT_TEXT, ok=False)
    assert results[3:] == [None, None]
    assert chat_after is None, "messages and /face share one meter"
    assert other is not None and other.image is not None
    assert len(harness.renderer.requests) == 3
