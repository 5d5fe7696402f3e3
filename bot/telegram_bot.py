"""Oh-LoRA on Telegram: python-telegram-bot long polling in the shared event loop.

This module only translates. A Telegram message becomes an `IncomingMessage` (or nothing, when
the bot was not addressed) and a command becomes a `Commands` call; the `Reply` or
`CommandResult` goes back as a photo with a caption, an animation, or plain messages cut to
Telegram's limits. Who may do what is decided in `bot.commands`, never here.

The translation functions at the top are pure, so the group-chat rules are tested without a
network; `TelegramAdapter` wires them to a PTB `Application`. Updates are handled concurrently:
the engine keeps each user's turns in order itself, so one slow turn never stalls other users.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from telegram import (
    Bot,
    BotCommand,
    BotCommandScopeChat,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    InputFile,
    Message,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatType, MessageLimit
from telegram.error import InvalidToken, TelegramError
from telegram.ext import Application, CallbackQueryHandler, CommandHandler, ContextTypes, MessageHandler, filters

from bot.commands import NOT_ADMIN_TEXT, PRIVATE_ONLY_TEXT, Caller, CommandResult, Commands
from bot.errors import BotLoginFailed
from core.config import Settings
from core.engine import ERROR_TEXT
from core.types import IncomingMessage, RenderedFace

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
CAPTION_LIMIT = int(MessageLimit.CAPTION_LENGTH)
TEXT_LIMIT = int(MessageLimit.MAX_TEXT_LENGTH)
CHAT_ACTION_EVERY_S = 4.0
"""Telegram shows a chat action for about five seconds; a long turn renews it before it fades."""

ALLOWED_UPDATES = (Update.MESSAGE, Update.CALLBACK_QUERY)

UNKNOWN_COMMAND_TEXT = "그건 내가 모르는 명령이야 🤔 /help 를 보내 봐!"
FORGET_CANCELLED_TEXT = "알겠어, 아무것도 지우지 않았어. 😊"
FORGET_EXPIRED_TEXT = "이 확인은 만료됐어. /forget 을 다시 보내 줘."
NOT_YOUR_BUTTON_TEXT = "이 버튼은 /forget 을 보낸 사람만 누를 수 있어."
FORGET_CONFIRM = "지우기"
FORGET_CANCEL = "취소"
SETFACE_USAGE = "사용법: /setface <얼굴 번호> (기본 얼굴로 돌리려면 /setface default)"
TARGET_USAGE = (
    "사용법: /{command} <사용자 id> (다른 플랫폼은 discord:1234 처럼), 또는 그 사람의 메시지에 답장으로 /{command}"
)

PUBLIC_COMMANDS = (
    BotCommand("start", "오로라와 인사하기"),
    BotCommand("help", "도움말"),
    BotCommand("memory", "내가 기억하는 너에 대한 것들"),
    BotCommand("forget", "기억 지우기 (하나 또는 전부)"),
    BotCommand("reset", "지금까지의 대화 요약 지우기"),
    BotCommand("face", "지금 내 얼굴 보기"),
)
ADMIN_COMMANDS = (
    *PUBLIC_COMMANDS,
    BotCommand("stats", "통계 (관리자)"),
    BotCommand("setface", "이 대화의 얼굴 정하기 (관리자)"),
    BotCommand("block", "사용자 차단 (관리자)"),
    BotCommand("unblock", "차단 풀기 (관리자)"),
    BotCommand("memoryof", "사용자의 기억 보기 (관리자)"),
)


# --------------------------------------------------------------------------------------------
# Pure translation


@dataclass(frozen=True)
class BotIdentity:
    """Who the bot is on Telegram, as getMe answered: what mentions and replies are checked against."""

    id: int
    username: str


class UsageError(ValueError):
    """A command's arguments could not be understood; the message says how to use it."""


def is_mentioned(message: Message, bot: BotIdentity) -> bool:
    entities = message.parse_entities([MessageEntity.MENTION, MessageEntity.TEXT_MENTION])
    for entity, text in entities.items():
        if entity.type == MessageEntity.MENTION and text[1:].lower() == bot.username.lower():
            return True
        if entity.type == MessageEntity.TEXT_MENTION and entity.user is not None and entity.user.id == bot.id:
            return True
    return False


def is_reply_to_bot(message: Message, bot: BotIdentity) -> bool:
    replied = message.reply_to_message
    return replied is not None and replied.from_user is not None and replied.from_user.id == bot.id


