"""What a Telegram update means for Oh-LoRA: pure rules, tested without a network.

Whether she answers (private chats always, groups when mentioned or replied to), what the engine
reads (the words without the mention), where her reply goes (same chat and forum topic, as a
reply in groups), what an admin command is about, and the `/forget` confirmation buttons.
"""

from __future__ import annotations

import re
import secrets
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from telegram import (
    BotCommand,
    InlineKeyboardButton,
    InlineKeyboardMarkup,
    Message,
    MessageEntity,
    MessageOriginUser,
    Update,
)
from telegram.constants import ChatType

from bot.commands import Caller
from bot.telegram_delivery import Destination
from core.types import IncomingMessage, user_key

PLATFORM = "telegram"
UNKNOWN_COMMAND_TEXT = "그건 내가 모르는 명령이야 🤔 /help 를 보내 봐!"
FORGET_CANCELLED_TEXT = "알겠어, 아무것도 지우지 않았어. 😊"
FORGET_EXPIRED_TEXT = "이 확인은 만료됐어. /forget 을 다시 보내 줘."
NOT_YOUR_BUTTON_TEXT = "이 버튼은 /forget 을 보낸 사람만 누를 수 있어."
UNKNOWN_BUTTON_TEXT = "이 버튼은 이제 쓸 수 없어."
SENT_PRIVATELY_TEXT = "관리자 명령의 결과는 개인 채팅으로 보냈어요. 📬"
OPEN_PRIVATE_CHAT_TEXT = "관리자 명령의 결과는 개인 채팅으로만 보내요. 저와의 개인 채팅에서 /start 를 먼저 보내 주세요."
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
    BotCommand("forget", "나에 대한 모든 것 지우기 (/forget 키: 기억 하나만)"),
    BotCommand("mydata", "오로라가 저장한 나의 데이터 받기"),
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
    BotCommand("forgetof", "사용자에 대해 저장된 모든 것 지우기 (관리자)"),
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


def is_addressed(message: Message, bot: BotIdentity) -> bool:
    """A private chat, or a group message that mentions the bot or replies to it; never from a bot."""
    sender = message.from_user
    if sender is None or sender.is_bot:
        return False
    if message.chat.type == ChatType.PRIVATE:
        return True
    return is_mentioned(message, bot) or is_reply_to_bot(message, bot)


def should_answer(message: Message, bot: BotIdentity) -> bool:
    """Private chats always; groups only when the bot is mentioned or replied to; never other bots."""
    return message.text is not None and is_addressed(message, bot)


def is_text_only_notice_due(message: Message, bot: BotIdentity) -> bool:
    """A picture, sticker or file sent to her: she says she reads only text (see `TEXT_ONLY_TEXT`)."""
    return message.text is None and _carries_media(message) and is_addressed(message, bot)


def _carries_media(message: Message) -> bool:
    return message.effective_attachment is not None


def is_forwarded(message: Message) -> bool:
    """Someone else's words passed on: answered, never stored as the sender's memory."""
    return message.forward_origin is not None


def strip_mention(text: str, username: str) -> str:
    """The user's words without the @mention that addressed the bot."""
    without = re.sub(rf"\s*@{re.escape(username)}(?!\w)\s*", " ", text, flags=re.IGNORECASE)
    return without.strip()


def to_incoming(message: Message, bot: BotIdentity, event_id: str | None = None) -> IncomingMessage | None:
    """The engine's view of a message, or None when Oh-LoRA was not addressed."""
    if not should_answer(message, bot):
        return None
    assert message.from_user is not None and message.text is not None  # should_answer checked both
    return IncomingMessage(
        platform=PLATFORM,
        user_id=str(message.from_user.id),
        chat_id=str(message.chat.id),
        text=strip_mention(message.text, bot.username),
        event_id=event_id,
        forwarded=is_forwarded(message),
    )


def answered_for(update: Update, bot: BotIdentity) -> str | None:
    """The user key an update will be answered for, or None for one she ignores (not kept in the inbox).

    Kept: everything in private chats, commands, messages that address her, button presses, and
    the notice that a group moved (its data must follow).
    """
    if update.callback_query is not None:
        return user_key(PLATFORM, str(update.callback_query.from_user.id))
    message = update.message
    if message is None:
        return None
    if message.migrate_to_chat_id is not None:
        return user_key(PLATFORM, str(message.from_user.id if message.from_user else message.chat.id))
    if message.from_user is None or message.from_user.is_bot:
        return None
    is_command = (message.text or "").startswith("/")
    if is_command or is_addressed(message, bot):
        return user_key(PLATFORM, str(message.from_user.id))
    return None


def destination_of(message: Message) -> Destination:
    """Her reply's place: the same chat and forum topic, as a reply in groups (everyone sees whom to)."""
    return Destination(
        chat_id=message.chat.id,
        thread_id=message.message_thread_id if message.is_topic_message else None,
        reply_to=None if message.chat.type == ChatType.PRIVATE else message.message_id,
    )


def caller_of(message: Message) -> Caller:
    assert message.from_user is not None, "commands always come from a user"
    return Caller(platform=PLATFORM, user_id=str(message.from_user.id), chat_id=str(message.chat.id))


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
            return user_key(PLATFORM, target)
        platform, colon, user_id = target.partition(":")
        if colon and platform.isalpha() and user_id and not any(char.isspace() for char in user_id):
            return f"{platform.lower()}:{user_id}"
    if not args and message.reply_to_message is not None:
        target_user = _author_of(message.reply_to_message)
        if target_user is not None:
            return user_key(PLATFORM, str(target_user))
    raise UsageError(TARGET_USAGE.format(command=command))


def _author_of(message: Message) -> int | None:
    """Who wrote a message: for a forward (an admin passing someone's message on), its original sender."""
    origin = message.forward_origin
    if isinstance(origin, MessageOriginUser):
        return origin.sender_user.id
    return message.from_user.id if message.from_user is not None else None


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
