"""The fake Bot API's faults and confirmations, met through the real python-telegram-bot client.

The bot's own tests trust that an injected fault makes PTB raise what production Telegram makes it
raise, and that offsets confirm updates the way Telegram's do; these tests are that trust's proof.
"""

from __future__ import annotations

import asyncio
import datetime as dtm
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from telegram import Bot, Message, MessageOriginUser, ReplyParameters, error
from telegram.warnings import PTBUserWarning

from tests.fake_telegram_api import (
    CAPTION_TOO_LONG,
    DROPPED,
    PNG_SIGNATURE,
    REPLY_NOT_FOUND,
    BadRequest,
    Drop,
    FakeBotApi,
    Fault,
    Forbidden,
    Json,
    Migrated,
    ServerError,
    Slow,
    TooManyRequests,
    basic_group,
    forum_chat,
    group_chat,
    user,
)

ALICE = user(1001, "앨리스")
BOB = user(1002, "밥")


@pytest.fixture
def api() -> Iterator[FakeBotApi]:
    with FakeBotApi() as server:
        yield server


@pytest.fixture
async def bot(api: FakeBotApi) -> AsyncIterator[Bot]:
    async with Bot(api.token, base_url=api.base_url) as client:
        yield client


async def raw_updates(bot: Bot, **params: Any) -> list[Json]:
    """getUpdates as raw JSON, so malformed updates arrive unparsed.

    do_api_request advises using get_updates instead (which would parse them); that advice is
    silenced here and only here.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Please use 'Bot.getUpdates'", PTBUserWarning)
        result = await bot.do_api_request("getUpdates", api_kwargs={"timeout": 0, **params})
    assert isinstance(result, list)
    return result


def ids(updates: list[Json]) -> list[Any]:
    return [update.get("update_id") for update in updates]


# --------------------------------------------------------------------------------------------
# Each fault is what PTB raises for the real thing


async def test_flood_control_is_a_retry_after_and_nothing_is_sent(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", TooManyRequests(retry_after=3))
    with pytest.raises(error.RetryAfter) as refused:
        await bot.send_message(1001, "안녕")
    assert refused.value.retry_after == dtm.timedelta(seconds=3)
    assert api.sent(1001) == []
    (attempt,) = api.attempts("sendMessage", 1001)
    assert (attempt.status, attempt.fault, attempt.performed) == (429, TooManyRequests(3), False)

    await bot.send_message(1001, "다시 안녕")
    assert [call.text for call in api.sent(1001)] == ["다시 안녕"], "a fault applies to one call only"


@pytest.mark.parametrize(("status", "description"), [(500, "Internal Server Error"), (502, "Bad Gateway")])
async def test_a_server_error_is_a_plain_network_error(
    api: FakeBotApi, bot: Bot, status: int, description: str
) -> None:
    api.inject("sendMessage", ServerError(status))
    with pytest.raises(error.NetworkError) as failed:
        await bot.send_message(1001, "안녕")
    assert type(failed.value) is error.NetworkError, "not one of its subclasses (BadRequest, TimedOut)"
    assert failed.value.message == description
    assert api.sent() == []


async def test_a_slow_answer_times_out_the_client_but_is_delivered_anyway(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", Slow(0.3))
    with pytest.raises(error.TimedOut):
        await bot.send_message(1001, "늦은 답", read_timeout=0.05)
    assert api.sent(1001) == [], "performed only once the wait is over"
    await api.wait_until(lambda api: len(api.sent(1001)) == 1, "the slow delivery", timeout_s=2)


async def test_a_slow_answer_within_the_timeout_is_a_success(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", Slow(0.05))
    message = await bot.send_message(1001, "조금 늦은 답")
    assert message.text == "조금 늦은 답"
    (call,) = api.sent(1001)
    assert (call.status, call.fault) == (200, Slow(0.05))


@pytest.mark.parametrize("performed", [False, True])
async def test_a_dropped_connection_is_a_network_error_delivered_or_not(
    api: FakeBotApi, bot: Bot, performed: bool
) -> None:
    api.inject("sendMessage", Drop(performed=performed))
    with pytest.raises(error.NetworkError) as failed:
        await bot.send_message(1001, "끊긴 답")
    assert type(failed.value) is error.NetworkError
    assert [call.text for call in api.sent(1001)] == (["끊긴 답"] if performed else [])
    assert [call.status for call in api.attempts("sendMessage", 1001)] == [DROPPED]

    await bot.send_message(1001, "다음 답")
    assert api.sent(1001)[-1].text == "다음 답", "the client recovers on a fresh connection"


async def test_refusals_are_bad_requests_with_telegrams_descriptions(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendPhoto", BadRequest(CAPTION_TOO_LONG))
    api.inject("sendMessage", BadRequest(REPLY_NOT_FOUND))
    with pytest.raises(error.BadRequest) as too_long:
        await bot.send_photo(1001, PNG_SIGNATURE + b"face", caption="아" * 2000)
    with pytest.raises(error.BadRequest) as no_reply:
        await bot.send_message(1001, "답장", reply_parameters=ReplyParameters(message_id=999))
    # PTB strips "Bad Request: " and capitalises what is left.
    assert too_long.value.message == "Message caption is too long"
    assert no_reply.value.message == "Message to be replied not found"
    assert api.sent() == []


async def test_a_migrated_group_refuses_every_call_until_cleared(api: FakeBotApi, bot: Bot) -> None:
    old, new = basic_group(), group_chat()
    api.fail_chat(old["id"], Migrated(new["id"]))
    for _ in range(2):
        with pytest.raises(error.ChatMigrated) as moved:
            await bot.send_message(old["id"], "여보세요")
        assert moved.value.new_chat_id == new["id"]
    await bot.send_message(new["id"], "여기 있었구나")
    assert [call.chat_id for call in api.sent()] == [new["id"]], "a chat rule touches only its chat"

    api.clear_faults()
    await bot.send_message(old["id"], "돌아왔어")
    assert api.sent(old["id"])[-1].text == "돌아왔어"


async def test_a_blocked_user_is_forbidden(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendChatAction", Forbidden())
    with pytest.raises(error.Forbidden) as blocked:
        await bot.send_chat_action(1001, "typing")
    assert blocked.value.message == "Forbidden: bot was blocked by the user"


async def test_faults_are_met_in_order_by_the_calls_they_match(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", ServerError(), TooManyRequests(1), match=lambda params: params["chat_id"] == "1002")
    await bot.send_message(1001, "앨리스에게")
    with pytest.raises(error.NetworkError):
        await bot.send_message(1002, "밥에게 1")
    with pytest.raises(error.RetryAfter):
        await bot.send_message(1002, "밥에게 2")
    await bot.send_message(1002, "밥에게 3")
    assert api.queued_faults() == []
    assert [call.text for call in api.sent()] == ["앨리스에게", "밥에게 3"]
    assert [call.status for call in api.attempts("sendMessage")] == [200, 500, 429, 200]


async def test_sent_lists_only_the_deliveries_that_happened(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", ServerError(), Drop(), Drop(performed=True), TooManyRequests(1), Slow(0.01))
    for n in range(6):
        try:
            await bot.send_message(1001, f"답 {n}")
        except error.TelegramError:
            pass
    assert [call.text for call in api.sent(1001)] == ["답 2", "답 4", "답 5"]
    assert [call.status for call in api.attempts("sendMessage", 1001)] == [500, DROPPED, DROPPED, 429, 200, 200]
    assert len(api.calls("sendMessage")) == 6, "calls() keeps every attempt"


async def test_a_slow_call_never_holds_up_the_others(api: FakeBotApi, bot: Bot) -> None:
    api.inject("sendMessage", Slow(0.3))
    slow = asyncio.create_task(bot.send_message(1001, "천천히"))
    await api.wait_until(lambda api: not api.queued_faults(), "the slow call to arrive")
    await bot.send_message(1002, "빨리")
    await raw_updates(bot)
    assert not slow.done(), "the fast calls were answered while the slow one still waited"
    await slow
    assert [call.text for call in api.sent()] == ["빨리", "천천히"]


# --------------------------------------------------------------------------------------------
# Updates: confirmations, duplicates, malformed ones


async def test_an_offset_confirms_for_good_even_for_a_new_client(api: FakeBotApi, bot: Bot) -> None:
    first, second, third = (api.send_message(ALICE, f"메시지 {n}")[0] for n in range(3))
    assert [update.update_id for update in await bot.get_updates(timeout=0)] == [first, second, third]
    assert api.confirmed_below == 0, "serving is not confirming"

    assert ids(await raw_updates(bot, offset=second)) == [second, third]
    assert (api.confirmed_below, api.is_confirmed(first), api.is_confirmed(second)) == (second, True, False)
    assert ids(await raw_updates(bot, offset=0)) == [second, third], "a lower offset brings nothing back"

    async with Bot(api.token, base_url=api.base_url) as restarted:
        assert ids(await raw_updates(restarted)) == [second, third]
        assert ids(await raw_updates(restarted, offset=third + 1)) == []
    assert api.pending_updates() == []
    assert [call.offset for call in api.calls("getUpdates")] == [None, second, 0, None, third + 1]


@pytest.mark.parametrize(
    "fault", [TooManyRequests(1), ServerError(502), Drop(), BadRequest("Bad Request: wrong offset"), Forbidden()]
)
async def test_a_faulted_get_updates_confirms_nothing(api: FakeBotApi, bot: Bot, fault: Fault) -> None:
    first, second = api.send_message(ALICE, "하나")[0], api.send_message(ALICE, "둘")[0]
    api.inject("getUpdates", fault)
    with pytest.raises(error.TelegramError):
        await raw_updates(bot, offset=second)
    assert (api.confirmed_below, ids(api.pending_updates())) == (0, [first, second])
    (attempt,) = api.attempts("getUpdates")
    assert (attempt.offset, attempt.fault, attempt.performed) == (second, fault, False)

    assert ids(await raw_updates(bot, offset=second)) == [second], "the retry confirms"


async def test_a_get_updates_performed_before_its_drop_confirms(api: FakeBotApi, bot: Bot) -> None:
    first, second = api.send_message(ALICE, "하나")[0], api.send_message(ALICE, "둘")[0]
    api.inject("getUpdates", Drop(performed=True), Slow(0.01))
    with pytest.raises(error.NetworkError):
        await raw_updates(bot, offset=second)
    assert api.is_confirmed(first) and ids(api.pending_updates()) == [second]
    assert ids(await raw_updates(bot, offset=second + 1)) == [], "a slow getUpdates confirms like any success"
    assert api.confirmed_below == second + 1


async def test_duplicates_are_served_as_pushed_and_the_counter_skips_past(api: FakeBotApi, bot: Bot) -> None:
    _, message = api.send_message(ALICE, "두 번 온 메시지")
    api.push_update({"message": message}, update_id=10)
    api.push_update({"message": message}, update_id=10)
    updates = await bot.get_updates(offset=2, timeout=0)
    assert [(update.update_id, update.message and update.message.text) for update in updates] == [
        (10, "두 번 온 메시지"),
        (10, "두 번 온 메시지"),
    ]
    assert api.send_message(ALICE, "다음")[0] == 11
    await raw_updates(bot, offset=11)
    with pytest.raises(ValueError, match="below the confirmed offset"):
        api.push_update({"message": message}, update_id=10)


async def test_raw_updates_are_served_exactly_as_given(api: FakeBotApi, bot: Bot) -> None:
    malformed = {"update_id": 7, "message": {"message_id": 1, "text": "x"}}
    api.push_raw(malformed)
    api.push_raw({"no_id": True})
    assert await raw_updates(bot) == [malformed, {"no_id": True}]
    assert await raw_updates(bot) == [malformed], "an update without an id is served once: no offset can confirm it"
    assert api.send_message(ALICE, "다음")[0] == 8, "the counter skips past raw ids too"
    assert ids(await raw_updates(bot, offset=8)) == [8]


async def test_limit_and_allowed_updates_narrow_what_is_served(api: FakeBotApi, bot: Bot) -> None:
    first, message = api.send_message(ALICE, "하나")
    press = api.press_button(ALICE, message, "forget:yes")
    last, _ = api.send_message(ALICE, "셋")
    assert ids(await raw_updates(bot, limit=1)) == [first]
    assert ids(await raw_updates(bot, allowed_updates=["callback_query"])) == [press]
    assert ids(await raw_updates(bot, offset=press + 1, allowed_updates=["message"])) == [last]
    assert not api.is_confirmed(last) and api.is_confirmed(press)


async def test_a_long_poll_is_answered_as_soon_as_an_update_arrives(api: FakeBotApi, bot: Bot) -> None:
    poll = asyncio.create_task(raw_updates(bot, timeout=5))
    await api.wait_for_calls("getUpdates")
    update_id, _ = api.send_message(ALICE, "지금")
    assert ids(await asyncio.wait_for(poll, timeout=1)) == [update_id]


# --------------------------------------------------------------------------------------------
# Messages Telegram delivers that a text-only bot must still read


async def test_topic_messages_and_the_bots_answers_keep_their_thread(api: FakeBotApi, bot: Bot) -> None:
    forum = forum_chat()
    asked = Message.de_json(api.message(ALICE, "토픽 질문", chat=forum, message_thread_id=7), bot)
    assert (asked.message_thread_id, asked.is_topic_message, asked.chat.is_forum) == (7, True, True)

    answer = await bot.send_message(forum["id"], "토픽 답", message_thread_id=7)
    assert (answer.message_thread_id, answer.is_topic_message, answer.chat.is_forum) == (7, True, True)
    assert api.stored_message(forum["id"], answer.message_id)["message_thread_id"] == 7


def test_forwards_migrations_and_media_parse_as_ptb_expects() -> None:
    api = FakeBotApi()  # never started: it only builds messages
    forwarded = Message.de_json(api.message(ALICE, "밥이 한 말", forwarded_from=BOB))
    assert isinstance(forwarded.forward_origin, MessageOriginUser)
    assert forwarded.forward_origin.sender_user.id == BOB["id"]

    old = basic_group()
    migrated = Message.de_json(api.migration_message(old, -1001234567890, from_user=ALICE))
    assert (migrated.chat.type, migrated.migrate_to_chat_id, migrated.text) == ("group", -1001234567890, None)

    photo = Message.de_json(api.media_message(ALICE))
    sticker = Message.de_json(api.media_message(BOB, "sticker", chat=group_chat()))
    assert (len(photo.photo), photo.text, photo.photo[-1].width) == (3, None, 800)
    assert (sticker.sticker and sticker.sticker.emoji, sticker.text, sticker.chat.type) == ("😊", None, "supergroup")
