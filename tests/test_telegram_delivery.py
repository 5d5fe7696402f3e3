"""Delivery through the Bot API's faults, with the real python-telegram-bot client and a fake Bot API.

Each fault is one Telegram really produces: 429 with retry_after, 5xx, a dropped connection, an
answer slower than the client waits for, 400 "caption too long" and "message to be replied not
found", a group that became a supergroup, a user who blocked the bot. The rule throughout: an
answer that exists reaches the user once, as intact as the platform allows, and never costs an
apology.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import pytest
from telegram import Bot
from telegram.request import HTTPXRequest

from bot.telegram_delivery import CAPTION_LIMIT, Destination, RetryPolicy, TelegramDelivery
from core.types import RenderedFace
from tests.fake_telegram_api import (
    CAPTION_TOO_LONG,
    PNG_SIGNATURE,
    REPLY_NOT_FOUND,
    BadRequest,
    Drop,
    FakeBotApi,
    Forbidden,
    Migrated,
    ServerError,
    Slow,
    TooManyRequests,
)

CHAT = 1001
GROUP = -1001234567890
FACE = RenderedFace(data=PNG_SIGNATURE + b"face", mime_type="image/png", face=931)
FAST = RetryPolicy(attempts=4, max_wait_s=10.0, backoff_s=0.01)


@pytest.fixture
def api() -> Iterator[FakeBotApi]:
    with FakeBotApi() as server:
        yield server


@pytest.fixture
async def bot(api: FakeBotApi) -> AsyncIterator[Bot]:
    request = HTTPXRequest(read_timeout=0.5, write_timeout=2.0, media_write_timeout=2.0)
    async with Bot(api.token, base_url=api.base_url, request=request) as client:
        yield client


class Moves:
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    async def __call__(self, old: int, new: int) -> None:
        self.seen.append((old, new))


def delivery(bot: Bot, moves: Moves | None = None, policy: RetryPolicy = FAST) -> TelegramDelivery:
    return TelegramDelivery(bot, on_migrated=moves or Moves(), policy=policy)


async def test_an_answer_refused_with_429_then_500_arrives_after_the_wait(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendPhoto", TooManyRequests(retry_after=1), ServerError(500))
    started = time.monotonic()
    assert await delivery(bot).send(Destination(CHAT), "안녕! 반가워", FACE)
    assert time.monotonic() - started >= 1.0, "the retry_after wait was honoured"
    assert [call.status for call in api.attempts("sendPhoto")] == [429, 500, 200]
    assert [(call.method, call.text) for call in api.sent(CHAT)] == [("sendPhoto", "안녕! 반가워")]
    assert api.sent(CHAT)[0].files["photo"].data == FACE.data


async def test_a_dropped_connection_is_retried(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", Drop())
    assert await delivery(bot).send(Destination(CHAT), "다시 보낼게")
    assert [call.text for call in api.sent(CHAT)] == ["다시 보낼게"]


async def test_a_slow_success_counts_as_delivered_and_is_not_sent_twice(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", Slow(1.0))
    assert await delivery(bot).send(Destination(CHAT), "천천히 가도 한 번만")
    await api.wait_until(lambda api: len(api.sent(CHAT)) == 1, "the slow delivery to land")
    assert len(api.attempts("sendMessage")) == 1


async def test_a_caption_refused_sends_the_face_then_the_text(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendPhoto", BadRequest(CAPTION_TOO_LONG))
    assert await delivery(bot).send(Destination(GROUP, reply_to=5), "긴 대답", FACE)
    photo, text = api.sent(GROUP)
    assert (photo.method, photo.text, photo.reply_to) == ("sendPhoto", None, 5)
    assert (text.method, text.text, text.reply_to) == ("sendMessage", "긴 대답", None)


async def test_a_reply_to_a_deleted_message_goes_as_a_plain_message(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendPhoto", BadRequest(REPLY_NOT_FOUND))
    assert await delivery(bot).send(Destination(GROUP, reply_to=5), "지워진 메시지에도 대답", FACE)
    (photo,) = api.sent(GROUP)
    assert (photo.text, photo.reply_to) == ("지워진 메시지에도 대답", None)


async def test_a_face_that_cannot_be_sent_leaves_the_text(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendPhoto", BadRequest("Bad Request: IMAGE_PROCESS_FAILED"))
    assert await delivery(bot).send(Destination(CHAT), "얼굴 없이라도", FACE)
    assert [(call.method, call.text) for call in api.sent(CHAT)] == [("sendMessage", "얼굴 없이라도")]


async def test_a_migrated_group_is_followed_and_its_data_moves(api: FakeBotApi, bot: Bot) -> None:
    new_id = -1009999999999
    api.fail_chat(-4123456789, Migrated(new_id))
    moves = Moves()
    assert await delivery(bot, moves).send(Destination(-4123456789, reply_to=3), "새 방에서 안녕", FACE)
    assert moves.seen == [(-4123456789, new_id)]
    assert [call.text for call in api.sent(new_id)] == ["새 방에서 안녕"]


async def test_a_blocked_bot_gives_up_at_once(api: FakeBotApi, bot: Bot) -> None:
    api.fail_chat(CHAT, Forbidden())
    assert not await delivery(bot).send(Destination(CHAT), "안녕")
    assert len(api.attempts("sendMessage", chat_id=CHAT)) == 1


async def test_an_outage_is_given_up_after_the_policy(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", *[ServerError(502)] * 10)
    assert not await delivery(bot).send(Destination(CHAT), "안녕")
    assert len(api.attempts("sendMessage")) == FAST.attempts


async def test_a_flood_wait_longer_than_the_policy_is_not_waited_for(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", TooManyRequests(retry_after=3600))
    started = time.monotonic()
    assert not await delivery(bot).send(Destination(CHAT), "안녕")
    assert time.monotonic() - started < 5.0
    assert len(api.attempts("sendMessage")) == 1


async def test_long_text_continues_after_the_caption_in_the_same_topic(api: FakeBotApi, bot: Bot) -> None:
    text = "가" * (CAPTION_LIMIT + 10)
    assert await delivery(bot).send(Destination(GROUP, thread_id=77, reply_to=9), text, FACE)
    photo, rest = api.sent(GROUP)
    assert photo.text is not None and rest.text is not None
    assert photo.text + rest.text == text
    assert [call.params.get("message_thread_id") for call in (photo, rest)] == ["77", "77"]
    assert (photo.reply_to, rest.reply_to) == (9, None)
