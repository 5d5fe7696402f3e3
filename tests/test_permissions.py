"""Every admin command, on both platforms, from everyone who is not an admin: refused, nothing changed.

The admin commands are found, not listed: on Telegram from the adapter's admin menu (checked
against the handlers it registers), on Discord by walking the `/admin` command group and building
arguments from each command's parameters. A command added later is covered without touching this
file. "Nothing changed" is the whole database, dumped before and after.

On Discord, Manage Server covers that server's own settings (`CHAT_SETTINGS`) and nothing else:
every other admin command, one added later included, is bot-wide and refused to server managers.

Non-admins include the near misses: a Discord member with every permission except Manage Server
and Administrator, a DM whose interaction claims Administrator, a Telegram reply aimed at another
user, and a user whose id is an admin's id on the other platform.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import discord
import numpy as np
import pytest
from discord import app_commands
from discord.enums import AppCommandOptionType
from pydantic import SecretStr
from telegram import Update
from telegram.ext import CommandHandler, TypeHandler

from bot.commands import NOT_ADMIN_TEXT, Commands
from bot.discord_bot import DiscordAdapter
from bot.inbox import Inbox
from bot.telegram_bot import ADMIN_COMMANDS, PUBLIC_COMMANDS, TelegramAdapter
from core.config import Settings
from core.store import NewMemory, SqliteStore, TurnRecord, chat_scope
from core.types import ExpressionScores
from tests import fake_telegram_api
from tests.discord_harness import FakeChannel, FakeInteraction, invoke
from tests.fake_telegram_api import FakeBotApi, Json, group_chat, user
from tests.fakes import FACES, Harness, make_harness

TELEGRAM_ADMIN = 777
DISCORD_ADMIN = 600000000000000004
ADMIN_IDS = frozenset({f"telegram:{TELEGRAM_ADMIN}", f"discord:{DISCORD_ADMIN}"})

ALICE = user(1001, "앨리스")
BOB = user(1002, "밥")
CAROL = user(1003, "캐롤")
ADMIN = user(TELEGRAM_ADMIN, "관리자")
TWIN = user(DISCORD_ADMIN, "디스코드 관리자와 같은 번호")
"""A Telegram user whose id is a Discord admin's id: not an admin here."""
GROUP = group_chat()
GROUP_ID = int(GROUP["id"])

GUILD_ID = 800000000000000001
OTHER_GUILD_ID = 800000000000000002
CHANNEL_ID = 700000000000000001
OTHER_CHANNEL_ID = 700000000000000002
FOREIGN_CHANNEL_ID = 700000000000000003
"""A channel of another server the bot is in."""
MEMBER = discord.Object(id=600000000000000002)
VICTIM = discord.Object(id=600000000000000001)


# --------------------------------------------------------------------------------------------
# The whole database, before and after


def dump(path: Path) -> list[str]:
    """Every row of every table, and the schema, as SQL text.

    The inbox is left out: a refused command is still an event received and finished, which is
    bookkeeping about delivery, not anyone's data or settings.
    """
    with closing(sqlite3.connect(path)) as database:
        return [line for line in database.iterdump() if not line.startswith('INSERT INTO "inbox"')]


async def seed(store: SqliteStore) -> None:
    """Something for every admin command to change: memories and summaries, a block, a pinned
    face, an allowed channel, logged turns and expressions."""
    victims = ("telegram:1001", "telegram:1002", f"discord:{VICTIM.id}", f"discord:{MEMBER.id}")
    for number, user_key in enumerate(victims):
        platform = user_key.split(":")[0]
        await store.commit_turn(
            TurnRecord(
                platform=platform,
                user_key=user_key,
                conversation_key=f"{platform}:room:{user_key}",
                prompt="나 떡볶이 좋아해",
                final_input="나 떡볶이 좋아해",
                answer=" 나도 좋아!",
                status="ok",
                used_memory=None,
                expression=None,
                scores=ExpressionScores(-0.4, -0.6, 0.1 * number),
                summary="떡볶이 이야기",
                timings={"total": 0.1},
                created_at=1000.0 + number,
            ),
            NewMemory(key="좋아하는 음식", value="떡볶이", text="[좋아하는 음식: 떡볶이]", embedding=np.ones(4)),
        )
    await store.set_blocked("telegram:1002", True)
    await store.set_blocked(f"discord:{VICTIM.id}", True)
    for platform, chat in (("telegram", str(GROUP_ID)), ("telegram", "1001"), ("discord", str(CHANNEL_ID))):
        await store.set_face(chat_scope(platform, chat), FACES[0])
    await store.set_channel_allowed("discord", str(OTHER_CHANNEL_ID), True)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    store = await SqliteStore.open(tmp_path / "ohlora.sqlite3")
    await seed(store)
    built = make_harness(store=store)
    try:
        yield built
    finally:
        await built.worker.stop()
        await store.close()


