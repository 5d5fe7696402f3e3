"""Oh-LoRA's slash commands on Discord: everyone's, and `/admin …`, answered privately.

Who may do what is decided by `Commands`; here an interaction becomes a `Caller` and a
`CommandResult` an ephemeral response, and errors become one private apology.
"""

from __future__ import annotations

import io
import logging
from typing import Any

import discord
from discord import app_commands

from bot.commands import NOT_NOW_TEXT, Caller, CommandResult, Commands
from bot.discord_rules import (
    CONFIRM_TIMEOUT_S,
    PLATFORM,
    face_choices,
    face_file,
    fit_message,
    split_message,
    suggestions,
)
from core.types import user_key

logger = logging.getLogger(__name__)

COMMAND_ERROR_TEXT = "앗, 명령을 처리하다가 문제가 생겼어. 😢 잠시 뒤에 다시 해 줄래?"
BAD_ARGUMENT_TEXT = "입력한 값을 알아듣지 못했어. 다시 확인해 줄래? 🤔"
NOT_HERE_TEXT = "이 명령은 여기서는 쓸 수 없어."
COOLDOWN_TEXT = "조금만 천천히! {seconds:.0f}초 뒤에 다시 해 줘."
FORGET_CANCELLED_TEXT = "알겠어, 아무것도 지우지 않았어. 😊"
FORGET_EXPIRED_TEXT = "대답이 없어서 취소했어. 지우려면 /forget 을 다시 써 줘."
NOT_YOUR_BUTTON_TEXT = "이 버튼은 명령을 쓴 사람만 누를 수 있어."
OTHER_SERVER_TEXT = "그 채널은 이 서버에 없어요. 설정하려는 채널이 있는 서버에서 명령을 써 주세요."


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
    interaction: discord.Interaction, result: CommandResult | None, *, view: discord.ui.View | None = None
) -> None:
    """Answer privately, exactly once: the interaction's response (or the followup a deferral
    waits for) carries the first part with the face and the view, further parts follow it.

    `None` is `Commands` staying silent (a blocked user already told, a flood already warned);
    an interaction left unanswered shows the user an error, so it gets `NOT_NOW_TEXT`.
    """
    if result is None:
        result = CommandResult(NOT_NOW_TEXT, ok=False)
    parts = split_message(result.text)
    first: dict[str, Any] = {"ephemeral": True}
    if parts:
        first["content"] = parts[0]
    if result.image is not None:
        first["file"] = face_file(result.image)
    elif result.file is not None:
        first["file"] = discord.File(io.BytesIO(result.file.data), filename=result.file.filename)
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
        # Forgetting waits for a turn of the user's still running, which can outlast the three
        # seconds Discord gives a button: acknowledge first, then edit the preview into the result.
        await interaction.response.defer()
        result = await self._commands.forget(self._caller, self._key)
        await interaction.edit_original_response(content=result.text, view=None)

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

    @app_commands.command(name="forget", description="나에 대한 모든 것 지우기 (키를 고르면 그 기억만)")
    @app_commands.describe(key="지울 기억 하나 (비워 두면 나에 대한 모든 것)")
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

    @app_commands.command(name="mydata", description="오로라가 저장한 나의 모든 데이터를 파일로 받기")
    async def mydata(interaction: discord.Interaction) -> None:
        await respond(interaction, await commands.my_data(caller_of(interaction)))

    @app_commands.command(name="help", description="오로라와 이야기하는 방법")
    async def help_(interaction: discord.Interaction) -> None:
        await respond(interaction, commands.help())

    return [memory, forget, mydata, reset, face, help_]


def admin_commands(commands: Commands) -> app_commands.Group:
    """`/admin …`: visible to everyone, refused by `Commands` unless the caller may use it.

    Two kinds: this server's own settings (`channel`, `face`) for its Manage Server members and
    the bot's admins; everything about users (`memory`, `block`, `unblock`) and the service
    (`stats`) for OHLORA_ADMIN_IDS alone, since a user's memories and a block reach every server
    and every DM. Every answer is ephemeral.

    No `default_permissions`: that would hide the group from OHLORA_ADMIN_IDS admins who lack
    Manage Server in this guild.
    """
    admin = app_commands.Group(
        name="admin", description="관리자 명령 (채널·얼굴: 서버 관리 권한, 사용자·통계: OHLORA_ADMIN_IDS)"
    )
    channel_group = app_commands.Group(name="channel", description="멘션 없이도 대답하는 채널", parent=admin)
    face_group = app_commands.Group(name="face", description="이 채널에서 쓰는 얼굴", parent=admin)
    memory_group = app_commands.Group(name="memory", description="사용자의 기억 보기와 지우기", parent=admin)

    async def allow(interaction: discord.Interaction, channel: Channel | None, allowed: bool) -> None:
        caller = caller_of(interaction)
        if channel is None:
            result = await commands.allow_channel(caller, caller.chat_id, allowed)
        elif commands.may_manage_chat(caller) and channel.guild.id != interaction.guild_id:
            # Manage Server covers this server's channels (and a DM has none). Asked after who
            # may manage, so that everyone else gets the refusal `Commands` gives them.
            result = CommandResult(OTHER_SERVER_TEXT, ok=False)
        else:
            result = await commands.allow_channel(caller, str(channel.id), allowed)
        await respond(interaction, result)

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

    @memory_group.command(name="clear", description="사용자에 대해 저장된 모든 것 지우기 (기억, 요약, 대화 기록)")
    @app_commands.describe(user="대상 사용자")
    async def memory_clear(interaction: discord.Interaction, user: discord.Member | discord.User) -> None:
        await respond(interaction, await commands.forget_of(caller_of(interaction), target_key(user)))

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
