"""The command layer every adapter shares: blocks decided at once, the two kinds of power, /face metered.

Adapters only translate; who may do what is decided here, so it is tested here once, over fakes,
for every platform.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator

import pytest

from bot.commands import (
    BLOCK_NOTIFIED,
    BLOCKED_TEXT,
    NOT_ADMIN_TEXT,
    NOTHING_TO_FORGET_TEXT,
    Caller,
    CommandResult,
    Commands,
)
from core.engine import RATE_LIMIT_TEXT, EngineOptions
from core.store import Footprint, InMemoryStore, chat_scope
from core.types import IncomingMessage, Reply, ReplyKind
from tests.fakes import FakeGenerator, Harness, make_harness

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
    assert await harness.store.summary(ALICE.conversation_key) == summary, "/reset was refused"
    forgot = await commands.forget(ALICE, None)

    assert first == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)
    assert later == [None, None, None, None]
    assert (len(harness.generator.calls), len(harness.renderer.requests)) == (calls, renders), "no model was used"
    assert forgot.ok and await harness.store.memories(ALICE.user_key) == []
    assert await harness.store.summary(ALICE.conversation_key) == "", "forgetting all takes the summaries too"
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
        await commands.forget_of(GUILD_ADMIN, BOB.user_key),
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


# --------------------------------------------------------------------------------------------
# Your data (issue 13): `/forget` of everything, `/mydata`, and the admins' `forget_of`

TTEOKBOKKI = "[좋아하는 음식: 떡볶이]"
CAT = "[반려동물: 고양이 나비]"
DOG = "[반려동물: 강아지 초코]"
ALICE_DM = Caller("discord", "1", "dm-1")
"""Alice again, in her DMs: a second conversation of hers, with its own summary."""
EXPORTED_AT = 1_700_000_000.0
NOTHING = Footprint(memories=0, summaries=0, turns=0, expression=False)


@pytest.fixture
async def talkative() -> AsyncIterator[Harness]:
    """Every pet and food she hears about becomes a memory, so users leave distinct traces."""
    built = make_harness(generator=FakeGenerator(memory_rules={"떡볶이": TTEOKBOKKI, "고양이": CAT, "강아지": DOG}))
    yield built
    await built.worker.stop()


def commands_at(harness: Harness) -> Commands:
    return Commands(
        harness.engine,
        harness.store,
        admin_ids=frozenset({ADMIN.user_key}),
        model_profile="fake",
        clock=lambda: EXPORTED_AT,
    )


async def alice_and_bob_talk(commands: Commands) -> None:
    """Alice in the group and in her DMs; Bob in the same group."""
    await commands.chat(says(ALICE, "나 떡볶이 좋아해"))
    await commands.chat(says(ALICE_DM, "나 고양이 키워"))
    await commands.chat(says(ALICE, "오늘 좀 피곤해"))
    await commands.chat(says(BOB, "나 강아지 키워"))


async def test_the_forget_preview_says_what_will_go_and_deletes_nothing(talkative: Harness) -> None:
    """The confirmation must name what she is about to lose: counts, and her memories word for word."""
    commands = commands_at(talkative)
    await alice_and_bob_talk(commands)

    preview = await commands.forget_preview(ALICE, None)

    assert preview.ok
    assert "기억 2개, 대화 요약 2개, 대화 기록 3개, 마지막 표정" in preview.text
    assert f"- {TTEOKBOKKI}" in preview.text and f"- {CAT}" in preview.text
    assert DOG not in preview.text, "Bob's memory is not hers"
    assert await talkative.store.footprint(ALICE.user_key) == Footprint(
        memories=2, summaries=2, turns=3, expression=True
    ), "a preview deletes nothing"
    assert await commands.forget_preview(Caller("discord", "3", "guild-1"), None) == CommandResult(
        NOTHING_TO_FORGET_TEXT, ok=False
    )


async def test_forget_all_takes_everything_of_hers_and_nothing_of_bobs(talkative: Harness) -> None:
    """Memories, summaries of every chat, the log's words, her face: all gone; Bob in the same group keeps his."""
    commands = commands_at(talkative)
    await alice_and_bob_talk(commands)
    bobs = await talkative.store.user_data(BOB.user_key)

    done = await commands.forget(ALICE, None)

    assert done.ok and "기억 2개, 대화 요약 2개, 대화 기록 3개, 마지막 표정" in done.text
    assert await talkative.store.footprint(ALICE.user_key) == NOTHING
    assert await talkative.store.user_data(BOB.user_key) == bobs
    assert await commands.forget_preview(ALICE, None) == CommandResult(NOTHING_TO_FORGET_TEXT, ok=False)
    assert await commands.forget(ALICE, None) == CommandResult(NOTHING_TO_FORGET_TEXT, ok=False)
    listed = await commands.memory(ALICE)
    assert listed is not None and TTEOKBOKKI not in listed.text


async def test_forget_with_a_key_still_takes_only_that_memory(talkative: Harness) -> None:
    """`/forget <key>` keeps its old meaning: one memory; summaries and the log stay."""
    commands = commands_at(talkative)
    await alice_and_bob_talk(commands)

    assert await commands.forget(ALICE, "반려 동물") == CommandResult("기억 1개를 지웠어. 🧹")

    assert [m.text for m in await talkative.store.memories(ALICE.user_key)] == [TTEOKBOKKI]
    assert await talkative.store.footprint(ALICE.user_key) == Footprint(
        memories=1, summaries=2, turns=3, expression=True
    )


