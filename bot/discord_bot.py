"""Oh-LoRA on Discord (discord.py 2.x): messages in, replies with her face out, and slash commands.

This module only translates. Who may talk to her, what she answers and who counts as an admin
are decided by `Commands` (and the engine behind it); here a Discord message becomes an
`IncomingMessage`, a `Reply` becomes Discord messages, and an interaction becomes a `Caller`.

The pure rules (`InboundMessage`, `should_answer`, `strip_mention`, `split_message`,
`suggestions`) take no Discord objects, so they are tested directly; the client and
the commands around them are thin.

Delivery and restarts. A message she will answer is written to the inbox before anything else
happens to it, and finished only after its answer went out, so a message id seen twice (a
gateway RESUME replays events) is answered once. On the first `on_ready` of a process, what an
earlier process left unfinished is finished: a reply computed but not delivered is delivered as
it was (the model is not asked again), a message too old to answer as if nothing happened gets
`RESTARTED_TEXT`, any other is fetched and answered, and one deleted meanwhile is only marked
done. Every part of an answer carries a nonce made of the message id, which Discord enforces:
a send retried after a dropped connection, or repeated after a crash between sending and
finishing, does not post the answer twice while Discord remembers the nonce (a few minutes).

Messages sent while the bot was down are not answered. The gateway does not replay them, and
reading channel history on start to find them is deliberately not done: it would mean answering
chatter hours old in every allowed channel, long after the conversation moved on, and reading
history the bot otherwise never needs. A user who spoke to her while she was away simply speaks
again; what she had received before going down is never lost.

The bot reads message text, which needs the privileged Message Content intent: enable it for
the application in the Discord developer portal (Bot → Privileged Gateway Intents → Message
Content Intent). Without it the gateway refuses the connection and the log says so.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import discord
from discord import app_commands
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from bot.alerts import AdminAlerts
from bot.commands import NOT_NOW_TEXT, Caller, CommandResult, Commands
from bot.errors import BotLoginFailed
from bot.inbox import RESTARTED_TEXT, Arrival, Inbox
from core.config import Settings
from core.engine import ERROR_TEXT, Working
from core.store import PendingEvent
from core.types import IncomingMessage, RenderedFace, Reply, ReplyKind, user_key

logger = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
"""Discord's limit on a message's content, counted in code points (Python's `len`)."""
CHOICES_LIMIT = 25
"""Discord shows at most 25 autocomplete choices."""
CHOICE_TEXT_LIMIT = 100
"""Longest name or string value of an autocomplete choice."""
CONFIRM_TIMEOUT_S = 120.0
SEND_ATTEMPTS = 3
"""Tries at one message part when the connection drops or times out (see `Delivery`)."""

COMMAND_ERROR_TEXT = "앗, 명령을 처리하다가 문제가 생겼어. 😢 잠시 뒤에 다시 해 줄래?"
BAD_ARGUMENT_TEXT = "입력한 값을 알아듣지 못했어. 다시 확인해 줄래? 🤔"
NOT_HERE_TEXT = "이 명령은 여기서는 쓸 수 없어."
COOLDOWN_TEXT = "조금만 천천히! {seconds:.0f}초 뒤에 다시 해 줘."
FORGET_CANCELLED_TEXT = "알겠어, 아무것도 지우지 않았어. 😊"
FORGET_EXPIRED_TEXT = "대답이 없어서 취소했어. 지우려면 /forget 을 다시 써 줘."
NOT_YOUR_BUTTON_TEXT = "이 버튼은 명령을 쓴 사람만 누를 수 있어."
OTHER_SERVER_TEXT = "그 채널은 이 서버에 없어요. 설정하려는 채널이 있는 서버에서 명령을 써 주세요."

SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
"""Her answers can echo what users typed; an echoed @everyone or <@id> must never ping anyone."""

NETWORK_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError)
"""A request that may or may not have reached Discord: the connection dropped, or no answer came."""
SEND_ERRORS: tuple[type[Exception], ...] = (discord.HTTPException, *NETWORK_ERRORS)
"""Everything a request to Discord can fail with: Discord said no, or nobody knows."""


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

    message_id: int
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
    """The content without her own mentions; for a forward, the forwarded message's."""
    has_media: bool
    """Attachments or stickers (the forwarded message's, for a forward), which she cannot read."""
    forwarded: bool
    """Someone else's message passed on: its words are answered, never kept as the sender's memory."""

    @classmethod
    def from_discord(cls, message: discord.Message, me: discord.abc.User) -> InboundMessage:
        """`me` is the bot's own user. Users may also mention the role Discord made for the bot.

        A forward carries the forwarded message as a snapshot and has no content of its own. Only
        the forwarder's own message can speak to her: a mention inside the forwarded words was
        written to someone else.
        """
        guild = message.guild
        bot_role = guild.self_role if guild is not None else None
        bot_role_id = bot_role.id if bot_role is not None else None
        reference = message.reference
        is_reply = reference is not None and reference.type is discord.MessageReferenceType.reply
        referenced = reference.resolved if reference is not None and is_reply else None
        snapshots = message.message_snapshots
        if snapshots:
            content = "\n".join(snapshot.content for snapshot in snapshots)
            has_media = any(snapshot.attachments or snapshot.stickers for snapshot in snapshots)
        else:
            content = message.content
            has_media = bool(message.attachments or message.stickers)
        channel = message.channel
        return cls(
            message_id=message.id,
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
            text=strip_mention(content, me.id, bot_role_id),
            has_media=has_media,
            forwarded=bool(snapshots),
        )

    @property
    def media_only(self) -> bool:
        """A picture, a sticker or a file without a word: she answers with `TEXT_ONLY_TEXT`."""
        return self.has_media and not self.text

    def to_incoming(self) -> IncomingMessage:
        return IncomingMessage(
            platform=PLATFORM,
            user_id=str(self.author_id),
            chat_id=str(self.channel_id),
            text=self.text,
            event_id=str(self.message_id),
            forwarded=self.forwarded,
        )


