"""Test doubles for the Discord adapter.

Messages go through dpytest (discord.py's real client against a fake gateway and HTTP API).
dpytest drops two things these tests need: the text of a message sent with a file, and the
message a reply points at. `SentRecorder` keeps each send request as discord.py built it, and
can make Discord refuse or stall a send. `post` builds what the gateway delivers, attachments,
stickers and forwards included, and files it where dpytest's `fetch_message` looks; `hand_over`
gives the same fake Discord to a new client, as a restarted process finds it.

Slash commands are called with `FakeInteraction`, which keeps Discord's one rule that matters
here: an interaction is responded to at most once, and followups need a response first.
`invoke` and `autocomplete` call a command the way `CommandTree` does, errors included.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import discord
import discord.ext.test as dpytest
from discord import app_commands
from discord.ext.test import backend, factories

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SETTLE_TIMEOUT_S = 60.0
"""A bound, not an expectation: a bot that answered itself would otherwise loop forever."""


# --------------------------------------------------------------------------------------------
# Messages (dpytest)


@dataclass(frozen=True)
class Sent:
    """One message the bot sent: its text, the message it replies to, its files, its nonce."""

    channel_id: int
    content: str | None
    reference_id: int | None
    files: tuple[tuple[str, bytes], ...]
    nonce: str | None = None


@dataclass
class Fault:
    """Discord's answer to the sends `when` picks: `error` instead of a message, `times` times (None: always)."""

    when: Callable[[Sent], bool]
    error: Exception
    times: int | None = 1


class SentRecorder:
    """Wraps dpytest's fake HTTP client: every message and typing indicator, in order.

    A send picked by a fault raises its error and lands in `refused`, not in `sent`; while
    `paused` holds an unset event, every send waits for it (a slow Discord). `typing_fault` is
    raised by every typing indicator.
    """

    def __init__(self, client: discord.Client) -> None:
        self.sent: list[Sent] = []
        self.refused: list[Sent] = []
        self.events: list[str] = []
        self.faults: list[Fault] = []
        self.paused: asyncio.Event | None = None
        self.typing_fault: Exception | None = None
        http = client.http
        deliver, type_ = http.send_message, http.send_typing

        # dpytest looks for the target channel in its caller's locals, under the name `channel`:
        # the wrappers hand theirs on.
        async def send_message(channel_id: int, *, params: Any) -> Any:
            channel = sys._getframe(1).f_locals.get("channel")  # noqa: F841
            sent = _sent_from(channel_id, params)
            if self.paused is not None:
                await self.paused.wait()
            error = self._fault_for(sent)
            if error is not None:
                self.refused.append(sent)
                raise error
            self.sent.append(sent)
            self.events.append("send")
            return await deliver(channel_id, params=params)

        async def send_typing(channel_id: int) -> None:
            if self.typing_fault is not None:
                raise self.typing_fault
            self.events.append("typing")
            channel = sys._getframe(1).f_locals.get("channel")  # noqa: F841
            await type_(channel_id)

        http.send_message = send_message  # type: ignore[method-assign,assignment]
        http.send_typing = send_typing  # type: ignore[method-assign,assignment]

    def fail(self, when: Callable[[Sent], bool], error: Exception, *, times: int | None = 1) -> None:
        self.faults.append(Fault(when, error, times))

    def _fault_for(self, sent: Sent) -> Exception | None:
        for fault in self.faults:
            if fault.times != 0 and fault.when(sent):
                if fault.times is not None:
                    fault.times -= 1
                return fault.error
        return None

    def take(self) -> list[Sent]:
        sent, self.sent = self.sent, []
        return sent


def http_error(status: int, code: int = 0, message: str = "error") -> discord.HTTPException:
    """What discord.py raises for a refused request: `Forbidden` for 403, `NotFound` for 404."""
    kinds: dict[int, type[discord.HTTPException]] = {403: discord.Forbidden, 404: discord.NotFound}
    return kinds.get(status, discord.HTTPException)(
        backend.FakeRequest(status, message), {"code": code, "message": message}
    )


def _sent_from(channel_id: int, params: Any) -> Sent:
    payload = params.payload
    if payload is None:  # with files, discord.py moves the JSON into a multipart field
        (payload_json,) = (part["value"] for part in params.multipart if part["name"] == "payload_json")
        payload = json.loads(payload_json)
    files = []
    for file in params.files or ():
        files.append((file.filename, file.fp.read()))
        file.fp.seek(0)
    reference = payload.get("message_reference")
    return Sent(
        channel_id=channel_id,
        content=payload.get("content"),
        reference_id=int(reference["message_id"]) if reference else None,
        files=tuple(files),
        nonce=payload.get("nonce"),
    )


async def settle() -> None:
    """Wait until every event handler dpytest started has finished."""
    await asyncio.wait_for(dpytest.run_all_events(), timeout=SETTLE_TIMEOUT_S)


