"""Oh-LoRA on Discord (discord.py 2.x): messages in, replies with her face out, and slash commands.

This module only translates. Who may talk to her, what she answers and who counts as an admin
are decided by `Commands` (and the engine behind it); here a Discord message becomes an
`IncomingMessage`, a `Reply` becomes Discord messages, and an interaction becomes a `Caller`.

The pure rules (`InboundMessage`, `should_answer`, `strip_mention`, `split_message`,
`suggestions`) take no Discord objects, so they are tested directly; the client and the
commands around them are thin.

The bot reads message text, which needs the privileged Message Content intent: enable it for
the application in the Discord developer portal (Bot → Privileged Gateway Intents → Message
Content Intent). Without it the gateway refuses the connection and the log says so.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

import discord
from discord import app_commands

from bot.commands import Caller, CommandResult, Commands, user_key
from bot.errors import BotLoginFailed
from core.config import Settings
from core.engine import ERROR_TEXT
from core.types import IncomingMessage, RenderedFace, Reply, ReplyKind

logger = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
"""Discord's limit on a message's content, counted in code points (Python's `len`)."""
CHOICES_LIMIT = 25
"""Discord shows at most 25 autocomplete choices."""
CHOICE_TEXT_LIMIT = 100
"""Longest name or string value of an autocomplete choice."""
CONFIRM_TIMEOUT_S = 120.0

COMMAND_ERROR_TEXT = "앗, 명령을 처리하다가 문제가 생겼어. 😢 잠시 뒤에 다시 해 줄래?"
BAD_ARGUMENT_TEXT = "입력한 값을 알아듣지 못했어. 다시 확인해 줄래? 🤔"
NOT_HERE_TEXT = "이 명령은 여기서는 쓸 수 없어."
COOLDOWN_TEXT = "조금만 천천히! {seconds:.0f}초 뒤에 다시 해 줘."
FORGET_CANCELLED_TEXT = "알겠어, 아무것도 지우지 않았어. 😊"
FORGET_EXPIRED_TEXT = "대답이 없어서 취소했어. 지우려면 /forget 을 다시 써 줘."
NOT_YOUR_BUTTON_TEXT = "이 버튼은 명령을 쓴 사람만 누를 수 있어."

SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
"""Her answers can echo what users typed; an echoed @everyone or <@id> must never ping anyone."""


def default_intents() -> discord.Intents:
    """Guild and DM messages with their text; `message_content` must be enabled in the portal."""
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


# --------------------------------------------------------------------------------------------
# Messages: the pure rules


@dataclass(frozen=True)
class InboundMessage:
    """A Discord message reduced to the facts that decide whether and what Oh-LoRA answers."""

    author_id: int
    author_is_bot: bool
    """Other bots and webhooks, and her own messages: answering them could start a loop."""
    channel_id: int
    parent_channel_id: int | None
    """A thread's channel: allowing a channel lets her talk in its threads too."""
    in_dm: bool
    is_system: bool
    """Joins, pins, boosts: nobody said anything."""
    mentions_bot: bool
    replies_to_bot: bool
    mentions_everyone: bool
    text: str
    """The content without her own mentions."""

    @classmethod
    def from_discord(cls, message: discord.Message, me: discord.abc.User) -> InboundMessage:
        """`me` is the bot's own user. Users may also mention the role Discord made for the bot."""
        guild = message.guild
        bot_role = guild.self_role if guild is not None else None
        bot_role_id = bot_role.id if bot_role is not None else None
        referenced = message.reference.resolved if message.reference is not None else None
        channel = message.channel
        return cls(
            author_id=message.author.id,
            author_is_bot=message.author.bot,
            channel_id=channel.id,
            parent_channel_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
            in_dm=guild is None,
            is_system=message.is_system(),
            mentions_bot=me.id in message.raw_mentions
            or (bot_role_id is not None and bot_role_id in message.raw_role_mentions),
            replies_to_bot=isinstance(referenced, discord.Message) and referenced.author.id == me.id,
            mentions_everyone=message.mention_everyone,
            text=strip_mention(message.content, me.id, bot_role_id),
        )

    def to_incoming(self) -> IncomingMessage:
        return IncomingMessage(
            platform=PLATFORM, user_id=str(self.author_id), chat_id=str(self.channel_id), text=self.text
        )


async def should_answer(message: InboundMessage, channel_allowed: Callable[[str], Awaitable[bool]]) -> bool:
    """Her manners: always in DMs; in servers when spoken to, or anywhere an admin allowed.

    `channel_allowed` is only awaited when the answer depends on it, so the many server
    messages that are not for her cost no storage read. An @everyone/@here announcement is not
    talking to her, even in an allowed channel.
    """
    if message.author_is_bot or message.is_system:
        return False
    if message.in_dm or message.mentions_bot or message.replies_to_bot:
        return True
    if message.mentions_everyone:
        return False
    for channel_id in (message.channel_id, message.parent_channel_id):
        if channel_id is not None and await channel_allowed(str(channel_id)):
            return True
    return False


def strip_mention(text: str, bot_id: int, role_id: int | None = None) -> str:
    """`text` without the bot's mentions (`<@id>`, `<@!id>`, its role `<@&id>`) and the spaces around them.

    The model should read what was said to her, not a snowflake; a run of mentions in the middle
    of a sentence leaves one space.
    """
    targets = [rf"<@!?{bot_id}>"]
    if role_id is not None:
        targets.append(rf"<@&{role_id}>")
    mentions = re.compile(r"(?:[ \t]*(?:" + "|".join(targets) + r"))+[ \t]*")
    return mentions.sub(" ", text).strip()


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Parts of at most `limit` characters, cut at a line break, else a space, else anywhere.

    Whitespace at the cuts and ends goes (Discord drops it anyway) and no part is blank, so an
    empty text gives no parts.
    """
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]  # a separator right after the limit is still a clean cut
        cut = window.rfind("\n")
        if cut <= 0:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = limit
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def fit_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """The first part of `text` that fits one message, marked with "…" when something was cut."""
    parts = split_message(text, limit - 2)
    if not parts:
        return ""
    return parts[0] + "\n…" if len(parts) > 1 else parts[0]


def suggestions(options: Iterable[str], current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete: the options containing what was typed so far, ignoring case and spaces."""
    typed = "".join(current.split()).casefold()
    choices: list[app_commands.Choice[str]] = []
    for option in dict.fromkeys(options):
        if len(option) > CHOICE_TEXT_LIMIT or typed not in "".join(option.split()).casefold():
            continue
        choices.append(app_commands.Choice(name=option, value=option))
        if len(choices) == CHOICES_LIMIT:
            break
    return choices


def face_choices(faces: Iterable[int], current: str) -> list[app_commands.Choice[int]]:
    """Autocomplete for face numbers: those whose digits contain what was typed."""
    typed = current.strip()
    matching = [face for face in sorted(set(faces)) if typed in str(face)]
    return [app_commands.Choice(name=f"#{face}", value=face) for face in matching[:CHOICES_LIMIT]]


def face_file(image: RenderedFace) -> discord.File:
    return discord.File(io.BytesIO(image.data), filename=image.filename)


def upload_limit(guild: discord.Guild | None) -> int:
    """Bytes a bot may attach here: boosted servers allow more, DMs the default."""
    return guild.filesize_limit if guild is not None else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES


# --------------------------------------------------------------------------------------------
# Messages: the client


async def send_reply(message: discord.Message, reply: Reply) -> None:
    """The reply as an answer to `message`: text in parts Discord accepts, her face on the first.

    `fail_if_not_exists=False`: a user who deleted the message while she was thinking still gets
    the answer, as a plain message.
    """
    parts = split_message(reply.text)
    first: dict[str, Any] = {"reference": message.to_reference(fail_if_not_exists=False)}
    if parts:
        first["content"] = parts[0]
    if reply.image is not None:
        size, limit = len(reply.image.data), upload_limit(message.guild)
        if size <= limit:
            first["file"] = face_file(reply.image)
        else:
            logger.warning("Discord: a face of %d bytes is over the upload limit of %d bytes", size, limit)
    if "content" not in first and "file" not in first:
        return
    await message.channel.send(**first)
    for part in parts[1:]:
        await message.channel.send(part)


class OhloraClient(discord.Client):
    """The gateway connection: answers messages and carries the slash command tree."""

    def __init__(
        self,
        commands: Commands,
        *,
        intents: discord.Intents | None = None,
        sync_guild_id: int | None = None,
    ) -> None:
        super().__init__(intents=intents or default_intents(), allowed_mentions=SAFE_MENTIONS)
        self._commands = commands
        self._sync_guild_id = sync_guild_id
        self._synced = False
        self._closing = False
        self._in_flight: set[asyncio.Task[Any]] = set()
        self.tree = OhloraTree(self, commands)

    async def on_ready(self) -> None:
        """Publish the slash commands once per process (`on_ready` fires again on every resume)."""
        logger.info("Discord: connected as %s (id %s)", self.user, self.user.id if self.user else "?")
        if self._synced:
            return
        self._synced = True
        try:
            if self._sync_guild_id is None:
                synced = await self.tree.sync()
            else:
                # Guild commands appear at once; global ones can take a while to reach every client.
                guild = discord.Object(id=self._sync_guild_id)
                self.tree.copy_global_to(guild=guild)
                synced = await self.tree.sync(guild=guild)
        except discord.HTTPException:
            self._synced = False
            logger.exception("Discord: could not publish the slash commands; retrying on the next ready")
            return
        logger.info("Discord: %d slash commands published", len(synced))

    async def on_message(self, message: discord.Message) -> None:
        if self._closing or self.user is None:
            return
        inbound = InboundMessage.from_discord(message, self.user)
        async with self._commands.in_order(f"{PLATFORM}:{message.author.id}"):
            if not await should_answer(inbound, self._channel_allowed):
                return
            task = asyncio.current_task()
            assert task is not None  # discord.py runs every event handler as a task
            self._in_flight.add(task)
            try:
                reply = await self._turn(inbound.to_incoming(), message.channel.typing)
                if reply is not None:
                    await send_reply(message, reply)
            except discord.HTTPException as error:
                logger.warning("Discord: could not answer in channel %s: %s", message.channel.id, error)
            finally:
                self._in_flight.discard(task)

    async def finish_turns(self, grace_s: float) -> None:
        """Take no new messages; give the turns in flight `grace_s` to reply, then cancel them."""
        self._closing = True
        if not self._in_flight:
            return
        _, late = await asyncio.wait(set(self._in_flight), timeout=grace_s)
        if late:
            logger.warning("Discord: cancelling %d turn(s) still running at shutdown", len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _channel_allowed(self, channel_id: str) -> bool:
        return await self._commands.is_channel_allowed(PLATFORM, channel_id)

    async def _turn(
        self, message: IncomingMessage, typing: Callable[[], AbstractAsyncContextManager[object]]
    ) -> Reply | None:
        """The turn, or an apology when something outside the engine broke (the engine never raises)."""
        try:
            return await self._commands.chat(message, typing)
        except Exception:
            logger.exception("Discord: the turn of %s failed", message.user_key)
            return Reply(text=ERROR_TEXT, kind=ReplyKind.ERROR)


class DiscordAdapter:
    """The Discord side of the service, on the service's event loop.

    `start()` logs in (a refused token raises `BotLoginFailed` right there) and leaves the
    gateway connection running as a background task; `close()` lets the turns in flight reply
    for `shutdown_grace_s`, then disconnects.
    """

    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        *,
        intents: discord.Intents | None = None,
        sync_guild_id: int | None = None,
        shutdown_grace_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._shutdown_grace_s = shutdown_grace_s
        self.client = OhloraClient(commands, intents=intents, sync_guild_id=sync_guild_id)
        self._gateway: asyncio.Task[None] | None = None

    async def start(self) -> None:
        token = self._settings.discord_token
        if token is None:
            raise ValueError("DISCORD_TOKEN is not set")
        try:
            await self.client.login(token.get_secret_value())
        except discord.LoginFailure as error:
            await self.client.close()
            raise BotLoginFailed(
                "Discord refused DISCORD_TOKEN: copy the bot token from the developer portal "
                "(Applications → your bot → Bot → Reset Token) into .env"
            ) from error
        self._gateway = asyncio.create_task(self.client.connect(), name="discord-gateway")
        self._gateway.add_done_callback(_report_gateway_end)

    async def close(self) -> None:
        await self.client.finish_turns(self._shutdown_grace_s)
        await self.client.close()
        if self._gateway is not None:
            self._gateway.cancel()
            await asyncio.gather(self._gateway, return_exceptions=True)
            self._gateway = None


def _report_gateway_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if isinstance(error, discord.PrivilegedIntentsRequired):
        logger.error(
            "Discord refused the connection: enable the Message Content Intent for this bot in the "
            "developer portal (Bot → Privileged Gateway Intents)"
        )
    elif error is not None:
        logger.error("Discord: the gateway connection ended", exc_info=error)


# --------------------------------------------------------------------------------------------
# Slash commands


def caller_of(interaction: discord.Interaction) -> Caller:
    """The interaction's user and channel; Manage Server (or Administrator) makes a platform admin."""
    if interaction.channel_id is None:  # Discord sends one with every command
        raise app_commands.AppCommandError("an application command without a channel")
    permissions = interaction.permissions
    return Caller(
        platform=PLATFORM,
        user_id=str(interaction.user.id),
        chat_id=str(interaction.channel_id),
        platform_admin=interaction.guild_id is not None and (permissions.manage_guild or permissions.administrator),
    )


def target_key(user: discord.abc.Snowflake) -> str:
    return user_key(PLATFORM, str(user.id))


Channel = discord.TextChannel | discord.VoiceChannel | discord.Thread
"""Where people write to each other: text channels, the chat of voice channels, threads."""


async def respond(
    interaction: discord.Interaction, result: CommandResult, *, view: discord.ui.View | None = None
) -> None:
    """Answer privately, exactly once: the interaction's response (or the followup a deferral
    waits for) carries the first part with the face and the view, further parts follow it."""
    parts = split_message(result.text)
    first: dict[str, Any] = {"ephemeral": True}
    if parts:
        first["content"] = parts[0]
    if result.image is not None:
        first["file"] = face_file(result.image)
    if view is not None:
        first["view"] = view
    if interaction.response.is_done():
        await interaction.followup.send(**first)
    else:
        await interaction.response.send_message(**first)
    for part in parts[1:]:
        await interaction.followup.send(part, ephemeral=True)


def friendly_error(error: Exception) -> str | None:
    """What to tell the user about an error that is theirs to fix; None for the unexpected."""
    if isinstance(error, app_commands.CommandOnCooldown):
        return COOLDOWN_TEXT.format(seconds=error.retry_after)
    if isinstance(error, app_commands.CheckFailure):
        return NOT_HERE_TEXT
    if isinstance(error, app_commands.TransformerError):
        return BAD_ARGUMENT_TEXT
    return None


async def report_error(interaction: discord.Interaction, error: Exception) -> None:
    """Tell the user kindly, once; keep the traceback for the operator when it was not their doing."""
    text = friendly_error(error)
    if text is None:
        original = error.original if isinstance(error, app_commands.CommandInvokeError) else error
        name = interaction.command.qualified_name if interaction.command else "?"
        logger.error("Discord: /%s of user %s failed", name, interaction.user.id, exc_info=original)
        text = COMMAND_ERROR_TEXT
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True)
        else:
            await interaction.response.send_message(text, ephemeral=True)
    except discord.HTTPException as send_error:
        logger.warning("Discord: could not tell user %s about the error: %s", interaction.user.id, send_error)


class ForgetConfirmation(discord.ui.View):
    """The buttons under the `/forget` preview: nothing is deleted until "지우기" is pressed."""

    def __init__(
        self,
        commands: Commands,
        caller: Caller,
        key: str | None,
        origin: discord.Interaction,
        *,
        timeout: float = CONFIRM_TIMEOUT_S,
    ) -> None:
        super().__init__(timeout=timeout)
        self._commands = commands
        self._caller = caller
        self._key = key
        self._origin = origin
        self._decided = False

    async def interaction_check(self, interaction: discord.Interaction) -> bool:
        if interaction.user.id == self._origin.user.id:
            return True
        await interaction.response.send_message(NOT_YOUR_BUTTON_TEXT, ephemeral=True)
        return False

    @discord.ui.button(label="지우기", style=discord.ButtonStyle.danger)
    async def confirm(self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirmation]) -> None:
        if not self._decide():
            await interaction.response.defer()
            return
        result = await self._commands.forget(self._caller, self._key)
        await interaction.response.edit_message(content=result.text, view=None)

    @discord.ui.button(label="취소", style=discord.ButtonStyle.secondary)
    async def cancel(self, interaction: discord.Interaction, button: discord.ui.Button[ForgetConfirmation]) -> None:
        if not self._decide():
            await interaction.response.defer()
            return
        await interaction.response.edit_message(content=FORGET_CANCELLED_TEXT, view=None)

    def _decide(self) -> bool:
        """True for the first press only: a double click must not delete or answer twice."""
        if self._decided:
            return False
        self._decided = True
        self.stop()
        return True

    async def on_timeout(self) -> None:
        try:
            await self._origin.edit_original_response(content=FORGET_EXPIRED_TEXT, view=None)
        except discord.HTTPException as error:
            logger.debug("Discord: could not retire an expired /forget confirmation: %s", error)

    async def on_error(self, interaction: discord.Interaction, error: Exception, item: discord.ui.Item[Any]) -> None:
        await report_error(interaction, error)


