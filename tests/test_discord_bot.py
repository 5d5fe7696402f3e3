"""The Discord adapter: the pure message rules, messages through dpytest, slash commands with
fake interactions, and the adapter's start/close. Everything runs over the fake models."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from discord import app_commands
from hypothesis import given
from hypothesis import strategies as st
from pydantic import SecretStr

from bot.commands import BLOCKED_TEXT, NO_MEMORIES_TEXT, NOT_ADMIN_TEXT, NOT_NOW_TEXT, CommandResult, Commands
from bot.discord_bot import DiscordAdapter, OhloraClient
from bot.discord_commands import (
    BAD_ARGUMENT_TEXT,
    COMMAND_ERROR_TEXT,
    COOLDOWN_TEXT,
    FORGET_CANCELLED_TEXT,
    FORGET_EXPIRED_TEXT,
    NOT_HERE_TEXT,
    NOT_YOUR_BUTTON_TEXT,
    ForgetConfirmation,
    friendly_error,
    respond,
)
from bot.discord_rules import (
    MESSAGE_LIMIT,
    InboundMessage,
    face_choices,
    fit_message,
    should_answer,
    split_message,
    strip_mention,
    suggestions,
)
from bot.errors import BotLoginFailed
from bot.inbox import Inbox
from core.config import Settings
from core.types import Task
from tests.discord_harness import (
    PNG_SIGNATURE,
    SETTLE_TIMEOUT_S,
    FakeChannel,
    FakeInteraction,
    SentRecorder,
    autocomplete,
    bot_member,
    invoke,
    post,
    press,
    settle,
)
from tests.fakes import END, FACES, FakeGenerator, FakeRenderer, Harness, make_harness

BOT_ID = 900000000000000001
ROLE_ID = 900000000000000002
GUILD_ID = 800000000000000001
CHANNEL_ID = 700000000000000001
OTHER_CHANNEL_ID = 700000000000000002
ALICE = discord.Object(id=600000000000000001)
BOB = discord.Object(id=600000000000000002)
MOD = discord.Object(id=600000000000000003)
LISTED_ADMIN = discord.Object(id=600000000000000004)
"""In OHLORA_ADMIN_IDS, without Manage Server."""


# --------------------------------------------------------------------------------------------
# Pure rules


def test_strip_mention_removes_every_form_of_the_bots_mention_and_nothing_else() -> None:
    assert strip_mention(f"<@{BOT_ID}> 안녕", BOT_ID) == "안녕"
    assert strip_mention(f"안녕 <@!{BOT_ID}>", BOT_ID) == "안녕"
    assert strip_mention(f"오늘 <@{BOT_ID}> <@{BOT_ID}> 뭐 해?", BOT_ID) == "오늘 뭐 해?"
    assert strip_mention(f"<@&{ROLE_ID}> 안녕", BOT_ID, ROLE_ID) == "안녕"
    assert strip_mention(f"<@{ALICE.id}> 이랑 <@&{ROLE_ID}>", BOT_ID) == f"<@{ALICE.id}> 이랑 <@&{ROLE_ID}>"
    assert strip_mention("줄 바꿈\n그대로", BOT_ID) == "줄 바꿈\n그대로"
    assert strip_mention(f"<@{BOT_ID}>", BOT_ID) == ""


def test_split_message_keeps_short_text_whole_and_gives_nothing_for_blank_text() -> None:
    assert split_message("안녕!") == ["안녕!"]
    assert split_message("가" * MESSAGE_LIMIT) == ["가" * MESSAGE_LIMIT]
    assert split_message("") == []
    assert split_message(" \n ") == []


def test_split_message_prefers_line_breaks_then_spaces_then_cuts_anywhere() -> None:
    lines = "첫 줄 " + "가" * 10 + "\n" + "나" * 10
    assert split_message(lines, limit=20) == ["첫 줄 " + "가" * 10, "나" * 10]
    assert split_message("가나다 라마바사", limit=5) == ["가나다", "라마바사"]
    assert split_message("가" * 12, limit=5) == ["가" * 5, "가" * 5, "가" * 2]


@given(st.text(alphabet=st.sampled_from("가나a \n😊"), max_size=300), st.integers(min_value=1, max_value=40))
def test_split_message_parts_fit_are_never_blank_and_lose_no_character(text: str, limit: int) -> None:
    parts = split_message(text, limit)
    assert all(0 < len(part) <= limit and part.strip() for part in parts)
    assert "".join("".join(parts).split()) == "".join(text.split())


def test_fit_message_marks_what_it_cut() -> None:
    assert fit_message("짧아") == "짧아"
    long = "\n".join(["줄"] * 3000)
    fitted = fit_message(long)
    assert len(fitted) <= MESSAGE_LIMIT and fitted.endswith("\n…")


def _inbound(**changes: Any) -> InboundMessage:
    base = InboundMessage(
        message_id=500000000000000001,
        author_id=ALICE.id,
        author_is_bot=False,
        channel_id=CHANNEL_ID,
        parent_channel_id=None,
        in_dm=False,
        is_system=False,
        mentions_bot=False,
        replies_to_bot=False,
        mentions_everyone=False,
        text="안녕",
        has_media=False,
        forwarded=False,
    )
    return replace(base, **changes)


class Allowlist:
    def __init__(self, *allowed: int) -> None:
        self.allowed = {str(channel) for channel in allowed}
        self.asked: list[str] = []

    async def __call__(self, channel_id: str) -> bool:
        self.asked.append(channel_id)
        return channel_id in self.allowed


@pytest.mark.parametrize(
    ("changes", "allowed", "expected"),
    [
        ({"in_dm": True}, (), True),
        ({}, (), False),
        ({"mentions_bot": True}, (), True),
        ({"replies_to_bot": True}, (), True),
        ({}, (CHANNEL_ID,), True),
        ({}, (OTHER_CHANNEL_ID,), False),
        ({"parent_channel_id": OTHER_CHANNEL_ID}, (OTHER_CHANNEL_ID,), True),
        ({"author_is_bot": True, "in_dm": True}, (), False),
        ({"author_is_bot": True, "mentions_bot": True}, (CHANNEL_ID,), False),
        ({"is_system": True}, (CHANNEL_ID,), False),
        ({"mentions_everyone": True}, (CHANNEL_ID,), False),
        ({"mentions_everyone": True, "mentions_bot": True}, (), True),
        ({"text": "", "has_media": True}, (CHANNEL_ID,), False),
        ({"text": "", "has_media": True, "mentions_bot": True}, (), True),
        ({"text": "", "has_media": True, "replies_to_bot": True}, (), True),
        ({"text": "", "has_media": True, "in_dm": True}, (), True),
        ({"text": "남이 한 말", "forwarded": True}, (CHANNEL_ID,), True),
        ({"text": "남이 한 말", "forwarded": True}, (), False),
    ],
)
async def test_should_answer(changes: dict[str, Any], allowed: tuple[int, ...], expected: bool) -> None:
    assert await should_answer(_inbound(**changes), Allowlist(*allowed)) is expected


async def test_should_answer_reads_the_allowlist_once_for_every_server_message_from_a_person() -> None:
    """No read where it cannot matter (DMs, bots); one for every other server message, mention or
    not, so that a user's messages in a channel wait for the same things and keep their order."""
    allowlist = Allowlist()
    assert await should_answer(_inbound(in_dm=True), allowlist)
    assert not await should_answer(_inbound(author_is_bot=True), allowlist)
    assert not await should_answer(_inbound(is_system=True), allowlist)
    assert allowlist.asked == []
    assert await should_answer(_inbound(mentions_bot=True), allowlist)
    assert allowlist.asked == [str(CHANNEL_ID)]
    assert not await should_answer(_inbound(), allowlist)
    assert allowlist.asked == [str(CHANNEL_ID)] * 2


