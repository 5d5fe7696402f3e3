"""The Telegram adapter against a Bot API that misbehaves as Telegram's does, and across restarts.

Everything runs through the real adapter (our poller, inbox, delivery and python-telegram-bot's
handlers) against the fault-injecting fake Bot API, over the real engine with fake models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import pytest

from bot.alerts import AdminAlerts
from bot.commands import BLOCKED_TEXT, NOT_ADMIN_TEXT, PRIVATE_ONLY_TEXT, TEXT_ONLY_TEXT
from bot.inbox import RESTARTED_TEXT, InboxPolicy
from bot.telegram_polling import PollingOptions
from bot.telegram_rules import SENT_PRIVATELY_TEXT, UNKNOWN_BUTTON_TEXT
from core.engine import ERROR_TEXT, RATE_LIMIT_TEXT, STORE_FAILED_ALARM, EngineOptions
from core.store import Footprint, InboxEvent, InMemoryStore, NewMemory, TurnRecord, chat_scope
from core.types import Reply, ReplyKind, Task
from tests.fake_telegram_api import (
    PNG_SIGNATURE,
    FakeBotApi,
    Json,
    ServerError,
    TooManyRequests,
    basic_group,
    forum_chat,
    group_chat,
    user,
)
from tests.fakes import FakeGenerator, make_harness
from tests.telegram_harness import BotStarter, RunningBot

ADMIN = user(777, "관리자")
ALICE = user(1001, "앨리스")
BOB = user(1002, "밥")
FAST_POLLING = PollingOptions(timeout_s=1.0, first_backoff_s=0.05)

StartBot = Callable[..., Awaitable[RunningBot]]


@pytest.fixture
def api() -> Any:
    with FakeBotApi() as server:
        yield server


@pytest.fixture
async def start_bot(api: FakeBotApi) -> AsyncIterator[StartBot]:
    starter = BotStarter(api)

    async def start(**options: Any) -> RunningBot:
        options.setdefault("polling", FAST_POLLING)
        return await starter.start(**options)

    yield start
    await starter.close_all()


async def all_finished(store: InMemoryStore, timeout_s: float = 10.0) -> None:
    """Wait until the inbox holds nothing unfinished (an event is finished just after its handler)."""
    deadline = time.monotonic() + timeout_s
    while await store.pending_events("telegram"):
        assert time.monotonic() < deadline, "events left unfinished"
        await asyncio.sleep(0.01)


def photos(bot: RunningBot, chat_id: int) -> list[str | None]:
    return [call.text for call in bot.api.sent(chat_id) if call.method == "sendPhoto"]


# --------------------------------------------------------------------------------------------
# Delivery


async def test_an_answer_refused_twice_arrives_after_the_wait_without_an_apology(start_bot: StartBot) -> None:
    bot = await start_bot()
    bot.api.inject("sendPhoto", TooManyRequests(retry_after=1), ServerError(500))
    started = time.monotonic()
    await bot.say(ALICE, "안녕 오로라")
    assert time.monotonic() - started >= 1.0
    assert [call.status for call in bot.api.attempts("sendPhoto")] == [429, 500, 200]
    assert [call.method for call in bot.api.sent(1001)] == ["sendPhoto"]
    assert ERROR_TEXT not in bot.texts(1001)


async def test_a_forum_topic_gets_typing_and_the_reply_in_that_topic(start_bot: StartBot) -> None:
    bot = await start_bot()
    forum = forum_chat()
    await bot.say(ALICE, "@ohlora_test_bot 안녕", chat=forum, message_thread_id=77)
    calls = bot.api.calls("sendChatAction", "sendPhoto", chat_id=forum["id"])
    assert [call.method for call in calls] == ["sendChatAction", "sendPhoto"]
    assert {call.params.get("message_thread_id") for call in calls} == {"77"}


async def test_a_store_that_keeps_failing_still_delivers_and_tells_the_admins(api: FakeBotApi) -> None:
    class BrokenDisk(InMemoryStore):
        async def commit_turn(self, turn: TurnRecord, new_memory: NewMemory | None) -> None:
            raise OSError(28, "No space left on device")

    alerts = AdminAlerts()
    starter = BotStarter(api)
    try:
        bot = await starter.start(
            harness=make_harness(store=BrokenDisk(), alarm=alerts), alerts=alerts, polling=FAST_POLLING
        )
        await bot.say(ALICE, "나는 떡볶이 좋아해")
        assert photos(bot, 1001) and ERROR_TEXT not in bot.texts(1001)
        await api.wait_until(lambda api: bool(api.sent(777)), "the admin to be told")
        (alarm,) = bot.texts(777)
        assert alarm == STORE_FAILED_ALARM.format(error="[Errno 28] No space left on device")
    finally:
        await starter.close_all()


# --------------------------------------------------------------------------------------------
# Polling


async def test_a_malformed_update_is_skipped_once_and_the_rest_are_answered(
    start_bot: StartBot, caplog: pytest.LogCaptureFixture
) -> None:
    bot = await start_bot()
    caplog.set_level(logging.WARNING)
    bot.api.push_raw({"update_id": 500, "message": {"message_id": 1, "text": "날짜도 채팅방도 없음"}})
    update_id, _ = bot.api.send_message(ALICE, "안녕")
    await bot.handled_update(update_id)
    assert bot.api.is_confirmed(500)
    polls = len(bot.api.calls("getUpdates"))
    await asyncio.sleep(0.3)
    assert len(bot.api.calls("getUpdates")) - polls <= 3, "no re-fetching loop over the bad update"
    skipped = [record for record in caplog.records if "500" in record.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING
    assert photos(bot, 1001)


async def test_the_same_update_twice_is_answered_once(start_bot: StartBot) -> None:
    bot = await start_bot()
    message = bot.api.message(ALICE, "두 번 온 메시지")
    bot.api.push_update({"message": message}, update_id=50)
    bot.api.push_update({"message": message}, update_id=50)
    await bot.handled_update(50)
    await bot.say(ALICE, "다음 메시지")
    assert len(photos(bot, 1001)) == 2
    assert [turn.prompt for turn in await bot.harness.store.recent_turns("telegram:1001", 10)] == [
        "다음 메시지",
        "두 번 온 메시지",
    ]


async def test_failing_polls_back_off_and_warn_once(start_bot: StartBot, caplog: pytest.LogCaptureFixture) -> None:
    bot = await start_bot()
    caplog.set_level(logging.DEBUG, logger="bot.telegram_polling")
    bot.api.inject("getUpdates", *[ServerError(502)] * 4)
    update_id, _ = bot.api.send_message(ALICE, "서버가 아파도")
    await bot.handled_update(update_id)
    failed = [call for call in bot.api.attempts("getUpdates") if call.status == 502]
    assert len(failed) == 4
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "polling failed" in r.getMessage()]
    assert len(warnings) == 1
    # 0.05, 0.1 and 0.2 s apart: each pause doubles.
    gaps = [later.at - earlier.at for earlier, later in zip(failed, failed[1:], strict=False)]
    assert all(later >= 1.5 * earlier for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    assert gaps[-1] >= 0.19


async def test_an_update_is_confirmed_only_once_it_is_in_the_inbox(api: FakeBotApi) -> None:
    class FlakyInbox(InMemoryStore):
        failures = 2

        async def receive_events(self, events: Sequence[InboxEvent]) -> list[bool]:
            if self.failures:
                self.failures -= 1
                raise OSError("database is locked")
            return await super().receive_events(events)

    store = FlakyInbox()
    starter = BotStarter(api)
    try:
        bot = await starter.start(harness=make_harness(store=store), polling=FAST_POLLING)
        update_id, _ = api.send_message(ALICE, "꼭 기억해 줘")
        await api.wait_until(lambda _: store.failures == 0, "the failing writes")
        await bot.handled_update(update_id)
        offsets = [call.offset for call in api.calls("getUpdates")]
        assert offsets.index(update_id + 1) > 2, "the offset moved past the update only after it was kept"
        assert len(photos(bot, 1001)) == 1
    finally:
        await starter.close_all()


# --------------------------------------------------------------------------------------------
# Restarts


def as_event(update_id: int, update: Json, *, age_s: float = 0.0) -> InboxEvent:
    user_id = update["message"]["from"]["id"]
    return InboxEvent("telegram", str(update_id), f"telegram:{user_id}", json.dumps(update), time.time() - age_s)


async def test_a_start_finishes_what_the_last_run_left(start_bot: StartBot, api: FakeBotApi) -> None:
    store = InMemoryStore()
    received = {"update_id": 901, "message": api.message(ALICE, "답을 못 받은 메시지")}
    answered = {"update_id": 902, "message": api.message(BOB, "답은 나왔는데 못 보낸 메시지")}
    stale = {"update_id": 903, "message": api.message(ADMIN, "아주 오래된 메시지")}
    await store.receive_events([as_event(901, received), as_event(902, answered), as_event(903, stale, age_s=3600)])
    face_reply = Reply(text="미리 만든 답", kind=ReplyKind.ANSWER)
    await store.answer_event("telegram", "902", face_reply)

    bot = await start_bot(harness=make_harness(store=store), policy=InboxPolicy(replay_within_s=600))
    await bot.handled_update(901)
    await api.wait_until(lambda api: bool(api.sent(1002)) and bool(api.sent(777)), "the other two")
    assert len(photos(bot, 1001)) == 1
    assert bot.texts(1002) == ["미리 만든 답"]
    assert bot.texts(777) == [RESTARTED_TEXT]
    prompts = [request.prompt for request in bot.harness.generator.requests_for(Task.OUTPUT_MESSAGE)]
    assert all("답을 못 받은 메시지" in prompt for prompt in prompts), "only the unanswered one was computed"
    await all_finished(store)


async def test_a_turn_cut_short_by_shutdown_is_answered_once_after_restart(api: FakeBotApi) -> None:
    store = InMemoryStore()
    starter = BotStarter(api)
    try:
        held = FakeGenerator(release=threading.Event())
        first = await starter.start(
            harness=make_harness(store=store, generator=held), polling=FAST_POLLING, shutdown_grace_s=0.05
        )
        update_id, _ = api.send_message(ALICE, "나는 떡볶이 좋아해")
        await api.wait_until(lambda _: bool(held.calls), "the turn to reach the model")
        await api.wait_until(lambda api: api.is_confirmed(update_id), "Telegram to count it as received")
        await first.adapter.close()
        assert photos(first, 1001) == []
        assert [pending.event.event_id for pending in await store.pending_events("telegram")] == [str(update_id)]

        second = await starter.start(harness=make_harness(store=store), polling=FAST_POLLING)
        await second.handled_update(update_id)
        await asyncio.sleep(0.2)
        assert len(photos(second, 1001)) == 1
        assert len(await store.memories("telegram:1001")) == 1
        await all_finished(store)
    finally:
        await starter.close_all()


# --------------------------------------------------------------------------------------------
# What a real deployment meets


async def test_a_forward_is_answered_but_never_remembered_as_the_senders(start_bot: StartBot) -> None:
    bot = await start_bot()
    await bot.say(ALICE, "나는 떡볶이 좋아해", forwarded_from=BOB)
    assert photos(bot, 1001)
    assert bot.harness.generator.requests_for(Task.MEMORY) == []
    assert await bot.harness.store.memories("telegram:1001") == []


async def test_every_button_press_is_answered(start_bot: StartBot) -> None:
    bot = await start_bot()
    sent = await bot.say(ALICE, "안녕")
    update_id = bot.api.press_button(ALICE, sent, "old-version:something")
    await bot.handled_update(update_id)
    (answer,) = bot.api.calls("answerCallbackQuery")
    assert answer.params["text"] == UNKNOWN_BUTTON_TEXT


async def test_pictures_get_a_text_only_notice_where_she_was_spoken_to(start_bot: StartBot) -> None:
    bot = await start_bot()
    private = bot.api.push_update({"message": bot.api.media_message(ALICE, "photo")})
    await bot.handled_update(private)
    assert bot.texts(1001) == [TEXT_ONLY_TEXT]
    group = group_chat()
    in_group = bot.api.push_update({"message": bot.api.media_message(ALICE, "sticker", chat=group)})
    await bot.api.wait_until(lambda api: api.is_confirmed(in_group), "the group sticker to pass")
    assert bot.api.sent(group["id"]) == []
    assert bot.harness.generator.calls == []


async def test_a_group_that_becomes_a_supergroup_keeps_its_summary_and_face(start_bot: StartBot) -> None:
    bot = await start_bot()
    old, new_id = basic_group(), -1007777777777
    await bot.say(ALICE, "@ohlora_test_bot 안녕", chat=old)
    await bot.say(ADMIN, "/setface 931", chat=old)
    summary = await bot.harness.store.summary(f"telegram:{old['id']}:1001")
    assert summary
    await bot.handled_update(bot.api.push_update({"message": bot.api.migration_message(old, new_id)}))
    assert await bot.harness.store.summary(f"telegram:{new_id}:1001") == summary
    assert await bot.harness.store.summary(f"telegram:{old['id']}:1001") == ""
    assert await bot.harness.store.face_for(chat_scope("telegram", str(new_id))) == 931


async def test_admin_stats_asked_in_a_group_go_to_the_admins_private_chat(start_bot: StartBot) -> None:
    bot = await start_bot()
    group = group_chat()
    await bot.say(ADMIN, "/stats", chat=group)
    assert bot.texts(group["id"]) == [SENT_PRIVATELY_TEXT]
    (stats,) = bot.texts(777)
    assert stats is not None and stats.startswith("turns:")


async def test_a_blocked_user_gets_one_notice_whatever_they_send(start_bot: StartBot) -> None:
    bot = await start_bot()
    await bot.say(ADMIN, "/block 1001")
    for text in ("안녕", "/face", "/memory", "/reset", "안녕?"):
        await bot.say(ALICE, text)
    assert bot.texts(1001) == [BLOCKED_TEXT]
    assert bot.harness.renderer.requests == [] and bot.harness.generator.calls == []


async def test_face_is_metered_like_a_message(start_bot: StartBot) -> None:
    """Each /face is a render: a flood of them gets the rate limit's notice once, then silence."""
    bot = await start_bot(harness=make_harness(options=EngineOptions(rate_limit_per_minute=2)))
    for _ in range(5):
        await bot.say(ALICE, "/face")
    methods = [call.method for call in bot.api.sent(1001)]
    assert methods == ["sendPhoto", "sendPhoto", "sendMessage"]
    assert bot.texts(1001)[-1] == RATE_LIMIT_TEXT
    assert len(bot.harness.renderer.requests) == 2
    assert bot.api.sent(1001)[0].files["photo"].data.startswith(PNG_SIGNATURE)


