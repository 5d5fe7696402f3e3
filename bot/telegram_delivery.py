"""Getting a reply to a Telegram chat as the Bot API actually behaves: refusals, limits, outages.

One computed answer is worth retrying for, and never worth an apology once it exists:

- 429 waits out `retry_after` (bounded), 5xx and dropped connections back off and retry;
- a read timeout may well have been delivered: it counts as sent (a retry could post twice);
- a caption Telegram refuses goes as a photo without caption followed by the text; a reply to a
  message that is gone goes as a plain message; a face that cannot be sent leaves the text;
- a group that became a supergroup (ChatMigrated) is followed to its new id, and the chat's data
  moves with it (`on_migrated`);
- a chat that blocked the bot (403) is given up at once.

`send` returns whether the text reached the chat (or may have); it never raises for the
platform's faults, so the caller's only apology is for a turn that produced no answer.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

import httpx
from telegram import Bot, InputFile, ReplyParameters
from telegram.constants import MessageLimit
from telegram.error import BadRequest, ChatMigrated, Forbidden, NetworkError, RetryAfter, TelegramError, TimedOut
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_after_delay

from core.types import RenderedFace

logger = logging.getLogger(__name__)

CAPTION_LIMIT = int(MessageLimit.CAPTION_LENGTH)
TEXT_LIMIT = int(MessageLimit.MAX_TEXT_LENGTH)


@dataclass(frozen=True)
class Destination:
    """Where a reply goes: the chat, its forum topic, and the message it answers (in groups)."""

    chat_id: int
    thread_id: int | None = None
    reply_to: int | None = None


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6
    """Tries of one API call on 5xx, dropped connections and 429s."""
    max_wait_s: float = 120.0
    """Past this, one call is given up however the server asks to wait."""
    backoff_s: float = 0.5
    """The first pause after a 5xx or a dropped connection; each later one doubles, up to 8 s."""


OnMigrated = Callable[[int, int], Awaitable[None]]
"""(old chat id, new chat id): the chat's stored data should follow it."""


class DeliveryFailed(Exception):
    """An API call was refused for good, or kept failing past the retry policy."""


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


def seconds_to_wait(error: RetryAfter) -> float:
    """`retry_after` is a timedelta with PTB_TIMEDELTA set (the adapter sets it), seconds otherwise."""
    after = error.retry_after
    return after.total_seconds() if isinstance(after, dt.timedelta) else float(after)


def may_have_arrived(error: TelegramError) -> bool:
    """A request that timed out after it was sent may have been delivered; one never sent was not."""
    return isinstance(error, TimedOut) and not isinstance(error.__cause__, httpx.ConnectTimeout | httpx.PoolTimeout)


def is_transient(error: BaseException) -> bool:
    """Worth the same call again: flood control, 5xx and dropped or refused connections."""
    if isinstance(error, RetryAfter):
        return True
    if isinstance(error, BadRequest | Forbidden):
        return False
    if isinstance(error, TimedOut):
        return not may_have_arrived(error)
    return isinstance(error, NetworkError)


def _is_reply_target_gone(error: BadRequest) -> bool:
    return "replied not found" in error.message.lower() or "reply message not found" in error.message.lower()


def _is_caption_refused(error: BadRequest) -> bool:
    return "caption" in error.message.lower()