def test_an_inbound_message_becomes_an_incoming_message_of_its_author_and_channel() -> None:
    incoming = _inbound(text="떡볶이 좋아해").to_incoming()
    assert (incoming.platform, incoming.user_id, incoming.chat_id, incoming.text) == (
        "discord",
        str(ALICE.id),
        str(CHANNEL_ID),
        "떡볶이 좋아해",
    )
    assert incoming.user_key == f"discord:{ALICE.id}"
    assert incoming.event_id == "500000000000000001" and not incoming.forwarded
    assert _inbound(forwarded=True).to_incoming().forwarded


def test_suggestions_match_what_was_typed_ignoring_case_and_spaces() -> None:
    keys = ["좋아하는 음식", "Favourite Colour", "좋아하는 음식", "싫어하는 음식"]
    assert [c.value for c in suggestions(keys, "")] == ["좋아하는 음식", "Favourite Colour", "싫어하는 음식"]
    assert [c.value for c in suggestions(keys, "좋아하는음식")] == ["좋아하는 음식"]
    assert [c.value for c in suggestions(keys, "colour")] == ["Favourite Colour"]
    assert len(suggestions([f"기억 {i}" for i in range(40)], "")) == 25
    assert suggestions(["가" * 101], "") == []


def test_face_choices_list_the_faces_containing_the_digits_typed() -> None:
    assert [c.value for c in face_choices([1277, 127, 931], "")] == [127, 931, 1277]
    assert [c.value for c in face_choices([1277, 127, 931], "12")] == [127, 1277]
    assert len(face_choices(range(100, 200), "")) == 25


# --------------------------------------------------------------------------------------------
# Shared fixtures


@dataclass
class Bot:
    harness: Harness
    commands: Commands
    client: OhloraClient

    @property
    def tree(self) -> app_commands.CommandTree:
        return self.client.tree


def _bot(harness: Harness) -> Bot:
    commands = Commands(
        harness.engine,
        harness.store,
        admin_ids=frozenset({f"discord:{LISTED_ADMIN.id}"}),
        model_profile="tiny",
    )
    adapter = DiscordAdapter(commands, settings(), inbox=Inbox(harness.store, "discord"), intents=discord.Intents.all())
    return Bot(harness, commands, adapter.client)


def adapter_of(bot: Bot, token: str | None = None) -> DiscordAdapter:
    """A second adapter over the bot's commands and store, for the life-cycle tests."""
    return DiscordAdapter(bot.commands, settings(token), inbox=Inbox(bot.harness.store, "discord"))


def settings(token: str | None = None) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        discord_token=SecretStr(token) if token else None,
    )