@pytest.mark.parametrize("key", [None, "좋아하는 음식"], ids=["everything", "one-memory"])
async def test_a_forget_command_waits_for_her_turn_in_flight(key: str | None) -> None:
    """Commands forget through the engine, in her line: the memory her running turn computes is not
    written back after she was told it is gone."""
    release = threading.Event()
    harness = make_harness(generator=FakeGenerator(release=release))
    commands = commands_of(harness)
    try:
        in_flight = asyncio.create_task(commands.chat(says(ALICE, "나 떡볶이 좋아해")))
        while not harness.generator.calls:
            await asyncio.sleep(0.01)
        forget = asyncio.create_task(commands.forget(ALICE, key))
        await asyncio.sleep(0.05)
        waited = not forget.done()
        release.set()
        _, result = await asyncio.gather(in_flight, forget)
    finally:
        release.set()
        await harness.worker.stop()

    assert waited and result.ok
    assert await harness.store.memories(ALICE.user_key) == []


async def test_my_data_is_a_json_file_of_everything_hers_and_nothing_of_bobs(talkative: Harness) -> None:
    """The export a user asked for: readable (Korean as Korean), complete, and only her own."""
    commands = commands_at(talkative)
    await alice_and_bob_talk(commands)
    await commands.block(ADMIN, BOB.user_key, True)
    await commands.chat(says(BOB))  # Bob hears the block notice once; that setting names Bob, not her

    result = await commands.my_data(ALICE)

    assert result.ok and result.file is not None
    assert (result.file.filename, result.file.mime_type) == ("ohlora-mydata-discord-1.json", "application/json")
    raw = result.file.data
    document = json.loads(raw)
    assert document["format"] == "ohlora-user-data/1"
    assert (document["user"], document["exported_at"]) == (ALICE.user_key, "2023-11-14T22:13:20+00:00")
    assert [memory["text"] for memory in document["memories"]] == [TTEOKBOKKI, CAT]
    assert all(set(memory) == {"key", "value", "text", "created_at", "updated_at"} for memory in document["memories"])
    assert set(document["summaries"]) == {ALICE.conversation_key, ALICE_DM.conversation_key}
    assert [turn["message"] for turn in document["turns"]] == ["나 떡볶이 좋아해", "나 고양이 키워", "오늘 좀 피곤해"]
    assert set(document["last_expression"]) == {"eyes", "mouth", "pose"}
    assert document["settings"] == {} and document["messages_not_yet_answered"] == []
    assert "떡볶이".encode() in raw and b"\\u" not in raw, "Korean is written as Korean, not escaped"
    assert "embedding" not in raw.decode()
    assert (
        "강아지" not in raw.decode() and BOB.user_key not in raw.decode() and BOB.conversation_key not in raw.decode()
    )


async def test_a_blocked_user_may_still_see_and_delete_her_data(talkative: Harness) -> None:
    """Blocked users hear nothing from her, but their data stays theirs: export and forget both work,
    the export shows the block, and the block itself survives the forget."""
    commands = commands_at(talkative)
    await alice_and_bob_talk(commands)
    await commands.block(ADMIN, ALICE.user_key, True)
    assert await commands.chat(says(ALICE)) == Reply(text=BLOCKED_TEXT, kind=ReplyKind.NOTICE)

    exported = await commands.my_data(ALICE)
    forgot = await commands.forget(ALICE, None)

    assert exported.ok and exported.file is not None
    settings = json.loads(exported.file.data)["settings"]
    assert settings == {"blocked": {ALICE.user_key: "1"}, ALICE.user_key: {BLOCK_NOTIFIED: "1"}}
    assert forgot.ok and await talkative.store.footprint(ALICE.user_key) == NOTHING
    assert await talkative.store.is_blocked(ALICE.user_key)
    assert await commands.chat(says(ALICE)) is None, "still blocked, and not told again"
    assert await commands_at(talkative).chat(says(ALICE)) is None, "nor after a restart"


async def test_only_bot_admins_forget_someone_else(talkative: Harness) -> None:
    """Manage Server is no power over a user's data; a bot admin's forget is the user's own, block kept."""
    commands = commands_at(talkative)
    await alice_and_bob_talk(commands)
    await commands.block(ADMIN, BOB.user_key, True)
    bobs = await talkative.store.footprint(BOB.user_key)

    refused = [await commands.forget_of(GUILD_ADMIN, BOB.user_key), await commands.forget_of(ALICE, BOB.user_key)]
    assert refused == [CommandResult(NOT_ADMIN_TEXT, ok=False)] * 2
    assert await talkative.store.footprint(BOB.user_key) == bobs

    done = await commands.forget_of(ADMIN, BOB.user_key)
    assert done.ok and done.text.startswith(f"{BOB.user_key}: ") and "기억 1개" in done.text
    assert await talkative.store.footprint(BOB.user_key) == NOTHING
    assert await talkative.store.is_blocked(BOB.user_key)
    assert await talkative.store.footprint(ALICE.user_key) == Footprint(
        memories=2, summaries=2, turns=3, expression=True
    )
    assert await commands.forget_of(ADMIN, BOB.user_key) == CommandResult(
        f"{BOB.user_key}: 저장된 게 없어요.", ok=False
    )
