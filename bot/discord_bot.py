"""Oh-LoRA on Discord (discord.py 2.x): the gateway client and the adapter the service runs.

This module wires; the rules are elsewhere. `discord_rules` says what a message means (pure,
tested directly), `discord_delivery` gets answers out, `discord_commands` holds the slash
commands, and `bot.commands` decides who may do what.

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
import logging
from collections.abc import Awaitable, Coroutine
from typing import Any

import discord

from bot.alerts import AdminAlerts
from bot.commands import Commands
from bot.discord_commands import OhloraTree
from bot.discord_delivery import Delivery, ReplyTarget, typing_in
from bot.discord_rules import (
    PLATFORM,
    SAFE_MENTIONS,
    SEND_ERRORS,
    InboundMessage,
    default_intents,
    discord_user_ids,
    fit_message,
    should_answer,
)
from bot.errors import BotLoginFailed
from bot.inbox import RESTARTED_TEXT, Arrival, Inbox
from core.config import Settings
from core.engine import ERROR_TEXT
from core.store import PendingEvent
from core.types import Reply, ReplyKind, user_key

logger = logging.getLogger(__name__)


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