async def post(
    content: str,
    *,
    channel: Any,
    author: discord.abc.User,
    reply_to: discord.Message | None = None,
    mention_everyone: bool = False,
    files: Sequence[str] = (),
    stickers: Sequence[str] = (),
    forward: bool = False,
    message_id: int | None = None,
    wait: bool = True,
) -> discord.Message:
    """A user's message arriving over the gateway; with `wait`, every handler it started has
    run to the end when this returns.

    `files` and `stickers` are names of what comes with it. With `forward`, the text, files and
    stickers are another message's, forwarded: the forward itself has no content. A `message_id`
    seen before is the gateway delivering that event again.
    """
    guild = getattr(channel, "guild", None)
    own = "" if forward else content
    data = factories.make_message_dict(  # type: ignore[call-overload]
        channel,
        author,
        id_num=message_id if message_id is not None else -1,
        content=own,
        mentions=backend.find_user_mentions(own, guild),
        mention_roles=backend.find_role_mentions(own, guild),
        mention_everyone=mention_everyone,
        type=discord.MessageType.reply.value if reply_to else discord.MessageType.default.value,
    )
    attached = {
        "attachments": [
            factories.make_attachment_dict(name, 4, f"file:///{name}", f"file:///{name}") for name in files
        ],
        "sticker_items": [{"id": factories.make_id(), "name": name, "format_type": 1} for name in stickers],
    }
    if forward:
        data["message_reference"] = {"type": 1, "message_id": factories.make_id(), "channel_id": channel.id}
        snapshot = {"type": 0, "content": content, "embeds": [], "timestamp": data["timestamp"].isoformat()}
        data["message_snapshots"] = [{"message": {**snapshot, "edited_timestamp": None, "flags": 0, **attached}}]
    else:
        data.update(attached)
    if reply_to is not None:
        data["message_reference"] = {"message_id": reply_to.id, "channel_id": reply_to.channel.id}
        data["referenced_message"] = factories.dict_from_message(reply_to)
    # Where dpytest's fake HTTP API finds a message for `fetch_message` (and forgets a deleted one).
    backend._cur_config.messages.setdefault(channel.id, []).append(data)  # type: ignore[union-attr]
    state = backend.get_state()
    state.parse_message_create(data)
    if wait:
        await settle()
    message = state._get_message(data["id"])
    assert message is not None
    return message


async def ready(client: discord.Client) -> None:
    """The gateway's READY, as `on_ready` sees it; publishing slash commands (an HTTP call dpytest
    does not know) does nothing."""

    async def sync(*, guild: discord.abc.Snowflake | None = None) -> list[app_commands.AppCommand]:
        return []

    tree = getattr(client, "tree", None)
    if isinstance(tree, app_commands.CommandTree):
        tree.sync = sync  # type: ignore[method-assign]
    client.dispatch("ready")
    await settle()


def delete(message: discord.Message) -> None:
    """The user deletes `message`: `fetch_message` finds it no more."""
    backend.delete_message(message)


async def hand_over(old: discord.Client, new: discord.Client) -> None:
    """The fake Discord `old` was configured with, now connected to `new`: what a restarted process finds.

    dpytest ties its world (guilds, channels, members, stored messages, the bot's own user) to the
    client it configured. Discord keeps all of that while a bot restarts, so the new client gets
    the same world, and events go to it alone.
    """
    state = backend.get_state()
    new.http = old.http
    new.ws = old.ws
    new._connection = state
    state._get_client = lambda: new  # type: ignore[method-assign]
    state._get_websocket = lambda *_, **__: new.ws  # type: ignore[method-assign]

    def dispatch(event: str, /, *args: Any, **kwargs: Any) -> None:
        if state._do_dispatch:
            new.dispatch(event, *args, **kwargs)

    state.dispatch = dispatch  # type: ignore[method-assign]
    await new._async_setup_hook()


def bot_member(guild: discord.Guild, name: str = "다른 봇") -> discord.Member:
    """Another bot's account in `guild` (dpytest's own helpers only make people)."""
    data = factories.make_user_dict(name, "0042", None, bot=True)
    user = backend.get_state().store_user(data)  # type: ignore[arg-type]
    return backend.make_member(user, guild)


# --------------------------------------------------------------------------------------------
# Slash commands


@dataclass(frozen=True)
class FakeChannel:
    """A channel option as discord.py resolves it from the cache: its id and its server."""

    id: int
    guild: discord.Object


@dataclass
class Shown:
    """Something the user saw: a response, a followup, an edit, or a deferral's "thinking…"."""

    via: str
    content: str | None = None
    ephemeral: bool = False
    files: tuple[tuple[str, bytes], ...] = ()
    view: discord.ui.View | None = None