def commands_over(harness: Harness) -> Commands:
    return Commands(harness.engine, harness.store, admin_ids=ADMIN_IDS, model_profile="fake")


# --------------------------------------------------------------------------------------------
# Telegram


ADMIN_ONLY = tuple(command.command for command in ADMIN_COMMANDS if command not in PUBLIC_COMMANDS)
TELEGRAM_ARGUMENTS: tuple[str, ...] = (
    "",
    " 1002",
    " telegram:1002",
    f" discord:{VICTIM.id}",
    f" {FACES[1]}",
    " default",
    " 1002 1003",
    " @ohlora_test_bot",
    " " + "9" * 40,
)


@dataclass
class TelegramBot:
    api: FakeBotApi
    adapter: TelegramAdapter
    handled: set[int] = field(default_factory=set)

    async def say(self, from_user: Json, text: str, **options: Any) -> Json:
        update_id, message = self.api.send_message(from_user, text, **options)
        await self.api.wait_until(lambda _: update_id in self.handled, f"update {update_id} handled")
        return message


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBotApi]:
    # A burst of commands opens many connections at once: http.server's backlog of 5 would reset some,
    # and without TCP_NODELAY every answer waits ~40 ms for a delayed ACK.
    monkeypatch.setattr(ThreadingHTTPServer, "request_queue_size", 1024)
    monkeypatch.setattr(fake_telegram_api._Handler, "disable_nagle_algorithm", True)
    with FakeBotApi() as server:
        yield server


@pytest.fixture
async def telegram(api: FakeBotApi, harness: Harness) -> AsyncIterator[TelegramBot]:
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_token=SecretStr(api.token),
        telegram_api_base_url=api.base_url,
        discord_token=None,
        admin_ids=ADMIN_IDS,
    )
    adapter = TelegramAdapter(commands_over(harness), settings, inbox=Inbox(harness.store, "telegram"))
    bot = TelegramBot(api, adapter)

    async def mark_handled(update: Update, _: object) -> None:
        bot.handled.add(update.update_id)

    adapter.application.add_handler(TypeHandler(Update, mark_handled), group=1)
    await adapter.start()
    try:
        yield bot
    finally:
        await adapter.close()


def registered_commands(adapter: TelegramAdapter) -> set[str]:
    handlers = itertools.chain.from_iterable(adapter.application.handlers.values())
    return {name for handler in handlers if isinstance(handler, CommandHandler) for name in handler.commands}


async def test_every_telegram_command_is_in_a_menu_and_the_admin_menu_has_admin_commands(
    telegram: TelegramBot,
) -> None:
    """So that an admin command added later lands in ADMIN_ONLY, and so in the test below."""
    assert registered_commands(telegram.adapter) == {command.command for command in ADMIN_COMMANDS}
    assert {"stats", "setface", "block", "unblock", "memoryof"} <= set(ADMIN_ONLY)