async def should_answer(message: InboundMessage, channel_allowed: Callable[[str], Awaitable[bool]]) -> bool:
    """Her manners: always in DMs; in servers when spoken to, or to words anywhere an admin allowed.

    Every server message from a person reads the allowlist once (twice in a thread of a channel
    that is not allowed), even one that mentions her: a user's messages in one channel then take
    the same awaits before `Commands.chat`, which is what keeps them in the order they arrived.
    In an allowed channel she joins conversations, so a picture or a sticker nobody addressed to
    her is left alone, and an @everyone/@here announcement is not talking to her.
    """
    if message.author_is_bot or message.is_system:
        return False
    if message.in_dm:
        return True
    allowed = await _in_allowed_channel(message, channel_allowed)
    if message.mentions_bot or message.replies_to_bot:
        return True
    return allowed and bool(message.text) and not message.mentions_everyone


async def _in_allowed_channel(message: InboundMessage, channel_allowed: Callable[[str], Awaitable[bool]]) -> bool:
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


def nonce_for(message_id: int, part: int) -> str:
    """The nonce of part `part` of the answer to `message_id`: at most 25 characters, as Discord wants.

    The same answer part always gets the same nonce, so Discord (discord.py sends `enforce_nonce`
    with every nonce) returns the message already posted instead of posting it again.
    """
    return f"{message_id}.{part}"


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


def discord_user_ids(admin_ids: Iterable[str]) -> list[int]:
    """The Discord accounts among OHLORA_ADMIN_IDS (`discord:<id>`), in a stable order."""
    ids = {key.removeprefix(f"{PLATFORM}:") for key in admin_ids if key.startswith(f"{PLATFORM}:")}
    return sorted(int(value) for value in ids if value.isdigit())


# --------------------------------------------------------------------------------------------
# Messages: delivery


@dataclass(frozen=True)
class ReplyTarget:
    """Where an answer goes: a channel, and the message it answers (which may be gone by then)."""

    channel: discord.abc.Messageable
    channel_id: int
    message_id: int
    guild: discord.Guild | None

    @classmethod
    def of(cls, message: discord.Message) -> ReplyTarget:
        return cls(message.channel, message.channel.id, message.id, message.guild)

    def reference(self) -> discord.MessageReference:
        """`fail_if_not_exists=False`: a user who deleted the message while she was thinking still
        gets the answer, as a plain message."""
        return discord.MessageReference(
            message_id=self.message_id,
            channel_id=self.channel_id,
            guild_id=self.guild.id if self.guild is not None else None,
            fail_if_not_exists=False,
        )


