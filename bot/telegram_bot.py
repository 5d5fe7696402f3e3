"""Oh-LoRA on Telegram: python-telegram-bot's handlers in the shared event loop, fed by our poller.

This module wires; the rules are elsewhere. `telegram_rules` says what an update means,
`telegram_polling` fetches updates and keeps them in the inbox before Telegram forgets them,
`telegram_delivery` gets replies out through the Bot API's faults, and `bot.commands` decides who
may do what. python-telegram-bot's `Application` is kept for its handlers and error handler; its
own updater is not used, since it confirms updates before they are answered.

Every update in the inbox is finished once its handler returns; one cut short by a shutdown or a
crash stays unfinished, and the next start finishes it (see `_finish_what_was_left`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from typing import Any

from telegram import Bot, BotCommandScopeChat, CallbackQuery, Message, Update
from telegram.constants import ChatAction, ChatType
from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, filters

from bot.alerts import AdminAlerts
from bot.commands import NOT_ADMIN_TEXT, PRIVATE_ONLY_TEXT, Caller, CommandResult, Commands
from bot.errors import BotLoginFailed
from bot.inbox import RESTARTED_TEXT, Inbox
from bot.telegram_delivery import Destination, RetryPolicy, TelegramDelivery
from bot.telegram_polling import PollingOptions, UpdatePoller, parse_update
from bot.telegram_rules import (
    _FORGET_DATA,
    ADMIN_COMMANDS,
    FORGET_CANCELLED_TEXT,
    FORGET_EXPIRED_TEXT,
    NOT_YOUR_BUTTON_TEXT,
    OPEN_PRIVATE_CHAT_TEXT,
    PLATFORM,
    PUBLIC_COMMANDS,
    SENT_PRIVATELY_TEXT,
    UNKNOWN_BUTTON_TEXT,
    UNKNOWN_COMMAND_TEXT,
    BotIdentity,
    PendingForget,
    PendingForgets,
    UsageError,
    answered_for,
    caller_of,
    destination_of,
    file_url_for,
    forget_buttons,
    is_text_only_notice_due,
    parse_face,
    parse_forget_data,
    parse_target,
    to_incoming,
    wants_unknown_command_hint,
)
from core.config import Settings
from core.engine import ERROR_TEXT
from core.types import IncomingMessage, RenderedFace

logger = logging.getLogger(__name__)

CHAT_ACTION_EVERY_S = 4.0
"""Telegram shows a chat action for about five seconds; a long turn renews it before it fades."""

Callback = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]


@asynccontextmanager
async def chat_action(bot: Bot, to: Destination, action: str, every_s: float) -> AsyncIterator[None]:
    """Show `action` ("typing…") in `to`'s chat and topic until the block ends, renewing it for long turns.

    The first one is sent before the work starts, so the user sees at once that Oh-LoRA heard.
    Best effort: a chat action that fails costs nothing but the indicator.
    """

    async def show() -> None:
        try:
            await bot.send_chat_action(to.chat_id, action, message_thread_id=to.thread_id)
        except TelegramError as error:
            logger.debug("chat action in %s failed: %s", to.chat_id, error)

    async def renew() -> None:
        while True:
            await asyncio.sleep(every_s)
            await show()

    await show()
    renewing = asyncio.create_task(renew(), name=f"telegram-chat-action-{to.chat_id}")
    try:
        yield
    finally:
        renewing.cancel()
        await asyncio.wait({renewing})


class TelegramAdapter:
    """One Telegram bot over the shared command layer; `start()` returns once polling runs."""

    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        *,
        inbox: Inbox,
        alerts: AdminAlerts | None = None,
        shutdown_grace_s: float = 5.0,
        chat_action_every_s: float = CHAT_ACTION_EVERY_S,
        polling: PollingOptions | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if settings.telegram_token is None:
            raise ValueError("TELEGRAM_TOKEN is not set")
        # python-telegram-bot's opt-in to `timedelta` periods (RetryAfter.retry_after); without it,
        # every 429 also raises a deprecation warning.
        os.environ.setdefault("PTB_TIMEDELTA", "true")
        self._commands = commands
        self._inbox = inbox
        self._alerts = alerts
        self._admin_ids = settings.admin_ids
        self._shutdown_grace_s = shutdown_grace_s
        self._chat_action_every_s = chat_action_every_s
        self._polling = polling or PollingOptions()
        self._retry = retry or RetryPolicy()
        self._pending_forgets = PendingForgets()
        self._identity: BotIdentity | None = None
        self._delivery: TelegramDelivery | None = None
        self._poller: UpdatePoller | None = None
        self._polling_task: asyncio.Task[None] | None = None
        self._running: AsyncExitStack | None = None
        self.application = (
            Application.builder()
            .token(settings.telegram_token.get_secret_value())
            .base_url(settings.telegram_api_base_url)
            .base_file_url(file_url_for(settings.telegram_api_base_url))
            .updater(None)
            .build()
        )
        self._add_handlers()

    @property
    def identity(self) -> BotIdentity:
        if self._identity is None:
            raise RuntimeError("the Telegram bot has not started")
        return self._identity

    @property
    def polling(self) -> bool:
        """Whether updates are still being fetched (False from the moment `close` begins)."""
        return self._polling_task is not None and not self._polling_task.done()

    @property
    def delivery(self) -> TelegramDelivery:
        if self._delivery is None:
            raise RuntimeError("the Telegram bot has not started")
        return self._delivery

    async def start(self) -> None:
        """Log in (getMe), register the command menus, finish what a previous run left, and poll."""
        app = self.application
        async with AsyncExitStack() as stack:
            # PTB leaves the bot's HTTP clients open when initialising fails; this closes them.
            stack.push_async_callback(app.bot.shutdown)
            try:
                await stack.enter_async_context(app)
            except InvalidToken:
                # `from None`: PTB's message quotes the token, which must never reach a log.
                raise BotLoginFailed(
                    "Telegram refused TELEGRAM_TOKEN: copy the token @BotFather gave you into .env"
                ) from None
            self._identity = BotIdentity(id=app.bot.id, username=app.bot.username)
            self._delivery = TelegramDelivery(app.bot, on_migrated=self._chat_moved, policy=self._retry)
            await self._register_command_menus(app.bot)
            await app.start()
            stack.push_async_callback(self._stop_application)
            self._poller = UpdatePoller(
                app.bot,
                self._inbox,
                screen=lambda update: answered_for(update, self.identity),
                handle=self._handle,
                options=self._polling,
            )
            await self._finish_what_was_left(self._poller)
            self._polling_task = asyncio.create_task(self._poller.run(), name="telegram-polling")
            stack.push_async_callback(_cancel, self._polling_task)
            if self._alerts is not None:
                self._alerts.add_channel(self._tell_admins)
            self._running = stack.pop_all()
        logger.info("Telegram: polling as @%s", self._identity.username)

    async def close(self) -> None:
        """Stop polling, give turns in flight a grace period, cancel the rest, release the HTTP clients."""
        running, self._running = self._running, None
        if running is not None:
            await running.aclose()
            logger.info("Telegram: stopped")

    async def _stop_application(self) -> None:
        """Turns cut short here stay unfinished in the inbox; the next start finishes them."""
        in_flight = set(self._poller.in_flight) if self._poller is not None else set()
        if in_flight:
            _, late = await asyncio.wait(in_flight, timeout=self._shutdown_grace_s)
            if late:
                logger.warning("Telegram: cancelling %d turn(s) still running at shutdown", len(late))
                for task in late:
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        await self.application.stop()

    async def _handle(self, update: Update) -> None:
        """One update through the handlers; finished in the inbox unless it was cut short."""
        await self.application.process_update(update)
        await self._inbox.done(str(update.update_id))

    async def _finish_what_was_left(self, poller: UpdatePoller) -> None:
        """Updates a previous run kept but did not finish: deliver, answer again, or say she restarted."""
        for pending in await self._inbox.unfinished():
            event_id = pending.event.event_id
            try:
                update = parse_update(Inbox.payload_of(pending.event), self.application.bot)
            except ValueError:
                update = None
            message = update.message if update is not None else None
            if update is None:
                await self._inbox.done(event_id)
            elif pending.reply is not None and message is not None:
                await self._deliver(message, pending.reply.text, pending.reply.image)
                await self._inbox.done(event_id)
            elif self._inbox.is_stale(pending.event):
                if message is not None and message.text is not None:
                    await self._deliver(message, RESTARTED_TEXT)
                await self._inbox.done(event_id)
            else:
                poller.dispatch(update)

    async def _register_command_menus(self, bot: Bot) -> None:
        """Everyone sees the user commands; each admin's private chat also lists the admin ones."""
        await bot.set_my_commands(PUBLIC_COMMANDS)
        for user_id in self._admin_user_ids():
            try:
                await bot.set_my_commands(ADMIN_COMMANDS, scope=BotCommandScopeChat(user_id))
            except TelegramError as error:
                logger.warning("Telegram: no admin menu for %s (has the admin started the bot?): %s", user_id, error)

    def _admin_user_ids(self) -> list[int]:
        ids = []
        for key in sorted(self._admin_ids):
            platform, _, user_id = key.partition(":")
            if platform == PLATFORM and user_id.isdigit():
                ids.append(int(user_id))
        return ids

    async def _tell_admins(self, text: str) -> None:
        for user_id in self._admin_user_ids():
            await self.delivery.send(Destination(chat_id=user_id), text)

    async def _chat_moved(self, old_chat_id: int, new_chat_id: int) -> None:
        await self._commands.move_chat(PLATFORM, str(old_chat_id), str(new_chat_id))

    def _add_handlers(self) -> None:
        new_messages = filters.UpdateType.MESSAGE
        commands: dict[str, Callback] = {
            "start": self._on_help,
            "help": self._on_help,
            "memory": self._on_memory,
            "mydata": self._on_mydata,
            "forget": self._on_forget,
            "reset": self._on_reset,
            "face": self._on_face,
            "stats": self._on_stats,
            "setface": self._on_setface,
            "block": self._on_block,
            "unblock": self._on_unblock,
            "memoryof": self._on_memoryof,
            "forgetof": self._on_forgetof,
        }
        app = self.application
        for name, callback in commands.items():
            app.add_handler(CommandHandler(name, callback, filters=new_messages))
        app.add_handler(CallbackQueryHandler(self._on_forget_button, pattern=_FORGET_DATA.pattern))
        app.add_handler(CallbackQueryHandler(self._on_unknown_button))
        app.add_handler(MessageHandler(filters.StatusUpdate.MIGRATE, self._on_migration))
        app.add_handler(MessageHandler(new_messages & filters.TEXT & ~filters.COMMAND, self._on_text))
        app.add_handler(MessageHandler(new_messages & filters.COMMAND, self._on_unknown_command))
        app.add_handler(MessageHandler(new_messages & ~filters.TEXT & ~filters.StatusUpdate.ALL, self._on_media))
        app.add_error_handler(self._on_error)

    async def _deliver(self, to: Message, text: str, image: RenderedFace | None = None) -> bool:
        return await self.delivery.send(destination_of(to), text, image)

    async def _answer(self, message: Message, result: CommandResult | None) -> None:
        """A command's result in its chat; None (a blocked user already told) gets nothing."""
        if result is None:
            return
        if result.file is not None:
            await self.delivery.send_file(destination_of(message), result.file.data, result.file.filename, result.text)
        else:
            await self._deliver(message, result.text, result.image)

    # ---------------------------------------------------------------- conversation

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        incoming = to_incoming(message, self.identity, event_id=str(update.update_id))
        if incoming is None:
            return
        typing = partial(
            chat_action, context.bot, destination_of(message), ChatAction.TYPING, self._chat_action_every_s
        )
        reply = await self._commands.chat(incoming, typing)
        if reply is None:
            return
        try:
            await self._inbox.keep_reply(str(update.update_id), reply)
        except Exception:
            logger.exception("Telegram: could not keep the reply to update %s; delivering it anyway", update.update_id)
        await self._deliver(message, reply.text, reply.image)

    async def _on_media(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or not is_text_only_notice_due(message, self.identity):
            return
        caller = caller_of(message)
        incoming = IncomingMessage(PLATFORM, caller.user_id, caller.chat_id, text="", event_id=str(update.update_id))
        reply = await self._commands.media_only(incoming)
        if reply is not None:
            await self._deliver(message, reply.text)

    async def _on_migration(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The old group's last word: it became a supergroup, so its data moves to the new id."""
        message = update.message
        if message is not None and message.migrate_to_chat_id is not None:
            await self._chat_moved(message.chat.id, message.migrate_to_chat_id)

    # ---------------------------------------------------------------- everyone's commands

    async def _on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.message is not None:
            await self._answer(update.message, self._commands.help())

    async def _on_memory(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or await self._kept_private(message):
            return
        await self._answer(message, await self._commands.memory(caller_of(message)))

    async def _on_mydata(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or await self._kept_private(message):
            return
        await self._answer(message, await self._commands.my_data(caller_of(message)))

    async def _kept_private(self, message: Message) -> bool:
        """Memories are listed only in a private chat: in a group, everyone would read them."""
        if message.chat.type == ChatType.PRIVATE:
            return False
        await self._deliver(message, PRIVATE_ONLY_TEXT)
        return True

    async def _on_reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.message is not None:
            await self._answer(update.message, await self._commands.reset(caller_of(update.message)))

    async def _on_face(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        uploading = partial(
            chat_action, context.bot, destination_of(message), ChatAction.UPLOAD_PHOTO, self._chat_action_every_s
        )
        await self._answer(message, await self._commands.face(caller_of(message), uploading))

    async def _on_forget(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """`/forget` (everything) or `/forget <key>`: show what would go, delete only on "지우기"."""
        message = update.message
        if message is None or message.from_user is None:
            return
        if await self._kept_private(message):
            return
        key = " ".join(context.args or ()) or None
        preview = await self._commands.forget_preview(caller_of(message), key)
        if not preview.ok:
            await self._answer(message, preview)
            return
        token = self._pending_forgets.add(PendingForget(message.from_user.id, message.chat.id, key))
        to = destination_of(message)

        def ask(where: Destination) -> Coroutine[Any, Any, object]:
            return context.bot.send_message(
                where.chat_id, preview.text, reply_markup=forget_buttons(token), message_thread_id=where.thread_id
            )

        await self.delivery.call(to, ask)

    async def _on_forget_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        parsed = parse_forget_data(query.data)
        pending = self._pending_forgets.get(parsed[0]) if parsed else None
        if parsed is None or pending is None:
            await _answer_query(query, FORGET_EXPIRED_TEXT)
            return
        if query.from_user.id != pending.user_id:
            await _answer_query(query, NOT_YOUR_BUTTON_TEXT)
            return
        token, confirmed = parsed
        self._pending_forgets.discard(token)
        # Answered first: forgetting waits for a turn of the user's still running.
        await _answer_query(query)
        if confirmed:
            caller = Caller(platform=PLATFORM, user_id=str(pending.user_id), chat_id=str(pending.chat_id))
            text = (await self._commands.forget(caller, pending.key)).text
        else:
            text = FORGET_CANCELLED_TEXT
        await query.edit_message_text(text)

    async def _on_unknown_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """A button from an older version or another bot: answered, so the user's button stops spinning."""
        if update.callback_query is not None:
            await _answer_query(update.callback_query, UNKNOWN_BUTTON_TEXT)

    async def _on_unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is not None and wants_unknown_command_hint(message, self.identity):
            await self._deliver(message, UNKNOWN_COMMAND_TEXT)

    # ---------------------------------------------------------------- admin commands (Commands checks who)

    async def _on_stats(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.message is not None:
            caller = caller_of(update.message)
            await self._answer_admin(update.message, caller, await self._commands.stats(caller))

    async def _on_setface(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """The chat's own face: answered in the chat it is about."""
        message = update.message
        if message is None:
            return
        caller = caller_of(message)
        try:
            face = parse_face(context.args or ())
        except UsageError as usage:
            await self._usage(message, caller, usage)
            return
        await self._answer(message, await self._commands.set_face(caller, face))

    async def _on_block(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._on_block_command(update, context, "block", blocked=True)

    async def _on_unblock(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        await self._on_block_command(update, context, "unblock", blocked=False)

    async def _on_block_command(
        self, update: Update, context: ContextTypes.DEFAULT_TYPE, command: str, *, blocked: bool
    ) -> None:
        message = update.message
        if message is None:
            return
        caller = caller_of(message)
        try:
            target = parse_target(command, context.args or (), message)
        except UsageError as usage:
            await self._usage(message, caller, usage)
            return
        await self._answer_admin(message, caller, await self._commands.block(caller, target, blocked))

    async def _on_memoryof(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        caller = caller_of(message)
        try:
            target = parse_target("memoryof", context.args or (), message)
        except UsageError as usage:
            await self._usage(message, caller, usage)
            return
        await self._answer_admin(message, caller, await self._commands.memory_of(caller, target))

    async def _on_forgetof(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Everything stored about a user, gone: what their own `/forget` does, by an admin."""
        message = update.message
        if message is None:
            return
        caller = caller_of(message)
        try:
            target = parse_target("forgetof", context.args or (), message)
        except UsageError as usage:
            await self._usage(message, caller, usage)
            return
        await self._answer_admin(message, caller, await self._commands.forget_of(caller, target))

    async def _answer_admin(self, message: Message, caller: Caller, result: CommandResult) -> None:
        """Bot-wide admin output goes only to the admin's private chat, never into a group.

        A refusal is answered where it was asked: it tells nobody anything.
        """
        if message.chat.type == ChatType.PRIVATE or not self._commands.is_bot_admin(caller):
            await self._answer(message, result)
            return
        delivered = await self.delivery.send(Destination(chat_id=int(caller.user_id)), result.text)
        await self._deliver(message, SENT_PRIVATELY_TEXT if delivered else OPEN_PRIVATE_CHAT_TEXT)

    async def _usage(self, message: Message, caller: Caller, usage: UsageError) -> None:
        """How to use an admin command is itself for admins; everyone else is refused as usual."""
        await self._deliver(message, str(usage) if self._commands.may_manage_chat(caller) else NOT_ADMIN_TEXT)

    # ---------------------------------------------------------------- the unexpected

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log with the traceback; the user still gets an apology when there is a chat to send it to."""
        logger.error("Telegram: an update failed", exc_info=context.error)
        message = update.effective_message if isinstance(update, Update) else None
        if message is not None:
            await self._deliver(message, ERROR_TEXT)


async def _answer_query(query: CallbackQuery, alert: str | None = None) -> None:
    """Stop the button's spinner. A press answered too late (after a restart) is refused by Telegram: no harm."""
    try:
        await query.answer(alert, show_alert=alert is not None)
    except TelegramError as error:
        logger.debug("Telegram: could not answer a button press: %s", error)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