@pytest.fixture
async def bot() -> AsyncIterator[Bot]:
    harness = make_harness()
    try:
        yield _bot(harness)
    finally:
        await harness.worker.stop()


def member_interaction(user: discord.abc.Snowflake, **changes: Any) -> FakeInteraction:
    """A command used in a server channel by someone without special permissions."""
    return FakeInteraction(user=user, channel_id=CHANNEL_ID, guild_id=GUILD_ID, **changes)


def mod_interaction(**changes: Any) -> FakeInteraction:
    return member_interaction(MOD, permissions=discord.Permissions(manage_guild=True), **changes)


def listed_admin_interaction() -> FakeInteraction:
    return member_interaction(LISTED_ADMIN)


async def tell(bot: Bot, user: discord.abc.Snowflake, text: str, channel_id: int = CHANNEL_ID) -> None:
    """A turn as the Discord adapter would start it, without going through the gateway."""
    await bot.commands.chat(_inbound(author_id=user.id, channel_id=channel_id, text=text).to_incoming())


# --------------------------------------------------------------------------------------------
# Messages through dpytest


@dataclass
class World:
    bot: Bot
    recorder: SentRecorder
    guild: discord.Guild
    channel: discord.TextChannel
    other_channel: discord.TextChannel
    alice: discord.Member
    bob: discord.Member

    @property
    def me(self) -> discord.ClientUser:
        assert self.bot.client.user is not None
        return self.bot.client.user

    def interaction(self, member: discord.Member, *, manage_guild: bool = False) -> FakeInteraction:
        return FakeInteraction(
            user=member,
            channel_id=self.channel.id,
            guild_id=self.guild.id,
            permissions=discord.Permissions(manage_guild=manage_guild),
        )