def should_answer(message: Message, bot: BotIdentity) -> bool:
    """Private chats always; groups only when the bot is mentioned or replied to; never other bots."""
    sender = message.from_user
    if sender is None or sender.is_bot or message.text is None:
        return False
    if message.chat.type == ChatType.PRIVATE:
        return True
    return is_mentioned(message, bot) or is_reply_to_bot(message, bot)


def strip_mention(text: str, username: str) -> str:
    """The user's words without the @mention that addressed the bot."""
    without = re.sub(rf"\s*@{re.escape(username)}(?!\w)\s*", " ", text, flags=re.IGNORECASE)
    return without.strip()


def to_incoming(message: Message, bot: BotIdentity, admin_ids: frozenset[str]) -> IncomingMessage | None:
    """The engine's view of a message, or None when Oh-LoRA was not addressed."""
    if not should_answer(message, bot):
        return None
    assert message.from_user is not None and message.text is not None  # should_answer checked both
    user_id = str(message.from_user.id)
    return IncomingMessage(
        platform=PLATFORM,
        user_id=user_id,
        chat_id=str(message.chat.id),
        text=strip_mention(message.text, bot.username),
        is_admin=f"{PLATFORM}:{user_id}" in admin_ids,
    )


def caller_of(message: Message) -> Caller:
    assert message.from_user is not None, "commands always come from a user"
    return Caller(platform=PLATFORM, user_id=str(message.from_user.id), chat_id=str(message.chat.id))


def reply_target(message: Message) -> int | None:
    """In groups Oh-LoRA answers as a reply, so everyone sees whom she is talking to."""
    return None if message.chat.type == ChatType.PRIVATE else message.message_id


def command_addressee(message: Message) -> str | None:
    """The bot named in `/command@bot`, or None for a bare `/command`."""
    words = (message.text or "").split(maxsplit=1)
    if not words:
        return None
    _, at, name = words[0].partition("@")
    return name if at else None


def wants_unknown_command_hint(message: Message, bot: BotIdentity) -> bool:
    """In groups a bare `/command` may be for another bot: hint only when addressed to us."""
    if message.chat.type == ChatType.PRIVATE:
        return True
    addressee = command_addressee(message)
    return addressee is not None and addressee.lower() == bot.username.lower()


def utf16_length(text: str) -> int:
    """Telegram counts message and caption lengths in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def _take(text: str, limit: int) -> tuple[str, str]:
    """The longest head of `text` within `limit`, cut at a line break or space where one is near."""
    if utf16_length(text) <= limit:
        return text, ""
    fits, used = 0, 0
    for char in text:
        used += 2 if ord(char) > 0xFFFF else 1
        if used > limit:
            break
        fits += 1
    window = text[:fits]
    cut = next((at for at in (window.rfind("\n"), window.rfind(" ")) if at > fits // 2), fits)
    return text[:cut].rstrip(), text[cut:].lstrip()


def split_text(text: str, limit: int = TEXT_LIMIT) -> list[str]:
    """Pieces of at most `limit` UTF-16 units each, in order, none empty."""
    if limit < 2:
        raise ValueError("a limit below 2 cannot hold every character")
    pieces: list[str] = []
    rest = text.strip()
    while rest:
        piece, rest = _take(rest, limit)
        pieces.append(piece)
    return pieces


def split_caption(text: str) -> tuple[str, list[str]]:
    """A caption within Telegram's caption limit, and the messages that carry the rest."""
    caption, rest = _take(text.strip(), CAPTION_LIMIT)
    return caption, split_text(rest)


def parse_face(args: Sequence[str]) -> int | None:
    """`/setface 931` pins face 931; `/setface default` goes back to the configured default."""
    if len(args) == 1 and args[0].isdigit():
        return int(args[0])
    if len(args) == 1 and args[0].lower() in ("default", "기본"):
        return None
    raise UsageError(SETFACE_USAGE)


def parse_target(command: str, args: Sequence[str], message: Message) -> str:
    """The user key an admin command is about: `123` (Telegram), `discord:456`, or a replied-to sender."""
    if len(args) == 1:
        target = args[0]
        if target.isdigit():
            return f"{PLATFORM}:{target}"
        platform, colon, user_id = target.partition(":")
        if colon and platform.isalpha() and user_id and not any(char.isspace() for char in user_id):
            return f"{platform.lower()}:{user_id}"
    if not args and message.reply_to_message is not None and message.reply_to_message.from_user is not None:
        return f"{PLATFORM}:{message.reply_to_message.from_user.id}"
    raise UsageError(TARGET_USAGE.format(command=command))