class OhloraTree(app_commands.CommandTree):
    """Every slash command, and one place that turns their errors into a private apology."""

    def __init__(self, client: discord.Client, commands: Commands) -> None:
        super().__init__(client)
        for command in user_commands(commands):
            self.add_command(command)
        self.add_command(admin_commands(commands))

    async def on_error(self, interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        await report_error(interaction, error)


def user_commands(commands: Commands) -> list[app_commands.Command[Any, Any, None]]:
    """Everyone's commands: they only ever read or change the caller's own data."""

    @app_commands.command(name="memory", description="오로라가 기억하는 너에 대한 것들 보기")
    async def memory(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.memory(caller_of(interaction)))

    @app_commands.command(name="forget", description="기억 지우기: 하나, 또는 전부")
    @app_commands.describe(key="지울 기억 (비워 두면 전부)")
    async def forget(interaction: discord.Interaction, key: str | None = None) -> None:
        caller = caller_of(interaction)
        preview = await commands.forget_preview(caller, key)
        if not preview.ok:
            await respond(interaction, preview)
            return
        # One message: the buttons sit under the whole preview, and a timeout can retire them.
        confirmation = ForgetConfirmation(commands, caller, key, interaction)
        await respond(interaction, CommandResult(fit_message(preview.text)), view=confirmation)

    @forget.autocomplete("key")
    async def forget_keys(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return suggestions(await commands.memory_keys(caller_of(interaction)), current)

    @app_commands.command(name="reset", description="지금까지의 대화 요약 지우기")
    async def reset(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.reset(caller_of(interaction)))

    @app_commands.command(name="face", description="지금 오로라의 얼굴 보기")
    async def face(interaction: discord.Interaction) -> None:
        # Drawing waits for the model worker, which may be busy with other users' turns.
        await interaction.response.defer(ephemeral=True, thinking=True)
        await respond(interaction, await commands.face(caller_of(interaction)))

    @app_commands.command(name="help", description="오로라와 이야기하는 방법")
    async def help_(interaction: discord.Interaction) -> None:
        await respond(interaction, commands.help())

    return [memory, forget, reset, face, help_]


def admin_commands(commands: Commands) -> app_commands.Group:
    """`/admin …`: visible to everyone, refused by `Commands` unless the caller is an admin.

    No `default_permissions`: that would hide the group from OHLORA_ADMIN_IDS admins who lack
    Manage Server in this guild.
    """
    admin = app_commands.Group(name="admin", description="관리자 명령 (서버 관리 권한 또는 OHLORA_ADMIN_IDS)")
    channel_group = app_commands.Group(name="channel", description="멘션 없이도 대답하는 채널", parent=admin)
    face_group = app_commands.Group(name="face", description="이 채널에서 쓰는 얼굴", parent=admin)
    memory_group = app_commands.Group(name="memory", description="사용자의 기억 보기와 지우기", parent=admin)

    async def allow(interaction: discord.Interaction, channel: Channel | None, allowed: bool) -> None:
        caller = caller_of(interaction)
        channel_id = str(channel.id) if channel is not None else caller.chat_id
        await respond(interaction, await commands.allow_channel(caller, channel_id, allowed))

    @channel_group.command(name="allow", description="이 채널(또는 고른 채널)에서 멘션 없이도 대답하기")
    @app_commands.describe(channel="대상 채널 (비워 두면 이 채널)")
    async def channel_allow(interaction: discord.Interaction, channel: Channel | None = None) -> None:
        await allow(interaction, channel, True)

    @channel_group.command(name="deny", description="이 채널(또는 고른 채널)에서는 멘션될 때만 대답하기")
    @app_commands.describe(channel="대상 채널 (비워 두면 이 채널)")
    async def channel_deny(interaction: discord.Interaction, channel: Channel | None = None) -> None:
        await allow(interaction, channel, False)

    @face_group.command(name="set", description="이 채널에서 오로라가 쓸 얼굴 정하기")
    @app_commands.describe(number="얼굴 번호")
    async def face_set(interaction: discord.Interaction, number: int) -> None:
        await respond(interaction, await commands.set_face(caller_of(interaction), number))

    @face_set.autocomplete("number")
    async def face_numbers(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[int]]:
        return face_choices(commands.faces(), current)

    @memory_group.command(name="view", description="사용자의 기억 보기")
    @app_commands.describe(user="대상 사용자")
    async def memory_view(interaction: discord.Interaction, user: discord.Member | discord.User) -> None:
        await respond(interaction, await commands.memory_of(caller_of(interaction), target_key(user)))

    @memory_group.command(name="clear", description="사용자의 기억 모두 지우기")
    @app_commands.describe(user="대상 사용자")
    async def memory_clear(interaction: discord.Interaction, user: discord.Member | discord.User) -> None:
        await respond(interaction, await commands.clear_memory_of(caller_of(interaction), target_key(user)))

    @admin.command(name="block", description="사용자 차단: 오로라가 더는 대답하지 않아요")
    @app_commands.describe(user="대상 사용자")
    async def block(interaction: discord.Interaction, user: discord.Member | discord.User) -> None:
        await respond(interaction, await commands.block(caller_of(interaction), target_key(user), True))

    @admin.command(name="unblock", description="사용자 차단 풀기")
    @app_commands.describe(user="대상 사용자")
    async def unblock(interaction: discord.Interaction, user: discord.Member | discord.User) -> None:
        await respond(interaction, await commands.block(caller_of(interaction), target_key(user), False))

    @admin.command(name="stats", description="대화 수, 사용자 수, 지연 시간, 대기열")
    async def stats(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.stats(caller_of(interaction)))

    return admin