async def test_telegram_refuses_every_admin_command_to_non_admins(
    telegram: TelegramBot, harness: Harness, tmp_path: Path
) -> None:
    database = tmp_path / "ohlora.sqlite3"
    carols_message = await telegram.say(CAROL, "@ohlora_test_bot 안녕", chat=GROUP)
    before = dump(database)  # Carol's turn is logged; from here on nothing may change
    generator_calls = len(harness.generator.calls)
    sent_before = len(telegram.api.sent())
    senders: list[tuple[Json, dict[str, Any]]] = [
        (ALICE, {}),
        (TWIN, {}),
        (ALICE, {"chat": GROUP}),
        (ALICE, {"chat": GROUP, "reply_to": carols_message}),
    ]

    asked: dict[int, str] = {}
    for command, arguments in itertools.product(ADMIN_ONLY, TELEGRAM_ARGUMENTS):
        for sender, options in senders:
            text = f"/{command}{'@ohlora_test_bot' if 'chat' in options else ''}{arguments}"
            update_id, message = telegram.api.send_message(sender, text, **options)
            asked[update_id] = f"{text} from {sender['id']} in {message['chat']['id']}"
    await telegram.api.wait_until(lambda _: telegram.handled >= set(asked), "every command handled", timeout_s=60)

    answers = telegram.api.sent()[sent_before:]
    assert len(asked) == len(ADMIN_ONLY) * len(TELEGRAM_ARGUMENTS) * len(senders)
    assert len(answers) == len(asked)
    refused = [answer for answer in answers if answer.text == NOT_ADMIN_TEXT]
    assert len(refused) == len(answers), [answer.text for answer in answers if answer.text != NOT_ADMIN_TEXT]
    assert dump(database) == before
    assert len(harness.generator.calls) == generator_calls


async def test_the_same_telegram_commands_from_an_admin_go_through(telegram: TelegramBot, tmp_path: Path) -> None:
    """The refusals above are the admin check, not calls that could not work anyway."""
    database = tmp_path / "ohlora.sqlite3"
    before = dump(database)
    for command in ADMIN_ONLY:
        for arguments in ("", " 1002", f" {FACES[1]}"):
            sent_before = len(telegram.api.sent(TELEGRAM_ADMIN))
            await telegram.say(ADMIN, f"/{command}{arguments}")
            answers = [call.text for call in telegram.api.sent(TELEGRAM_ADMIN)[sent_before:]]
            assert answers and NOT_ADMIN_TEXT not in answers, f"/{command}{arguments}"
    assert dump(database) != before


# --------------------------------------------------------------------------------------------
# Discord


def discord_tree(harness: Harness) -> app_commands.CommandTree:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    inbox = Inbox(harness.store, "discord")
    return DiscordAdapter(commands_over(harness), settings, inbox=inbox, intents=discord.Intents.default()).client.tree


def admin_group(tree: app_commands.CommandTree) -> app_commands.Group:
    group = tree.get_command("admin")
    assert isinstance(group, app_commands.Group)
    return group


_VALUES: dict[AppCommandOptionType, Sequence[Any]] = {
    AppCommandOptionType.user: (VICTIM, MEMBER),
    AppCommandOptionType.channel: (
        FakeChannel(id=OTHER_CHANNEL_ID, guild=discord.Object(id=GUILD_ID)),
        FakeChannel(id=CHANNEL_ID, guild=discord.Object(id=GUILD_ID)),
        FakeChannel(id=FOREIGN_CHANNEL_ID, guild=discord.Object(id=OTHER_GUILD_ID)),
    ),
    AppCommandOptionType.integer: (FACES[1], FACES[0], 0),
    AppCommandOptionType.string: ("default", "telegram:1001"),
    AppCommandOptionType.boolean: (True, False),
    AppCommandOptionType.number: (1.0,),
    AppCommandOptionType.mentionable: (VICTIM,),
    AppCommandOptionType.role: (discord.Object(id=GUILD_ID),),
}


def argument_sets(command: app_commands.Command[Any, ..., Any]) -> list[dict[str, Any]]:
    """Calls of `command`: each value its parameters' types allow here, and optional ones left out."""
    choices: list[list[tuple[str, Any]]] = []
    for parameter in command.parameters:
        values = [(parameter.name, value) for value in _VALUES[parameter.type]]
        choices.append(values if parameter.required else [*values, (parameter.name, None)])
    return [
        {name: value for name, value in combination if value is not None} for combination in itertools.product(*choices)
    ]


def everything_but_admin() -> discord.Permissions:
    permissions = discord.Permissions.all()
    permissions.manage_guild = False
    permissions.administrator = False
    return permissions