def typing_in(channel: discord.abc.Messageable) -> Working:
    """Shows "typing…" in `channel` while a turn runs; an indicator that fails costs the dots, not the turn."""

    @asynccontextmanager
    async def typing() -> AsyncIterator[None]:
        indicator = channel.typing()
        shown = True
        try:
            await indicator.__aenter__()
        except SEND_ERRORS as error:
            logger.debug("Discord: no typing indicator in this channel: %r", error)
            shown = False
        try:
            yield
        finally:
            if shown:
                await indicator.__aexit__(None, None, None)

    return typing


class Delivery:
    """Sends a reply: text in parts Discord accepts, her face on the first, and what to do when a send fails.

    discord.py's `HTTPClient.request` (discord/http.py, 2.7) already makes up to five tries of every
    request: after a 429 it sleeps the `retry_after` Discord sent (and it waits out exhausted
    buckets and the global limit before sending at all), after a 500/502/504/524 it sleeps 1, 3,
    5, 7 s, and only then raises. It does not retry a dropped connection or a timeout (only
    ECONNRESET under its macOS/Windows numbers 54/10054, not Linux's), and such a request may
    well have reached Discord. Those are retried here, with the same nonce, so Discord hands back
    the message it already posted instead of posting a second one.

    What is left is Discord saying no. A face that cannot be sent (too large, a failed upload, no
    Attach Files permission) costs the picture: the text goes alone. No permission to write at
    all is logged once per channel and not retried. Nothing here ever turns a failed send into an
    apology: the answer existed, and a second message would only add to whatever went wrong.
    """

    def __init__(self) -> None:
        self._forbidden: set[int] = set()
        """Channels where writing was refused and the log has said so."""

    async def send(self, target: ReplyTarget, reply: Reply) -> None:
        parts = split_message(reply.text)
        image = self._attachable(reply.image, target)
        try:
            await self._first(target, parts[0] if parts else None, image)
            for index, part in enumerate(parts[1:], start=1):
                await self._post(target, index, content=part)
        except discord.Forbidden as error:
            self._refused(target, error)
        except SEND_ERRORS as error:
            logger.warning("Discord: the answer to message %s did not go out: %r", target.message_id, error)
        else:
            self._forbidden.discard(target.channel_id)

    async def _first(self, target: ReplyTarget, text: str | None, image: RenderedFace | None) -> None:
        if image is None:
            if text is not None:
                await self._post(target, 0, content=text)
            return
        try:
            await self._post(target, 0, content=text, image=image)
        except discord.HTTPException as error:
            if text is None:
                raise
            logger.warning(
                "Discord: her face did not go out in channel %s (%s, code %s); sending the text alone",
                target.channel_id,
                error.status,
                error.code,
            )
            await self._post(target, 0, content=text)

    @staticmethod
    async def _post(target: ReplyTarget, part: int, *, content: str | None, image: RenderedFace | None = None) -> None:
        """One message; the first part answers the user's message."""
        fields: dict[str, Any] = {"nonce": nonce_for(target.message_id, part)}
        if part == 0:
            fields["reference"] = target.reference()
        if content is not None:
            fields["content"] = content
        retrying = AsyncRetrying(
            stop=stop_after_attempt(SEND_ATTEMPTS),
            wait=wait_exponential(multiplier=0.5, max=4.0),
            retry=retry_if_exception_type(NETWORK_ERRORS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if image is not None:
                    fields["file"] = face_file(image)  # a fresh file each try: a failed upload read it
                await target.channel.send(**fields)

    @staticmethod
    def _attachable(image: RenderedFace | None, target: ReplyTarget) -> RenderedFace | None:
        if image is None:
            return None
        size, limit = len(image.data), upload_limit(target.guild)
        if size > limit:
            logger.warning("Discord: a face of %d bytes is over the upload limit of %d bytes", size, limit)
            return None
        return image

    def _refused(self, target: ReplyTarget, error: discord.Forbidden) -> None:
        if target.channel_id in self._forbidden:
            logger.debug("Discord: still no permission to write in channel %s", target.channel_id)
            return
        self._forbidden.add(target.channel_id)
        logger.warning(
            "Discord: no permission to write in channel %s (%s); her answers there are dropped until it is granted",
            target.channel_id,
            error.text or error.status,
        )


# --------------------------------------------------------------------------------------------
# Messages: the client


class OhloraClient(discord.Client):
    """The gateway connection: answers messages, finishes the inbox, and carries the slash command tree."""

    def __init__(
        self,
        commands: Commands,
        inbox: Inbox,
        *,
        intents: discord.Intents | None = None,
        sync_guild_id: int | None = None,
    ) -> None:
        super().__init__(intents=intents or default_intents(), allowed_mentions=SAFE_MENTIONS)
        self._commands = commands
        self._inbox = inbox
        self._delivery = Delivery()
        self._sync_guild_id = sync_guild_id
        self._synced = False
        self._inbox_finished = False
        self._closing = False
        self._in_flight: set[asyncio.Task[Any]] = set()
        self.tree = OhloraTree(self, commands)

    async def on_ready(self) -> None:
        """Once per process (`on_ready` fires again on every resume): publish the slash commands
        and finish what an earlier process left in the inbox."""
        logger.info("Discord: connected as %s (id %s)", self.user, self.user.id if self.user else "?")
        await self._publish_commands()
        if not self._inbox_finished:
            self._inbox_finished = True
            await self._finish_inbox()

    async def _publish_commands(self) -> None:
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
        if self.user is None:
            return
        task = asyncio.current_task()
        assert task is not None  # discord.py runs every event handler as a task
        self._in_flight.add(task)
        try:
            inbound = InboundMessage.from_discord(message, self.user)
            if not await should_answer(inbound, self._channel_allowed):
                return
            if not await self._receive(message, inbound):
                return
            if self._closing:
                return  # kept in the inbox: the next start answers it
            await self._answer(message, inbound)
        finally:
            self._in_flight.discard(task)

    async def finish_turns(self, grace_s: float) -> None:
        """Take no new turns; give those in flight `grace_s` to reply, then cancel them.

        A message that arrives meanwhile is still written to the inbox (the next start answers
        it). A cancelled turn leaves its inbox row unfinished, and a reply computed before the
        cancel stays with it, to be delivered by the next start.
        """
        self._closing = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self._in_flight and (left := deadline - loop.time()) > 0:
            await asyncio.wait(set(self._in_flight), timeout=left)
        late = set(self._in_flight)
        if late:
            logger.warning("Discord: cancelling %d turn(s) still running at shutdown", len(late))
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    async def _channel_allowed(self, channel_id: str) -> bool:
        return await self._commands.is_channel_allowed(PLATFORM, channel_id)

    async def _receive(self, message: discord.Message, inbound: InboundMessage) -> bool:
        """Into the inbox; False for a message already received (a replayed gateway event).

        The inbox is what makes an answer survive a restart, not what allows one: when it cannot
        be written, the message is answered all the same.
        """
        arrival = Arrival(
            event_id=str(inbound.message_id),
            user_key=user_key(PLATFORM, str(inbound.author_id)),
            payload={
                "channel_id": inbound.channel_id,
                "message_id": inbound.message_id,
                "guild_id": message.guild.id if message.guild is not None else None,
            },
        )
        try:
            (fresh,) = await self._inbox.receive([arrival])
        except Exception:
            logger.exception("Discord: could not write message %s to the inbox; answering it anyway", arrival.event_id)
            return True
        if not fresh:
            logger.info("Discord: message %s arrived again; it was answered or is being answered", arrival.event_id)
        return fresh

    async def _answer(self, message: discord.Message, inbound: InboundMessage) -> None:
        """A received message's turn, its delivery, then its inbox row finished."""
        event_id = str(message.id)
        reply = await self._turn(inbound, message)
        if reply is not None:
            await self._inbox_step("keep the reply to", event_id, self._inbox.keep_reply(event_id, reply))
            await self._delivery.send(ReplyTarget.of(message), reply)
        await self._inbox_step("finish", event_id, self._inbox.done(event_id))

    async def _turn(self, inbound: InboundMessage, message: discord.Message) -> Reply | None:
        """The turn (for a picture alone, the text-only notice), or an apology when something
        outside the engine broke (the engine never raises)."""
        incoming = inbound.to_incoming()
        try:
            if inbound.media_only:
                return await self._commands.media_only(incoming)
            return await self._commands.chat(incoming, typing_in(message.channel))
        except Exception:
            logger.exception("Discord: the turn of %s failed", incoming.user_key)
            return Reply(text=ERROR_TEXT, kind=ReplyKind.ERROR)

    @staticmethod
    async def _inbox_step(step: str, event_id: str, write: Awaitable[None]) -> None:
        """An inbox write after the message was received: a failure is logged, the answer still goes."""
        try:
            await write
        except Exception:
            logger.exception("Discord: could not %s message %s in the inbox", step, event_id)

    async def _finish_inbox(self) -> None:
        """Finish what an earlier process received and did not deliver, oldest first.

        Each event is looked up in turn, so its turn is started (and takes its place in its user's
        line) in the order the events arrived; the turns then run side by side, as live ones do.
        """
        try:
            unfinished = await self._inbox.unfinished()
        except Exception:
            logger.exception("Discord: could not read the inbox; what was left unanswered waits for the next start")
            return
        if unfinished:
            logger.info("Discord: finishing %d message(s) left from before the restart", len(unfinished))
        started: list[asyncio.Task[None]] = []
        for pending in unfinished:
            if self._closing:
                break
            event_id = pending.event.event_id
            try:
                work = await self._recovery_of(pending)
            except (discord.NotFound, discord.Forbidden) as error:
                logger.info("Discord: message %s is gone or out of reach (%s); nothing to answer", event_id, error)
                work = None
            except Exception:
                logger.exception("Discord: could not finish message %s; giving it up", event_id)
                work = None
            if work is None:
                await self._inbox_step("finish", event_id, self._inbox.done(event_id))
            else:
                started.append(self._start(work))
        await asyncio.gather(*started, return_exceptions=True)

    async def _recovery_of(self, pending: PendingEvent) -> Coroutine[Any, Any, None] | None:
        """What finishes one event: a delivery, a notice, or a turn; None when there is nothing to do."""
        assert self.user is not None  # on_ready comes after login
        payload = Inbox.payload_of(pending.event)
        channel_id, message_id = int(payload["channel_id"]), int(payload["message_id"])
        channel = await self._channel(channel_id)
        if channel is None:
            return None
        if pending.reply is not None or self._inbox.is_stale(pending.event):
            reply = pending.reply or Reply(text=RESTARTED_TEXT, kind=ReplyKind.NOTICE)
            guild = channel.guild if isinstance(channel, discord.abc.GuildChannel | discord.Thread) else None
            return self._deliver(pending.event.event_id, ReplyTarget(channel, channel_id, message_id, guild), reply)
        message = await channel.fetch_message(message_id)
        return self._answer(message, InboundMessage.from_discord(message, self.user))

    async def _channel(self, channel_id: int) -> discord.abc.Messageable | None:
        """The channel from the cache, else from Discord (a DM is not cached after a restart)."""
        channel = self.get_channel(channel_id) or await self.fetch_channel(channel_id)
        return channel if isinstance(channel, discord.abc.Messageable) else None

    async def _deliver(self, event_id: str, target: ReplyTarget, reply: Reply) -> None:
        await self._delivery.send(target, reply)
        await self._inbox_step("finish", event_id, self._inbox.done(event_id))

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """`work` as a task that shutdown waits for (and cancels after the grace period), like a live turn."""
        task = asyncio.create_task(work)
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        return task


class DiscordAdapter:
    """The Discord side of the service, on the service's event loop.

    `start()` logs in (a refused token raises `BotLoginFailed` right there) and leaves the
    gateway connection running as a background task; `close()` lets the turns in flight reply
    for `shutdown_grace_s`, then disconnects. With `alerts`, operator alarms reach the Discord
    accounts in OHLORA_ADMIN_IDS by DM.
    """

    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        *,
        inbox: Inbox,
        alerts: AdminAlerts | None = None,
        intents: discord.Intents | None = None,
        sync_guild_id: int | None = None,
        shutdown_grace_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._shutdown_grace_s = shutdown_grace_s
        self._admins = discord_user_ids(settings.admin_ids)
        self.client = OhloraClient(commands, inbox, intents=intents, sync_guild_id=sync_guild_id)
        self._gateway: asyncio.Task[None] | None = None
        if alerts is not None:
            alerts.add_channel(self.notify_admins)

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

    async def notify_admins(self, text: str) -> None:
        """An alarm, by DM to every Discord account in OHLORA_ADMIN_IDS; one unreachable admin does
        not keep it from the others."""
        for admin_id in self._admins:
            try:
                admin = self.client.get_user(admin_id) or await self.client.fetch_user(admin_id)
                await admin.send(fit_message(text))
            except SEND_ERRORS as error:
                logger.warning("Discord: could not tell admin %s about an alarm: %r", admin_id, error)


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