class FakeResponse:
    def __init__(self, interaction: FakeInteraction) -> None:
        self._interaction = interaction
        self.kind: str | None = None
        self.choices: list[app_commands.Choice[Any]] | None = None

    def is_done(self) -> bool:
        return self.kind is not None

    def _respond(self, kind: str) -> None:
        if self.kind is not None:
            raise discord.InteractionResponded(self._interaction)  # type: ignore[arg-type]
        self.kind = kind

    async def send_message(
        self,
        content: str | None = None,
        *,
        ephemeral: bool = False,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
    ) -> None:
        self._respond("message")
        self._interaction.shown.append(Shown("response", content, ephemeral, _read(file), view))

    async def defer(self, *, ephemeral: bool = False, thinking: bool = False) -> None:
        self._respond("defer")
        self._interaction.shown.append(Shown("defer", None, ephemeral))

    async def edit_message(self, *, content: str | None = None, view: discord.ui.View | None = None) -> None:
        self._respond("edit")
        self._interaction.shown.append(Shown("edit", content, view=view))

    async def autocomplete(self, choices: list[app_commands.Choice[Any]]) -> None:
        self._respond("autocomplete")
        self.choices = choices


class FakeFollowup:
    def __init__(self, interaction: FakeInteraction) -> None:
        self._interaction = interaction

    async def send(
        self,
        content: str | None = None,
        *,
        ephemeral: bool = False,
        file: discord.File | None = None,
        view: discord.ui.View | None = None,
    ) -> None:
        if not self._interaction.response.is_done():
            raise RuntimeError("a followup before the interaction was responded to")
        self._interaction.shown.append(Shown("followup", content, ephemeral, _read(file), view))


@dataclass
class FakeInteraction:
    """What the adapter reads from a `discord.Interaction`, and records of what it sent back."""

    user: discord.abc.Snowflake
    channel_id: int
    guild_id: int | None = None
    permissions: discord.Permissions = field(default_factory=discord.Permissions.none)
    type: discord.InteractionType = discord.InteractionType.application_command
    command: app_commands.Command[Any, ..., Any] | None = None
    shown: list[Shown] = field(default_factory=list)
    response: FakeResponse = field(init=False)
    followup: FakeFollowup = field(init=False)
    guild: None = field(init=False, default=None)
    """Read only when resolving user or channel options, which these tests pass resolved."""
    _state: None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.response = FakeResponse(self)
        self.followup = FakeFollowup(self)

    async def edit_original_response(self, *, content: str | None = None, view: discord.ui.View | None = None) -> None:
        if not self.response.is_done():
            raise RuntimeError("no original response to edit")
        self.shown.append(Shown("edit_original", content, view=view))

    def texts(self) -> list[str]:
        return [shown.content for shown in self.shown if shown.content is not None]


def _read(file: discord.File | None) -> tuple[tuple[str, bytes], ...]:
    if file is None:
        return ()
    return ((file.filename, file.fp.read()),)


def command_at(tree: app_commands.CommandTree, path: str) -> app_commands.Command[Any, ..., Any]:
    first, *rest = path.split()
    found: Any = tree.get_command(first)
    for name in rest:
        found = found.get_command(name)
    assert isinstance(found, app_commands.Command), path
    return found


async def invoke(tree: app_commands.CommandTree, path: str, interaction: FakeInteraction, **arguments: Any) -> None:
    """Run `/path` as the tree does: the callback, and any exception through `tree.on_error`."""
    command = command_at(tree, path)
    interaction.command = command
    try:
        await command.callback(interaction, **arguments)  # type: ignore[arg-type,call-arg]
    except Exception as error:
        wrapped = app_commands.CommandInvokeError(command, error)
        await tree.on_error(interaction, wrapped)  # type: ignore[arg-type]


async def autocomplete(
    tree: app_commands.CommandTree, path: str, parameter: str, interaction: FakeInteraction, current: str
) -> list[app_commands.Choice[Any]]:
    """The choices Discord would show while `parameter` of `/path` reads `current`."""
    command = command_at(tree, path)
    option_type = command.get_parameter(parameter).type.value  # type: ignore[union-attr]
    namespace = app_commands.Namespace(
        interaction,  # type: ignore[arg-type]
        {},
        [{"type": option_type, "name": parameter, "value": current, "focused": True}],
    )
    interaction.type = discord.InteractionType.autocomplete
    await command._invoke_autocomplete(interaction, parameter, namespace)  # type: ignore[arg-type]
    assert interaction.response.choices is not None
    return interaction.response.choices


async def press(view: discord.ui.View, label: str, interaction: FakeInteraction) -> None:
    """Click the button labelled `label` as discord.py's view dispatch does."""
    (button,) = (item for item in view.children if isinstance(item, discord.ui.Button) and item.label == label)
    try:
        if await view.interaction_check(interaction):  # type: ignore[arg-type]
            await button.callback(interaction)  # type: ignore[arg-type]
    except Exception as error:
        await view.on_error(interaction, error, button)  # type: ignore[arg-type]