NON_ADMINS = {
    "member": lambda: FakeInteraction(user=MEMBER, channel_id=CHANNEL_ID, guild_id=GUILD_ID),
    "member with every other permission": lambda: FakeInteraction(
        user=MEMBER, channel_id=CHANNEL_ID, guild_id=GUILD_ID, permissions=everything_but_admin()
    ),
    "DM claiming administrator": lambda: FakeInteraction(
        user=MEMBER, channel_id=CHANNEL_ID, permissions=discord.Permissions(administrator=True)
    ),
    "telegram admin's id": lambda: FakeInteraction(
        user=discord.Object(id=TELEGRAM_ADMIN), channel_id=CHANNEL_ID, guild_id=GUILD_ID
    ),
}


async def test_discord_refuses_every_admin_command_to_non_admins(harness: Harness, tmp_path: Path) -> None:
    database = tmp_path / "ohlora.sqlite3"
    before = dump(database)
    tree = discord_tree(harness)
    commands = [command for command in admin_group(tree).walk_commands() if isinstance(command, app_commands.Command)]
    assert len(commands) >= 8

    tried = 0
    for command in commands:
        for arguments in argument_sets(command):
            for who, make_interaction in NON_ADMINS.items():
                interaction = make_interaction()
                await invoke(tree, command.qualified_name, interaction, **arguments)
                shown = [(s.via, s.content, s.ephemeral, s.files) for s in interaction.shown]
                assert shown == [("response", NOT_ADMIN_TEXT, True, ())], (
                    f"/{command.qualified_name} {arguments} by {who}"
                )
                tried += 1

    assert tried >= len(commands) * len(NON_ADMINS)
    assert dump(database) == before
    assert harness.generator.calls == []


async def test_the_same_calls_from_an_admin_do_change_things(harness: Harness, tmp_path: Path) -> None:
    """The refusal above is the admin check, not a broken call: an admin's calls go through."""
    database = tmp_path / "ohlora.sqlite3"
    before = dump(database)
    tree = discord_tree(harness)

    for command in admin_group(tree).walk_commands():
        if not isinstance(command, app_commands.Command):
            continue
        for arguments in argument_sets(command):
            interaction = FakeInteraction(
                user=discord.Object(id=DISCORD_ADMIN), channel_id=CHANNEL_ID, guild_id=GUILD_ID
            )
            await invoke(tree, command.qualified_name, interaction, **arguments)
            assert NOT_ADMIN_TEXT not in interaction.texts(), command.qualified_name

    assert dump(database) != before


CHAT_SETTINGS = {"admin channel allow", "admin channel deny", "admin face set"}
"""What Manage Server lets a member change in that server; every other admin command is bot-wide."""

SERVER_MANAGERS = {
    "manage server": lambda: FakeInteraction(
        user=MEMBER, channel_id=CHANNEL_ID, guild_id=GUILD_ID, permissions=discord.Permissions(manage_guild=True)
    ),
    "administrator": lambda: FakeInteraction(
        user=MEMBER, channel_id=CHANNEL_ID, guild_id=GUILD_ID, permissions=discord.Permissions(administrator=True)
    ),
}


async def test_discord_refuses_every_bot_wide_command_to_server_managers(harness: Harness, tmp_path: Path) -> None:
    """Anyone's memories, blocks and the service's stats are not one server's to manage."""
    database = tmp_path / "ohlora.sqlite3"
    before = dump(database)
    tree = discord_tree(harness)
    bot_wide = [
        command
        for command in admin_group(tree).walk_commands()
        if isinstance(command, app_commands.Command) and command.qualified_name not in CHAT_SETTINGS
    ]
    assert {"admin memory view", "admin memory clear", "admin block", "admin unblock", "admin stats"} <= {
        command.qualified_name for command in bot_wide
    }

    for command in bot_wide:
        for arguments in argument_sets(command):
            for who, make_interaction in SERVER_MANAGERS.items():
                interaction = make_interaction()
                await invoke(tree, command.qualified_name, interaction, **arguments)
                shown = [(s.via, s.content, s.ephemeral, s.files) for s in interaction.shown]
                assert shown == [("response", NOT_ADMIN_TEXT, True, ())], (
                    f"/{command.qualified_name} {arguments} by {who}"
                )

    assert dump(database) == before