_FORGET_DATA = re.compile(r"forget:(?P<token>[0-9a-f]+):(?P<choice>yes|no)")


def forget_buttons(token: str) -> InlineKeyboardMarkup:
    return InlineKeyboardMarkup(
        [
            [
                InlineKeyboardButton(FORGET_CONFIRM, callback_data=f"forget:{token}:yes"),
                InlineKeyboardButton(FORGET_CANCEL, callback_data=f"forget:{token}:no"),
            ]
        ]
    )


def parse_forget_data(data: str | None) -> tuple[str, bool] | None:
    """(token, confirmed) from a forget button's callback data."""
    match = _FORGET_DATA.fullmatch(data or "")
    return None if match is None else (match["token"], match["choice"] == "yes")


@dataclass(frozen=True)
class PendingForget:
    user_id: int
    chat_id: int
    key: str | None
    """One memory's key, or None for all of them."""


class PendingForgets:
    """Forget requests waiting for their button press.

    Callback data holds at most 64 bytes, too few for a Korean memory key, so the buttons carry
    a short random token and the request waits here. The oldest are dropped beyond `capacity`;
    their buttons then answer that they expired.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, PendingForget] = OrderedDict()

    def add(self, pending: PendingForget) -> str:
        token = secrets.token_hex(8)
        self._items[token] = pending
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)
        return token

    def get(self, token: str) -> PendingForget | None:
        return self._items.get(token)

    def discard(self, token: str) -> None:
        self._items.pop(token, None)


def file_url_for(base_url: str) -> str:
    """The Bot API serves files next to its methods: `.../bot` → `.../file/bot`."""
    head, _, tail = base_url.rpartition("/")
    return f"{head}/file/{tail}"


# --------------------------------------------------------------------------------------------
# The adapter

Callback = Callable[[Update, ContextTypes.DEFAULT_TYPE], Coroutine[Any, Any, None]]


@asynccontextmanager
async def chat_action(bot: Bot, chat_id: int, action: str, every_s: float) -> AsyncIterator[None]:
    """Show `action` ("typing…") until the block ends, renewing it for long turns.

    The first one is sent before the work starts, so the user sees at once that Oh-LoRA heard.
    """

    async def show() -> None:
        try:
            await bot.send_chat_action(chat_id, action)
        except TelegramError as error:
            logger.debug("chat action in %s failed: %s", chat_id, error)

    async def renew() -> None:
        while True:
            await asyncio.sleep(every_s)
            await show()

    await show()
    renewing = asyncio.create_task(renew(), name=f"telegram-chat-action-{chat_id}")
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
        shutdown_grace_s: float = 5.0,
        chat_action_every_s: float = CHAT_ACTION_EVERY_S,
        poll_timeout_s: float = 10.0,
    ) -> None:
        if settings.telegram_token is None:
            raise ValueError("TELEGRAM_TOKEN is not set")
        self._commands = commands
        self._admin_ids = settings.admin_ids
        self._shutdown_grace_s = shutdown_grace_s
        self._chat_action_every_s = chat_action_every_s
        self._poll_timeout_s = poll_timeout_s
        self._pending_forgets = PendingForgets()
        self._in_flight: set[asyncio.Task[object]] = set()
        self._identity: BotIdentity | None = None
        self._running: AsyncExitStack | None = None
        self.application = (
            Application.builder()
            .token(settings.telegram_token.get_secret_value())
            .base_url(settings.telegram_api_base_url)
            .base_file_url(file_url_for(settings.telegram_api_base_url))
            .concurrent_updates(True)
            .build()
        )
        self._add_handlers()

    @property
    def identity(self) -> BotIdentity:
        if self._identity is None:
            raise RuntimeError("the Telegram bot has not started")
        return self._identity

    async def start(self) -> None:
        """Log in (getMe), register the command menus, and poll in the background."""
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
            await self._register_command_menus(app.bot)
            await app.start()
            stack.push_async_callback(self._stop_application)
            assert app.updater is not None, "the builder always makes an updater"
            await app.updater.start_polling(
                timeout=dt.timedelta(seconds=self._poll_timeout_s), allowed_updates=list(ALLOWED_UPDATES)
            )
            stack.push_async_callback(app.updater.stop)
            self._running = stack.pop_all()
        logger.info("Telegram: polling as @%s", self._identity.username)

    async def close(self) -> None:
        """Stop polling, give turns in flight a grace period, cancel the rest, release the HTTP clients."""
        running, self._running = self._running, None
        if running is not None:
            await running.aclose()
            logger.info("Telegram: stopped")

    async def _stop_application(self) -> None:
        stopping = asyncio.create_task(self.application.stop(), name="telegram-application-stop")
        await asyncio.wait({stopping}, timeout=self._shutdown_grace_s)
        cancelled: set[asyncio.Task[object]] = set()
        while not stopping.done():
            late = self._in_flight - cancelled
            if late:
                logger.warning("Telegram: cancelling %d turn(s) still running at shutdown", len(late))
            for task in late:
                task.cancel()
            cancelled |= late
            await asyncio.wait({stopping}, timeout=0.1)
        await stopping

    async def _register_command_menus(self, bot: Bot) -> None:
        """Everyone sees the user commands; each admin's private chat also lists the admin ones."""
        await bot.set_my_commands(PUBLIC_COMMANDS)
        for key in sorted(self._admin_ids):
            platform, _, user_id = key.partition(":")
            if platform != PLATFORM or not user_id.isdigit():
                continue
            try:
                await bot.set_my_commands(ADMIN_COMMANDS, scope=BotCommandScopeChat(int(user_id)))
            except TelegramError as error:
                logger.warning("Telegram: no admin menu for %s (has the admin started the bot?): %s", key, error)

    def _add_handlers(self) -> None:
        new_messages = filters.UpdateType.MESSAGE
        commands: dict[str, Callback] = {
            "start": self._on_help,
            "help": self._on_help,
            "memory": self._on_memory,
            "forget": self._on_forget,
            "reset": self._on_reset,
            "face": self._on_face,
            "stats": self._on_stats,
            "setface": self._on_setface,
            "block": self._on_block,
            "unblock": self._on_unblock,
            "memoryof": self._on_memoryof,
        }
        app = self.application
        for name, callback in commands.items():
            app.add_handler(CommandHandler(name, self._tracked(callback), filters=new_messages))
        app.add_handler(CallbackQueryHandler(self._tracked(self._on_forget_button), pattern=_FORGET_DATA.pattern))
        app.add_handler(MessageHandler(new_messages & filters.TEXT & ~filters.COMMAND, self._tracked(self._on_text)))
        app.add_handler(MessageHandler(new_messages & filters.COMMAND, self._tracked(self._on_unknown_command)))
        app.add_error_handler(self._on_error)

    def _tracked(self, callback: Callback) -> Callback:
        """Remember the task handling each update, so shutdown can wait for it or cancel it."""

        async def run(update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                await callback(update, context)
            finally:
                self._in_flight.discard(task)

        return run

    # ---------------------------------------------------------------- conversation

    async def _on_text(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        incoming = to_incoming(message, self.identity, self._admin_ids)
        if incoming is None:
            return
        async with self._commands.in_order(incoming.user_key):
            typing = partial(chat_action, context.bot, message.chat.id, ChatAction.TYPING, self._chat_action_every_s)
            reply = await self._commands.chat(incoming, typing)
            if reply is not None:
                await self._send(context.bot, message, reply.text, reply.image)

    async def _send(self, bot: Bot, to: Message, text: str, image: RenderedFace | None = None) -> None:
        """Text and optional face into `to`'s chat: the face carries the start of the text as caption."""
        target = reply_target(to)
        reply = ReplyParameters(message_id=target, allow_sending_without_reply=True) if target else None
        if image is None:
            chunks = split_text(text)
        else:
            caption, chunks = split_caption(text)
            media = InputFile(image.data, filename=image.filename)
            if image.mime_type == "image/gif":
                await bot.send_animation(to.chat.id, media, caption=caption or None, reply_parameters=reply)
            else:
                await bot.send_photo(to.chat.id, media, caption=caption or None, reply_parameters=reply)
            reply = None
        for chunk in chunks:
            await bot.send_message(to.chat.id, chunk, reply_parameters=reply)
            reply = None

    async def _answer(self, context: ContextTypes.DEFAULT_TYPE, message: Message, result: CommandResult) -> None:
        await self._send(context.bot, message, result.text, result.image)

    # ---------------------------------------------------------------- everyone's commands

    async def _on_help(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.message is not None:
            await self._answer(context, update.message, self._commands.help())

    async def _on_memory(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None or await self._kept_private(context, message):
            return
        await self._answer(context, message, await self._commands.memory(caller_of(message)))

    async def _kept_private(self, context: ContextTypes.DEFAULT_TYPE, message: Message) -> bool:
        """Memories are listed only in a private chat: in a group, everyone would read them."""
        if message.chat.type == ChatType.PRIVATE:
            return False
        await self._send(context.bot, message, PRIVATE_ONLY_TEXT)
        return True

    async def _on_reset(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.message is not None:
            await self._answer(context, update.message, await self._commands.reset(caller_of(update.message)))

    async def _on_face(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        async with chat_action(context.bot, message.chat.id, ChatAction.UPLOAD_PHOTO, self._chat_action_every_s):
            result = await self._commands.face(caller_of(message))
        await self._answer(context, message, result)

    async def _on_forget(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        """`/forget` (everything) or `/forget <key>`: show what would go, delete only on "지우기"."""
        message = update.message
        if message is None or message.from_user is None:
            return
        if await self._kept_private(context, message):
            return
        key = " ".join(context.args or ()) or None
        preview = await self._commands.forget_preview(caller_of(message), key)
        if not preview.ok:
            await self._answer(context, message, preview)
            return
        token = self._pending_forgets.add(PendingForget(message.from_user.id, message.chat.id, key))
        target = reply_target(message)
        await context.bot.send_message(
            message.chat.id,
            preview.text,
            reply_markup=forget_buttons(token),
            reply_parameters=ReplyParameters(target, allow_sending_without_reply=True) if target else None,
        )

    async def _on_forget_button(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        query = update.callback_query
        if query is None:
            return
        parsed = parse_forget_data(query.data)
        pending = self._pending_forgets.get(parsed[0]) if parsed else None
        if parsed is None or pending is None:
            await query.answer(FORGET_EXPIRED_TEXT, show_alert=True)
            return
        if query.from_user.id != pending.user_id:
            await query.answer(NOT_YOUR_BUTTON_TEXT, show_alert=True)
            return
        token, confirmed = parsed
        self._pending_forgets.discard(token)
        if confirmed:
            caller = Caller(platform=PLATFORM, user_id=str(pending.user_id), chat_id=str(pending.chat_id))
            text = (await self._commands.forget(caller, pending.key)).text
        else:
            text = FORGET_CANCELLED_TEXT
        await query.answer()
        await query.edit_message_text(text)

    async def _on_unknown_command(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is not None and wants_unknown_command_hint(message, self.identity):
            await self._send(context.bot, message, UNKNOWN_COMMAND_TEXT)

    # ---------------------------------------------------------------- admin commands (Commands checks who)

    async def _on_stats(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        if update.message is not None:
            await self._answer(context, update.message, await self._commands.stats(caller_of(update.message)))

    async def _on_setface(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        caller = caller_of(message)
        try:
            face = parse_face(context.args or ())
        except UsageError as usage:
            await self._usage(context, message, caller, usage)
            return
        await self._answer(context, message, await self._commands.set_face(caller, face))

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
            await self._usage(context, message, caller, usage)
            return
        await self._answer(context, message, await self._commands.block(caller, target, blocked))

    async def _on_memoryof(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.message
        if message is None:
            return
        caller = caller_of(message)
        try:
            target = parse_target("memoryof", context.args or (), message)
        except UsageError as usage:
            await self._usage(context, message, caller, usage)
            return
        if self._commands.is_admin(caller) and await self._kept_private(context, message):
            return
        await self._answer(context, message, await self._commands.memory_of(caller, target))

    async def _usage(
        self, context: ContextTypes.DEFAULT_TYPE, message: Message, caller: Caller, usage: UsageError
    ) -> None:
        """How to use an admin command is itself for admins; everyone else is refused as usual."""
        text = str(usage) if self._commands.is_admin(caller) else NOT_ADMIN_TEXT
        await self._send(context.bot, message, text)

    # ---------------------------------------------------------------- the unexpected

    async def _on_error(self, update: object, context: ContextTypes.DEFAULT_TYPE) -> None:
        """Log with the traceback; the user still gets an apology when there is a chat to send it to."""
        logger.error("Telegram: an update failed", exc_info=context.error)
        chat = update.effective_chat if isinstance(update, Update) else None
        if chat is None:
            return
        try:
            await context.bot.send_message(chat.id, ERROR_TEXT)
        except TelegramError as error:
            logger.warning("Telegram: could not apologise in chat %s: %s", chat.id, error)