@pytest.fixture
async def world(bot: Bot, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.chdir(tmp_path)  # dpytest writes every file the bot sends into the working directory
    dpytest.configure(bot.client, text_channels=2, voice_channels=0, members=2)
    await bot.client._async_setup_hook()  # dpytest's recipe: give the client and its state the loop
    config = dpytest.get_config()
    channel, other_channel = config.channels
    alice, bob = config.members
    assert isinstance(channel, discord.TextChannel) and isinstance(other_channel, discord.TextChannel)
    try:
        yield World(bot, SentRecorder(bot.client), config.guilds[0], channel, other_channel, alice, bob)
    finally:
        await asyncio.wait_for(dpytest.empty_queue(), timeout=SETTLE_TIMEOUT_S)


async def test_a_dm_gets_text_and_a_png_face_in_reply_after_typing(world: World) -> None:
    dm = await world.alice.create_dm()
    message = await post("안녕 오로라!", channel=dm, author=world.alice._user)

    (sent,) = world.recorder.take()
    assert sent.channel_id == dm.id and sent.reference_id == message.id
    assert sent.content and sent.content.startswith("그렇구나!")
    ((filename, data),) = sent.files
    assert filename.endswith(".png") and data.startswith(PNG_SIGNATURE)
    assert world.recorder.events == ["typing", "send"]
    # What arrived on Discord's side: the attachment dpytest stored is the same picture.
    received = dpytest.get_message()
    assert await received.attachments[0].read() == data


async def test_a_server_message_that_is_not_for_her_gets_nothing(world: World) -> None:
    await post("오늘 날씨 좋다", channel=world.channel, author=world.alice)

    assert world.recorder.take() == [] and world.recorder.events == []
    assert world.bot.harness.generator.calls == []


async def test_a_mention_gets_a_reply_to_that_message_and_the_model_never_sees_it(world: World) -> None:
    message = await post(f"<@{world.me.id}> 안녕 오로라", channel=world.channel, author=world.alice)

    (sent,) = world.recorder.take()
    assert sent.channel_id == world.channel.id and sent.reference_id == message.id
    assert sent.files[0][1].startswith(PNG_SIGNATURE)
    (request,) = world.bot.harness.generator.requests_for(Task.OUTPUT_MESSAGE)
    assert request.prompt.startswith("안녕 오로라") and "<@" not in request.prompt


async def test_a_reply_to_her_message_is_answered_without_a_mention(world: World) -> None:
    hers = await world.channel.send("나 여기 있어!")
    world.recorder.take()
    message = await post("그래서 뭐 해?", channel=world.channel, author=world.bob, reply_to=hers)

    (sent,) = world.recorder.take()
    assert sent.reference_id == message.id


async def test_a_reply_to_someone_else_is_not_for_her(world: World) -> None:
    alices = await post("나 왔어", channel=world.channel, author=world.alice)
    await post("반가워", channel=world.channel, author=world.bob, reply_to=alices)

    assert world.recorder.take() == []


async def test_an_allowed_channel_is_answered_without_a_mention_until_denied(world: World) -> None:
    await invoke(world.bot.tree, "admin channel allow", world.interaction(world.bob, manage_guild=True))

    await post("안녕", channel=world.channel, author=world.alice)
    await post("안녕", channel=world.other_channel, author=world.alice)
    (sent,) = world.recorder.take()
    assert sent.channel_id == world.channel.id

    await post("@everyone 공지예요", channel=world.channel, author=world.bob, mention_everyone=True)
    assert world.recorder.take() == []

    await invoke(world.bot.tree, "admin channel deny", world.interaction(world.bob, manage_guild=True))
    await post("안녕", channel=world.channel, author=world.alice)
    assert world.recorder.take() == []


async def test_bots_and_her_own_messages_are_ignored_even_where_she_would_answer(world: World) -> None:
    await invoke(world.bot.tree, "admin channel allow", world.interaction(world.bob, manage_guild=True))
    robot = bot_member(world.guild)
    await post(f"<@{world.me.id}> 안녕", channel=world.channel, author=robot)
    await post("안녕", channel=await robot.create_dm(), author=robot._user)
    await world.channel.send(f"<@{world.me.id}> 내가 나를 부르면?")  # dpytest delivers it back to her
    await settle()

    assert [sent.content for sent in world.recorder.take()] == [f"<@{world.me.id}> 내가 나를 부르면?"]
    assert world.bot.harness.generator.calls == []


async def test_a_blocked_user_gets_one_notice_then_silence_until_unblocked(world: World) -> None:
    await invoke(world.bot.tree, "admin block", listed_admin_interaction(), user=world.alice)
    mention = f"<@{world.me.id}> 안녕"

    world.recorder.events.clear()
    await post(mention, channel=world.channel, author=world.alice)
    await post(mention, channel=world.channel, author=world.alice)
    (notice,) = world.recorder.take()
    assert notice.content == BLOCKED_TEXT and notice.files == ()
    assert world.bot.harness.generator.calls == []
    assert "typing" not in world.recorder.events, "a blocked user never sees her typing"

    await invoke(world.bot.tree, "admin unblock", listed_admin_interaction(), user=world.alice)
    await post(mention, channel=world.channel, author=world.alice)
    (answer,) = world.recorder.take()
    assert answer.content and answer.content.startswith("그렇구나!")


async def test_two_users_in_one_server_never_see_each_others_memories(world: World) -> None:
    # Only Alice's exact words make a memory, so Bob's question, which matches her memory
    # perfectly, leaves him with none of his own.
    world.bot.harness.generator.memory_rules = {"나 떡볶이 좋아해": "[좋아하는 음식: 떡볶이]"}
    mention = f"<@{world.me.id}>"
    await post(f"{mention} 나 떡볶이 좋아해", channel=world.channel, author=world.alice)
    await post(f"{mention} 떡볶이 같은 음식 좋아해?", channel=world.channel, author=world.bob)
    await post(f"{mention} 떡볶이 같은 음식 좋아해?", channel=world.channel, author=world.alice)

    prompts = [r.prompt for r in world.bot.harness.generator.requests_for(Task.OUTPUT_MESSAGE)]
    assert len(prompts) == 3
    assert "좋아하는 음식" not in prompts[1]  # Bob's turn: Alice's memory is not a candidate
    assert prompts[2].startswith("[좋아하는 음식: 떡볶이]")  # the same question finds Alice's own

    alices, bobs = world.interaction(world.alice), world.interaction(world.bob)
    await invoke(world.bot.tree, "memory", alices)
    await invoke(world.bot.tree, "memory", bobs)
    assert "[좋아하는 음식: 떡볶이]" in alices.texts()[0]
    assert bobs.texts() == [NO_MEMORIES_TEXT]
    assert await autocomplete(world.bot.tree, "forget", "key", world.interaction(world.bob), "") == []


async def test_a_long_answer_is_split_and_only_the_first_part_carries_the_face(world: World) -> None:
    long_answer = " " + "가" * 1500 + " " + "나" * 1000 + " 이야기 끝."
    world.bot.harness.generator.scripts[Task.OUTPUT_MESSAGE] = lambda request: long_answer + END
    message = await post(f"<@{world.me.id}> 길게 말해 줘", channel=world.channel, author=world.alice)

    first, second = world.recorder.take()
    assert first.reference_id == message.id and first.files[0][1].startswith(PNG_SIGNATURE)
    assert second.reference_id is None and second.files == ()
    assert first.content == "가" * 1500  # cut at the space, not inside the word
    assert f"{first.content} {second.content}" == long_answer.strip()


# --------------------------------------------------------------------------------------------
# Slash commands


ADMIN_COMMANDS: list[tuple[str, dict[str, Any]]] = [
    ("admin channel allow", {}),
    ("admin channel deny", {}),
    ("admin face set", {"number": FACES[1]}),
    ("admin memory view", {"user": ALICE}),
    ("admin memory clear", {"user": ALICE}),
    ("admin block", {"user": ALICE}),
    ("admin unblock", {"user": ALICE}),
    ("admin stats", {}),
]


async def _snapshot(bot: Bot) -> tuple[Any, ...]:
    store = bot.harness.store
    return (
        await store.allowed_channels("discord"),
        await store.blocked_users(),
        await store.face_for(f"chat:discord:{CHANNEL_ID}"),
        [m.text for m in await store.memories(f"discord:{ALICE.id}")],
    )


def test_the_admin_commands_are_all_covered(bot: Bot) -> None:
    admin = bot.tree.get_command("admin")
    assert isinstance(admin, app_commands.Group)
    assert {c.qualified_name for c in admin.walk_commands() if isinstance(c, app_commands.Command)} == {
        path for path, _ in ADMIN_COMMANDS
    }


async def test_a_member_without_rights_is_refused_every_admin_command_and_nothing_changes(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    await bot.harness.store.set_blocked(f"discord:{ALICE.id}", True)  # so that unblock would change something
    before = await _snapshot(bot)

    for path, arguments in ADMIN_COMMANDS:
        for interaction in (member_interaction(BOB), FakeInteraction(user=BOB, channel_id=CHANNEL_ID)):
            await invoke(bot.tree, path, interaction, **arguments)
            assert [(s.via, s.content, s.ephemeral) for s in interaction.shown] == [
                ("response", NOT_ADMIN_TEXT, True)
            ], path

    assert await _snapshot(bot) == before


SERVER_MANAGERS = [
    pytest.param(lambda: mod_interaction(), id="manage_guild"),
    pytest.param(
        lambda: member_interaction(MOD, permissions=discord.Permissions(administrator=True)), id="administrator"
    ),
]
LISTED_ADMINS = [
    pytest.param(listed_admin_interaction, id="OHLORA_ADMIN_IDS"),
    pytest.param(lambda: FakeInteraction(user=LISTED_ADMIN, channel_id=CHANNEL_ID), id="OHLORA_ADMIN_IDS in a DM"),
]
BOT_WIDE: list[tuple[str, dict[str, Any]]] = [
    (path, arguments)
    for path, arguments in ADMIN_COMMANDS
    if path.split()[1] in {"memory", "block", "unblock", "stats"}
]


async def _run_as(bot: Bot, make_interaction: Any, path: str, **arguments: Any) -> FakeInteraction:
    """`/path` by whoever `make_interaction` makes; it must be answered privately and not refused."""
    interaction = make_interaction()
    await invoke(bot.tree, path, interaction, **arguments)
    assert interaction.shown and all(s.ephemeral for s in interaction.shown), path
    assert NOT_ADMIN_TEXT not in interaction.texts(), path
    return interaction


@pytest.mark.parametrize("make_interaction", [*SERVER_MANAGERS, LISTED_ADMINS[0]])
async def test_a_server_manager_or_a_listed_admin_sets_this_servers_channels_and_face(
    bot: Bot, make_interaction: Any
) -> None:
    store = bot.harness.store
    await _run_as(bot, make_interaction, "admin channel allow")
    assert await store.is_channel_allowed("discord", str(CHANNEL_ID))
    other = FakeChannel(id=OTHER_CHANNEL_ID, guild=discord.Object(id=GUILD_ID))
    await _run_as(bot, make_interaction, "admin channel allow", channel=other)
    assert await store.is_channel_allowed("discord", str(OTHER_CHANNEL_ID))
    await _run_as(bot, make_interaction, "admin channel deny")
    assert await store.allowed_channels("discord") == [str(OTHER_CHANNEL_ID)]

    await _run_as(bot, make_interaction, "admin face set", number=FACES[2])
    assert await store.face_for(f"chat:discord:{CHANNEL_ID}") == FACES[2]


@pytest.mark.parametrize("make_interaction", LISTED_ADMINS)
async def test_a_listed_admin_can_use_the_bot_wide_commands_anywhere(bot: Bot, make_interaction: Any) -> None:
    store = bot.harness.store
    alice = f"discord:{ALICE.id}"
    await tell(bot, ALICE, "나 떡볶이 좋아해")

    viewed = await _run_as(bot, make_interaction, "admin memory view", user=ALICE)
    assert "[좋아하는 음식: 떡볶이]" in viewed.texts()[0]
    await _run_as(bot, make_interaction, "admin memory clear", user=ALICE)
    assert await store.memories(alice) == []
    assert (await store.footprint(alice)).empty, "clearing is forgetting: summaries and turn texts too"

    await _run_as(bot, make_interaction, "admin block", user=ALICE)
    assert await store.is_blocked(alice)
    await _run_as(bot, make_interaction, "admin unblock", user=ALICE)
    assert not await store.is_blocked(alice)

    stats = await _run_as(bot, make_interaction, "admin stats")
    assert "turns: 1" in stats.texts()[0]


@pytest.mark.parametrize("make_interaction", SERVER_MANAGERS)
async def test_manage_server_reaches_no_users_data_and_no_stats(bot: Bot, make_interaction: Any) -> None:
    """A user's memories and a block reach every server and DM: one server's managers have no say."""
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    await bot.harness.store.set_blocked(f"discord:{ALICE.id}", True)  # so that unblock would change something
    before = await _snapshot(bot)

    assert len(BOT_WIDE) == 5
    for path, arguments in BOT_WIDE:
        interaction = make_interaction()
        await invoke(bot.tree, path, interaction, **arguments)
        assert [(s.via, s.content, s.ephemeral) for s in interaction.shown] == [("response", NOT_ADMIN_TEXT, True)], (
            path
        )

    assert await _snapshot(bot) == before


async def test_an_unknown_face_number_is_refused_with_the_choices(bot: Bot) -> None:
    interaction = mod_interaction()
    await invoke(bot.tree, "admin face set", interaction, number=4242)

    assert all(str(face) in interaction.texts()[0] for face in FACES)
    assert await bot.harness.store.face_for(f"chat:discord:{CHANNEL_ID}") is None


async def test_face_autocomplete_lists_the_faces(bot: Bot) -> None:
    everything = await autocomplete(bot.tree, "admin face set", "number", mod_interaction(), "")
    assert [choice.value for choice in everything] == sorted(FACES)
    narrowed = await autocomplete(bot.tree, "admin face set", "number", mod_interaction(), "12")
    assert [choice.value for choice in narrowed] == [face for face in sorted(FACES) if "12" in str(face)]


async def test_memory_is_private_to_the_caller(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    alices, bobs = member_interaction(ALICE), member_interaction(BOB)
    await invoke(bot.tree, "memory", alices)
    await invoke(bot.tree, "memory", bobs)

    assert [(s.via, s.ephemeral) for s in alices.shown] == [("response", True)]
    assert "[좋아하는 음식: 떡볶이]" in alices.texts()[0]
    assert bobs.texts() == [NO_MEMORIES_TEXT] and bobs.shown[0].ephemeral


async def test_a_blocked_users_commands_are_each_answered_and_only_forget_still_works(bot: Bot) -> None:
    """The block notice is said once; every later interaction still gets an answer, or Discord
    would show the user an error."""
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    await invoke(bot.tree, "admin block", listed_admin_interaction(), user=ALICE)
    renders = len(bot.harness.renderer.requests)

    shown: dict[str, list[tuple[str, str | None, bool]]] = {}
    for path in ("memory", "reset", "face"):
        interaction = member_interaction(ALICE)
        await invoke(bot.tree, path, interaction)
        shown[path] = [(s.via, s.content, s.ephemeral) for s in interaction.shown]
    assert shown == {
        "memory": [("response", BLOCKED_TEXT, True)],
        "reset": [("response", NOT_NOW_TEXT, True)],
        "face": [("defer", None, True), ("followup", NOT_NOW_TEXT, True)],
    }
    assert await bot.harness.store.summary(f"discord:{CHANNEL_ID}:{ALICE.id}")  # /reset changed nothing
    assert len(bot.harness.renderer.requests) == renders  # no face drawn for a blocked user

    await _forget_preview(bot, None)  # a user may always delete what they left


async def test_forget_autocomplete_suggests_only_the_callers_keys(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    alices = await autocomplete(bot.tree, "forget", "key", member_interaction(ALICE), "음식")
    bobs = await autocomplete(bot.tree, "forget", "key", member_interaction(BOB), "")
    assert [choice.value for choice in alices] == ["좋아하는 음식"]
    assert bobs == []


async def _forget_preview(bot: Bot, key: str | None) -> tuple[FakeInteraction, ForgetConfirmation]:
    interaction = member_interaction(ALICE)
    await invoke(bot.tree, "forget", interaction, key=key)
    (shown,) = interaction.shown
    assert shown.via == "response" and shown.ephemeral and "[좋아하는 음식: 떡볶이]" in (shown.content or "")
    assert isinstance(shown.view, ForgetConfirmation)
    return interaction, shown.view


async def test_forget_deletes_the_memory_only_after_the_confirm_button(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    alice = f"discord:{ALICE.id}"
    _, view = await _forget_preview(bot, "좋아하는 음식")
    assert len(await bot.harness.store.memories(alice)) == 1

    click = member_interaction(ALICE)
    await press(view, "지우기", click)
    assert await bot.harness.store.memories(alice) == []
    # Acknowledged at once (forgetting may wait for a running turn), then the preview becomes the result.
    assert [(s.via, s.view) for s in click.shown] == [("defer", None), ("edit_original", None)]
    assert "1개" in (click.shown[1].content or "")

    again = member_interaction(ALICE)
    await press(view, "지우기", again)  # a double click is acknowledged and does nothing more
    assert [s.via for s in again.shown] == ["defer"]


async def test_forget_without_a_key_offers_to_delete_everything(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    await tell(bot, ALICE, "내 취미는 등산이야")
    await tell(bot, BOB, "나 떡볶이 좋아해")
    _, view = await _forget_preview(bot, None)

    await press(view, "지우기", member_interaction(ALICE))
    assert await bot.harness.store.memories(f"discord:{ALICE.id}") == []
    assert len(await bot.harness.store.memories(f"discord:{BOB.id}")) == 1


async def test_forget_cancel_or_someone_elses_click_deletes_nothing(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    _, view = await _forget_preview(bot, None)

    stranger = member_interaction(BOB)
    await press(view, "지우기", stranger)
    assert stranger.texts() == [NOT_YOUR_BUTTON_TEXT] and stranger.shown[0].ephemeral
    cancel = member_interaction(ALICE)
    await press(view, "취소", cancel)
    assert [(s.via, s.content, s.view) for s in cancel.shown] == [("edit", FORGET_CANCELLED_TEXT, None)]
    assert len(await bot.harness.store.memories(f"discord:{ALICE.id}")) == 1


async def test_an_unanswered_forget_confirmation_is_retired(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    origin, view = await _forget_preview(bot, None)

    await view.on_timeout()
    retired = [(s.via, s.content, s.view) for s in origin.shown[1:]]
    assert retired == [("edit_original", FORGET_EXPIRED_TEXT, None)]
    assert len(await bot.harness.store.memories(f"discord:{ALICE.id}")) == 1


async def test_forget_of_an_unknown_key_says_so_without_buttons(bot: Bot) -> None:
    interaction = member_interaction(ALICE)
    await invoke(bot.tree, "forget", interaction, key="없는 기억")
    (shown,) = interaction.shown
    assert shown.view is None and shown.ephemeral and "없는 기억" in (shown.content or "")


async def test_reset_clears_the_summary_of_this_channel_only(bot: Bot) -> None:
    store = bot.harness.store
    await tell(bot, ALICE, "안녕 오로라", CHANNEL_ID)
    await tell(bot, ALICE, "안녕 오로라", OTHER_CHANNEL_ID)
    here, there = (f"discord:{channel}:{ALICE.id}" for channel in (CHANNEL_ID, OTHER_CHANNEL_ID))
    assert await store.summary(here) and await store.summary(there)

    interaction = member_interaction(ALICE)
    await invoke(bot.tree, "reset", interaction)
    assert await store.summary(here) == "" and await store.summary(there)
    assert interaction.shown[0].ephemeral


async def test_face_is_deferred_then_sent_as_a_png(bot: Bot) -> None:
    interaction = member_interaction(ALICE)
    await invoke(bot.tree, "face", interaction)

    assert [(s.via, s.ephemeral) for s in interaction.shown] == [("defer", True), ("followup", True)]
    ((filename, data),) = interaction.shown[1].files
    assert filename.endswith(".png") and data.startswith(PNG_SIGNATURE)


async def test_help_lists_the_commands(bot: Bot) -> None:
    interaction = member_interaction(ALICE)
    await invoke(bot.tree, "help", interaction)
    assert all(f"/{name}" in interaction.texts()[0] for name in ("memory", "forget", "reset", "face"))


async def test_a_failing_command_answers_once_with_an_apology_and_logs_the_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness = make_harness(renderer=FakeRenderer(fail=RuntimeError("the GPU caught fire")))
    bot = _bot(harness)
    interaction = member_interaction(ALICE)
    try:
        with caplog.at_level(logging.ERROR, logger="bot"):
            await invoke(bot.tree, "face", interaction)
    finally:
        await harness.worker.stop()

    assert [(s.via, s.content, s.ephemeral) for s in interaction.shown] == [
        ("defer", None, True),
        ("followup", COMMAND_ERROR_TEXT, True),
    ]
    (record,) = caplog.records
    assert record.exc_info is not None and "the GPU caught fire" in str(record.exc_info[1])


async def test_an_error_before_any_response_is_answered_directly(bot: Bot, caplog: pytest.LogCaptureFixture) -> None:
    interaction = member_interaction(ALICE)
    with caplog.at_level(logging.ERROR, logger="bot"):
        await bot.tree.on_error(interaction, app_commands.NoPrivateMessage())  # type: ignore[arg-type]
    assert [(s.via, s.content, s.ephemeral) for s in interaction.shown] == [("response", NOT_HERE_TEXT, True)]
    assert caplog.records == []  # the user's doing, not a bug


def test_friendly_error_explains_what_the_user_can_fix() -> None:
    cooldown = app_commands.CommandOnCooldown(app_commands.Cooldown(1, 10.0), retry_after=7.2)
    assert friendly_error(cooldown) == COOLDOWN_TEXT.format(seconds=7.2)
    assert friendly_error(app_commands.CheckFailure()) == NOT_HERE_TEXT
    bad_number = app_commands.TransformerError("열둘", discord.AppCommandOptionType.string, _Number())
    assert friendly_error(bad_number) == BAD_ARGUMENT_TEXT
    assert friendly_error(RuntimeError("bug")) is None
    assert friendly_error(app_commands.CommandInvokeError(_command_of(), RuntimeError("bug"))) is None


class _Number(app_commands.Transformer):
    async def transform(self, interaction: discord.Interaction, value: Any) -> int:
        return int(value)


def _command_of() -> app_commands.Command[Any, ..., Any]:
    @app_commands.command(name="x", description="x")
    async def x(interaction: discord.Interaction) -> None:
        return None

    return x


async def test_a_long_result_is_split_into_ephemeral_followups() -> None:
    interaction = member_interaction(ALICE)
    text = "\n".join(f"{i}. 기억" for i in range(800))
    await respond(interaction, CommandResult(text))  # type: ignore[arg-type]

    vias = [s.via for s in interaction.shown]
    assert len(vias) >= 3 and vias == ["response"] + ["followup"] * (len(vias) - 1)
    assert all(s.ephemeral and len(s.content or "") <= MESSAGE_LIMIT for s in interaction.shown)
    assert "\n".join(interaction.texts()) == text


# --------------------------------------------------------------------------------------------
# The adapter's life cycle


async def test_start_logs_in_with_the_token_and_connects_in_the_background(bot: Bot) -> None:
    adapter = adapter_of(bot, "secret-token")
    client: Any = adapter.client
    logins: list[str] = []
    connected, closed = asyncio.Event(), asyncio.Event()

    async def login(token: str) -> None:
        logins.append(token)

    async def connect() -> None:
        connected.set()
        await closed.wait()

    async def close() -> None:
        closed.set()

    client.login, client.connect, client.close = login, connect, close

    await adapter.start()
    assert logins == ["secret-token"]
    await asyncio.wait_for(connected.wait(), timeout=10)  # start() returned; the gateway runs on
    await asyncio.wait_for(adapter.close(), timeout=10)
    assert closed.is_set()


async def test_a_refused_token_is_reported_without_the_token(bot: Bot) -> None:
    adapter = adapter_of(bot, "wrong-token")
    client: Any = adapter.client
    closed: list[bool] = []

    async def login(token: str) -> None:
        raise discord.LoginFailure("Improper token has been passed.")

    async def close() -> None:
        closed.append(True)

    client.login, client.close = login, close
    with pytest.raises(BotLoginFailed, match="DISCORD_TOKEN") as raised:
        await adapter.start()
    assert "wrong-token" not in str(raised.value)
    assert closed == [True]  # the HTTP session login opened is not left behind


async def test_start_without_a_token_says_so(bot: Bot) -> None:
    adapter = adapter_of(bot)
    with pytest.raises(ValueError, match="DISCORD_TOKEN"):
        await adapter.start()


async def test_a_refused_message_content_intent_is_explained_in_the_log(
    bot: Bot, caplog: pytest.LogCaptureFixture
) -> None:
    adapter = adapter_of(bot, "token")
    client: Any = adapter.client
    failed = asyncio.Event()

    async def login(token: str) -> None:
        return None

    async def connect() -> None:
        failed.set()
        raise discord.PrivilegedIntentsRequired(shard_id=None)

    client.login, client.connect = login, connect
    with caplog.at_level(logging.ERROR, logger="bot"):
        await adapter.start()
        await failed.wait()
        for _ in range(3):  # the task's done callback runs on a later loop iteration
            await asyncio.sleep(0)
    assert any("Message Content Intent" in record.getMessage() for record in caplog.records)


async def _until_the_model_is_asked(generator: FakeGenerator) -> None:
    while not generator.calls:
        await asyncio.sleep(0.01)


async def test_shutdown_lets_a_turn_in_flight_reply_and_takes_no_new_ones(world: World) -> None:
    generator = world.bot.harness.generator
    generator.release = threading.Event()
    mention = f"<@{world.me.id}> 안녕"
    try:
        await post(mention, channel=world.channel, author=world.alice, wait=False)
        await asyncio.wait_for(_until_the_model_is_asked(generator), timeout=10)
        finishing = asyncio.create_task(world.bot.client.finish_turns(grace_s=30))
        await asyncio.sleep(0)  # shutdown has begun
        await post(mention, channel=world.channel, author=world.bob, wait=False)
        generator.release.set()
        await asyncio.wait_for(finishing, timeout=30)
        await settle()
    finally:
        generator.release.set()

    (sent,) = world.recorder.take()
    assert sent.content and sent.content.startswith("그렇구나!")
    assert [request.prompt for request in generator.requests_for(Task.OUTPUT_MESSAGE)] == ["안녕 (답변 시작)"]


async def test_shutdown_cancels_a_turn_that_outlives_the_grace_period(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    generator = world.bot.harness.generator
    generator.release = threading.Event()
    try:
        await post(f"<@{world.me.id}> 안녕", channel=world.channel, author=world.alice, wait=False)
        await asyncio.wait_for(_until_the_model_is_asked(generator), timeout=10)
        with caplog.at_level(logging.WARNING, logger="bot"):
            await asyncio.wait_for(world.bot.client.finish_turns(grace_s=0.05), timeout=10)
    finally:
        generator.release.set()

    assert world.recorder.take() == []
    assert any("cancelling 1 turn" in record.getMessage() for record in caplog.records)


async def test_commands_are_published_once_globally_or_to_the_dev_guild(bot: Bot) -> None:
    synced: list[discord.abc.Snowflake | None] = []

    def fake_sync(client: OhloraClient, fail_first: bool = False) -> None:
        async def sync(*, guild: discord.abc.Snowflake | None = None) -> list[Any]:
            synced.append(guild)
            if fail_first and len(synced) == 1:
                raise discord.HTTPException(_Response(500), "server error")
            return []

        client.tree.sync = sync  # type: ignore[method-assign]

    fake_sync(bot.client)
    await bot.client.on_ready()
    await bot.client.on_ready()  # a resume fires on_ready again
    assert synced == [None]

    synced.clear()
    dev = OhloraClient(
        bot.commands, Inbox(bot.harness.store, "discord"), intents=discord.Intents.all(), sync_guild_id=GUILD_ID
    )
    fake_sync(dev, fail_first=True)
    await dev.on_ready()
    await dev.on_ready()
    await dev.on_ready()
    assert [guild.id if guild else None for guild in synced] == [GUILD_ID, GUILD_ID]
    assert dev.tree.get_command("memory", guild=discord.Object(id=GUILD_ID)) is not None


class _Response:
    """The two fields `discord.HTTPException` reads from an HTTP response."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.reason = "error"


async def test_mydata_is_a_private_json_file_of_only_your_data(bot: Bot) -> None:
    await tell(bot, ALICE, "나 떡볶이 좋아해")
    interaction = member_interaction(ALICE)
    await invoke(bot.tree, "mydata", interaction)
    (shown,) = interaction.shown
    assert shown.ephemeral
    ((filename, data),) = shown.files
    assert filename.endswith(".json")
    export = json.loads(data)
    assert export["user"] == f"discord:{ALICE.id}"
    assert [turn["message"] for turn in export["turns"]] == ["나 떡볶이 좋아해"]