class TelegramDelivery:
    def __init__(
        self,
        bot: Bot,
        *,
        on_migrated: OnMigrated,
        policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bot = bot
        self._on_migrated = on_migrated
        self._policy = policy
        self._sleep = sleep

    async def send(self, to: Destination, text: str, image: RenderedFace | None = None) -> bool:
        """Text (and the face, carrying the text's start as caption) into the chat; False if nothing got there."""
        try:
            if image is None:
                await self._messages(to, split_text(text))
                return True
            return await self._with_face(to, text, image)
        except DeliveryFailed as error:
            logger.warning("Telegram: could not deliver to chat %s: %s", to.chat_id, error)
            return False

    async def send_file(self, to: Destination, data: bytes, filename: str, caption: str) -> bool:
        """A document (the `/mydata` export) with a short caption; False if it did not get there."""

        def call(where: Destination) -> Coroutine[Any, Any, object]:
            return self._bot.send_document(
                where.chat_id, InputFile(data, filename=filename), caption=caption or None, **_placement(where)
            )

        try:
            await self.call(to, call)
        except DeliveryFailed as error:
            logger.warning("Telegram: could not send %s to chat %s: %s", filename, to.chat_id, error)
            return False
        return True

    async def _with_face(self, to: Destination, text: str, image: RenderedFace) -> bool:
        """The face with the start of the text as caption, then the rest; the text survives a face that fails."""
        caption, rest = split_caption(text)
        try:
            after = replace(await self._face(to, image, caption), reply_to=None)
        except DeliveryFailed as error:
            refused = error.__cause__
            if isinstance(refused, BadRequest) and _is_caption_refused(refused):
                logger.info("Telegram: caption refused in chat %s; sending the text apart", to.chat_id)
                after = await self._face_alone(to, image)
            else:
                logger.warning("Telegram: no face for chat %s (%s); sending the text alone", to.chat_id, error)
                after = to
            rest = split_text(text)
        await self._messages(after, rest)
        return True

    async def _face_alone(self, to: Destination, image: RenderedFace) -> Destination:
        """Where the text should go next: after the face if it got there, else where the face would have."""
        try:
            return replace(await self._face(to, image, ""), reply_to=None)
        except DeliveryFailed as error:
            logger.warning("Telegram: no face for chat %s (%s); sending the text alone", to.chat_id, error)
            return to

    async def _face(self, to: Destination, image: RenderedFace, caption: str) -> Destination:
        send = self._bot.send_animation if image.mime_type == "image/gif" else self._bot.send_photo

        def call(where: Destination) -> Coroutine[Any, Any, object]:
            return send(
                where.chat_id,
                InputFile(image.data, filename=image.filename),
                caption=caption or None,
                **_placement(where),
            )

        return await self.call(to, call)

    async def _messages(self, to: Destination, chunks: list[str]) -> None:
        for chunk in chunks:

            def call(where: Destination, chunk: str = chunk) -> Coroutine[Any, Any, object]:
                return self._bot.send_message(where.chat_id, chunk, **_placement(where))

            to = replace(await self.call(to, call), reply_to=None)

    async def call(self, to: Destination, make: Callable[[Destination], Coroutine[Any, Any, object]]) -> Destination:
        """One API call towards `to`, retried and redirected as the module says; returns where it went.

        A reply target that is gone is dropped and the call repeated; a migrated chat is followed
        (once: a supergroup does not migrate again).
        """
        migrated_from: int | None = None
        while True:
            try:
                await self._retrying(make, to)
                return to
            except ChatMigrated as migrated:
                if migrated_from is not None:
                    raise DeliveryFailed(f"chat {migrated_from} migrated twice") from migrated
                migrated_from, new_chat_id = to.chat_id, int(migrated.new_chat_id)
                logger.info("Telegram: chat %s became %s; following it", to.chat_id, new_chat_id)
                await self._on_migrated(to.chat_id, new_chat_id)
                to = replace(to, chat_id=new_chat_id)
            except BadRequest as error:
                if to.reply_to is None or not _is_reply_target_gone(error):
                    raise DeliveryFailed(error.message) from error
                to = replace(to, reply_to=None)
            except TimedOut as error:
                if not may_have_arrived(error):
                    raise DeliveryFailed(str(error)) from error
                logger.info(
                    "Telegram: a call to chat %s timed out after it was sent; counting it as delivered", to.chat_id
                )
                return to
            except TelegramError as error:
                raise DeliveryFailed(str(error)) from error

    async def _retrying(self, make: Callable[[Destination], Coroutine[Any, Any, object]], to: Destination) -> None:
        policy = self._policy
        retrying = AsyncRetrying(
            retry=retry_if_exception(self._worth_retrying),
            stop=stop_after_attempt(policy.attempts) | stop_after_delay(policy.max_wait_s),
            wait=self._wait,
            sleep=self._sleep,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                await make(to)

    def _worth_retrying(self, error: BaseException) -> bool:
        """Transient, and not a flood wait longer than the policy allows (the answer would be stale)."""
        if isinstance(error, RetryAfter) and seconds_to_wait(error) > self._policy.max_wait_s:
            return False
        return is_transient(error)

    def _wait(self, state: RetryCallState) -> float:
        """What the server asked for after a 429; doubling pauses after anything else."""
        error = state.outcome.exception() if state.outcome is not None else None
        if isinstance(error, RetryAfter):
            return min(seconds_to_wait(error), self._policy.max_wait_s)
        return min(self._policy.backoff_s * 2 ** (state.attempt_number - 1), 8.0)


def _placement(to: Destination) -> dict[str, Any]:
    placement: dict[str, Any] = {}
    if to.thread_id is not None:
        placement["message_thread_id"] = to.thread_id
    if to.reply_to is not None:
        placement["reply_parameters"] = ReplyParameters(message_id=to.reply_to, allow_sending_without_reply=True)
    return placement
