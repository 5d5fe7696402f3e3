"""Two servers: Manage Server in one reaches that server's settings and nothing of anyone's data.

The bot is in servers A and B (dpytest). A user of B, and a user who only ever writes to her in
DMs, leave memories, summaries and turns; a member with Manage Server in A then tries every admin
command on them. "Nothing changed" is the whole SQLite database, dumped before and after.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext.test import backend

from bot.commands import NOT_ADMIN_TEXT, Commands
from bot.discord_bot import DiscordAdapter
from bot.discord_commands import OTHER_SERVER_TEXT
from bot.inbox import Inbox
from core.config import Settings
from core.store import SqliteStore, chat_scope
from tests.discord_harness import SETTLE_TIMEOUT_S, FakeInteraction, invoke, post
from tests.fakes import FACES, Harness, make_harness

LISTED_ADMIN = discord.Object(id=600000000000000099)
"""In OHLORA_ADMIN_IDS; no permissions in either server."""
LONER_ID = 600000000000000098
"""A user in no server the bot is in: she only talks to them in DMs."""


def dump(path: Path) -> list[str]:
    """Every row of every table, and the schema, as SQL text."""
    with closing(sqlite3.connect(path)) as database:
        return list(database.iterdump())


@dataclass
class World:
    database: Path
    harness: Harness
    adapter: DiscordAdapter
    guild_a: discord.Guild
    channel_a: discord.TextChannel
    channel_b: discord.TextChannel
    moderator: discord.Member
    """Manage Server in A, not in OHLORA_ADMIN_IDS."""
    member_b: discord.Member
    loner: discord.User

    def as_moderator(self) -> FakeInteraction:
        return FakeInteraction(
            user=self.moderator,
            channel_id=self.channel_a.id,
            guild_id=self.guild_a.id,
            permissions=discord.Permissions(manage_guild=True),
        )

    def as_listed_admin(self) -> FakeInteraction:
        return FakeInteraction(user=LISTED_ADMIN, channel_id=self.channel_a.id, guild_id=self.guild_a.id)

    async def run(self, interaction: FakeInteraction, path: str, **arguments: Any) -> list[str]:
        """`/path`; what the caller saw, every part of it ephemeral."""
        await invoke(self.adapter.client.tree, path, interaction, **arguments)
        assert interaction.shown and all(shown.ephemeral for shown in interaction.shown), path
        return interaction.texts()


@pytest.fixture
async def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[World]:
    monkeypatch.chdir(tmp_path)  # dpytest writes every file the bot sends into the working directory
    database = tmp_path / "ohlora.sqlite3"
    store = await SqliteStore.open(database)
    harness = make_harness(store=store)
    admin_ids = frozenset({f"discord:{LISTED_ADMIN.id}"})
    adapter = DiscordAdapter(
        Commands(harness.engine, store, admin_ids=admin_ids, model_profile="fake"),
        Settings(_env_file=None, admin_ids=admin_ids),  # type: ignore[call-arg]
        inbox=Inbox(store, "discord"),
        intents=discord.Intents.all(),
    )
    try:
        dpytest.configure(adapter.client, guilds=2, text_channels=1, voice_channels=0, members=1)
        await adapter.client._async_setup_hook()
        config = dpytest.get_config()
        (guild_a, _), (channel_a, channel_b), (moderator, member_b) = config.guilds, config.channels, config.members
        assert isinstance(channel_a, discord.TextChannel) and isinstance(channel_b, discord.TextChannel)
        assert moderator.guild == guild_a and member_b.guild != guild_a
        loner = backend.make_user("혼자", 9, id_num=LONER_ID)
        yield World(database, harness, adapter, guild_a, channel_a, channel_b, moderator, member_b, loner)
    finally:
        await harness.worker.stop()
        await asyncio.wait_for(dpytest.empty_queue(), timeout=SETTLE_TIMEOUT_S)
        await store.close()


async def talk(world: World) -> None:
    """B's member and the DM-only user each tell her something she remembers."""
    me = world.adapter.client.user
    assert me is not None
    await post(f"<@{me.id}> 나 떡볶이 좋아해", channel=world.channel_b, author=world.member_b)
    await post("나 떡볶이 좋아해", channel=await world.loner.create_dm(), author=world.loner)
    store = world.harness.store
    for user in (world.member_b, world.loner):
        assert [m.text for m in await store.memories(f"discord:{user.id}")] == ["[좋아하는 음식: 떡볶이]"]
    await store.set_blocked(f"discord:{world.loner.id}", True)  # so that unblock would change something


async def test_manage_server_in_one_server_reaches_no_users_data_and_no_other_servers_channels(
    world: World,
) -> None:
    await talk(world)
    before, model_calls = dump(world.database), len(world.harness.generator.calls)

    for target in (world.member_b, world.loner):
        for path in ("admin memory view", "admin memory clear", "admin block", "admin unblock"):
            assert await world.run(world.as_moderator(), path, user=target) == [NOT_ADMIN_TEXT], (path, target)
    assert await world.run(world.as_moderator(), "admin stats") == [NOT_ADMIN_TEXT]
    for path in ("admin channel allow", "admin channel deny"):
        assert await world.run(world.as_moderator(), path, channel=world.channel_b) == [OTHER_SERVER_TEXT], path

    assert dump(world.database) == before
    assert len(world.harness.generator.calls) == model_calls


async def test_manage_server_sets_its_own_servers_channels_and_face(world: World) -> None:
    store = world.harness.store
    await world.run(world.as_moderator(), "admin channel allow", channel=world.channel_a)
    assert await store.allowed_channels("discord") == [str(world.channel_a.id)]
    await world.run(world.as_moderator(), "admin channel deny")  # this channel: A's
    assert await store.allowed_channels("discord") == []
    await world.run(world.as_moderator(), "admin face set", number=FACES[1])
    assert await store.face_for(chat_scope("discord", str(world.channel_a.id))) == FACES[1]


async def test_the_bots_own_admins_have_the_bot_wide_powers_but_not_another_servers_channels(world: World) -> None:
    await talk(world)
    store = world.harness.store

    (viewed,) = await world.run(world.as_listed_admin(), "admin memory view", user=world.member_b)
    assert "[좋아하는 음식: 떡볶이]" in viewed
    await world.run(world.as_listed_admin(), "admin memory clear", user=world.loner)
    assert await store.memories(f"discord:{world.loner.id}") == []
    await world.run(world.as_listed_admin(), "admin unblock", user=world.loner)
    await world.run(world.as_listed_admin(), "admin block", user=world.member_b)
    assert await store.blocked_users() == [f"discord:{world.member_b.id}"]
    (stats,) = await world.run(world.as_listed_admin(), "admin stats")
    assert "turns: 2" in stats

    channel_b = world.channel_b
    assert await world.run(world.as_listed_admin(), "admin channel allow", channel=channel_b) == [OTHER_SERVER_TEXT]
    assert await store.allowed_channels("discord") == []