# --------------------------------------------------------------------------------------------
# Your data


async def test_mydata_sends_a_json_file_of_only_your_data_in_a_private_chat(start_bot: StartBot) -> None:
    bot = await start_bot()
    group = group_chat()
    await bot.say(ALICE, "@ohlora_test_bot 나는 떡볶이 좋아해", chat=group)
    await bot.say(BOB, "@ohlora_test_bot 밥의 비밀이야", chat=group)
    await bot.say(ALICE, "/mydata", chat=group)
    assert bot.texts(group["id"])[-1] == PRIVATE_ONLY_TEXT, "a group would see the file"

    await bot.say(ALICE, "/mydata")
    (document,) = [call for call in bot.api.sent(1001) if call.method == "sendDocument"]
    upload = document.files["document"]
    assert upload.filename.endswith(".json")
    data = json.loads(upload.data)
    assert data["user"] == "telegram:1001"
    assert [turn["message"] for turn in data["turns"]] == ["나는 떡볶이 좋아해"]
    assert [memory["text"] for memory in data["memories"]] == ["[좋아하는 음식: 떡볶이]"]
    assert "밥의 비밀" not in upload.data.decode()


async def test_an_admin_forgets_a_user_and_the_answer_stays_private(start_bot: StartBot) -> None:
    bot = await start_bot()
    await bot.say(ALICE, "나는 떡볶이 좋아해")
    group = group_chat()
    await bot.say(BOB, "/forgetof 1001", chat=group)
    assert bot.texts(group["id"])[-1] == NOT_ADMIN_TEXT
    assert await bot.harness.store.memories("telegram:1001")

    await bot.say(ADMIN, "/forgetof 1001", chat=group)
    assert bot.texts(group["id"])[-1] == SENT_PRIVATELY_TEXT
    assert (bot.texts(777)[-1] or "").startswith("telegram:1001: 저장된 것을 모두 지웠어요.")
    assert await bot.harness.store.footprint("telegram:1001") == Footprint(0, 0, 0, False)
