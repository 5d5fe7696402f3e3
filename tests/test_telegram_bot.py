"""The Telegram adapter: pure translation rules, then the real python-telegram-bot client against a
local fake Bot API, over the real engine with fake models."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from PIL import Image
from telegram import Message

from bot.commands import BLOCKED_TEXT, NO_MEMORIES_TEXT, NOT_ADMIN_TEXT, PRIVATE_ONLY_TEXT, Caller, Commands
from bot.errors import BotLoginFailed
from bot.inbox import Inbox
from bot.telegram_bot import TelegramAdapter
from bot.telegram_delivery import split_caption, split_text, utf16_length
from bot.telegram_rules import (
    FORGET_CANCEL,
    FORGET_CANCELLED_TEXT,
    FORGET_CONFIRM,
    FORGET_EXPIRED_TEXT,
    NOT_YOUR_BUTTON_TEXT,
    SENT_PRIVATELY_TEXT,
    UNKNOWN_COMMAND_TEXT,
    BotIdentity,
    PendingForget,
    PendingForgets,
    UsageError,
    file_url_for,
    parse_face,
    parse_forget_data,
    parse_target,
    should_answer,
    strip_mention,
    to_incoming,
    wants_unknown_command_hint,
)
from core.engine import ERROR_TEXT
from core.safety import NOTICES, InputProblem
from core.store import Footprint, chat_scope
from core.types import FaceRequest, RenderedFace, Task
from tests.fake_telegram_api import PNG_SIGNATURE, FakeBotApi, Json, group_chat, user
from tests.fakes import END, FakeGenerator, FakeRenderer, Harness, make_harness
from tests.telegram_harness import ADMIN_IDS, BotStarter, RunningBot, settings_for

BOT = BotIdentity(id=4242, username="ohlora_test_bot")
ADMIN = user(777, "관리자")
ALICE = user(1001, "앨리스")
BOB = user(1002, "밥")
GROUP = group_chat()
GROUP_ID = int(GROUP["id"])


# --------------------------------------------------------------------------------------------
# Pure translation

_messages = FakeBotApi()
"""Never started: only builds messages as Telegram would deliver them."""


def tg(from_user: Json, text: str, **kwargs: Any) -> Message:
    return Message.de_json(_messages.message(from_user, text, **kwargs))


def bots_message() -> Json:
    return _messages.message(_messages.bot_user, "안녕! 나는 오로라야", chat=GROUP)


def test_private_messages_are_always_answered() -> None:
    assert should_answer(tg(ALICE, "안녕"), BOT)


@pytest.mark.parametrize(
    ("text", "reply_to", "answered"),
    [
        ("오늘 날씨 좋다", None, False),
        ("@ohlora_test_bot 안녕", None, True),
        ("안녕 @OHLORA_TEST_BOT 뭐해?", None, True),
        ("@other_bot 안녕", None, False),
        ("@ohlora_test_bot_fan 안녕", None, False),
        ("너 누구야?", "bot", True),
        ("너 누구야?", "user", False),
    ],
)
def test_groups_are_answered_only_when_addressed(text: str, reply_to: str | None, answered: bool) -> None:
    replied = {"bot": bots_message(), "user": _messages.message(BOB, "음", chat=GROUP), None: None}[reply_to]
    assert should_answer(tg(ALICE, text, chat=GROUP, reply_to=replied), BOT) is answered


def test_a_text_mention_of_the_bot_counts() -> None:
    data = _messages.message(ALICE, "오로라 안녕", chat=GROUP)
    data["entities"] = [{"type": "text_mention", "offset": 0, "length": 3, "user": _messages.bot_user}]
    assert should_answer(Message.de_json(data), BOT)


def test_other_bots_are_never_answered() -> None:
    robot = user(5000, "로봇", username="robot_bot", is_bot=True)
    assert not should_answer(tg(robot, "안녕"), BOT)
    assert not should_answer(tg(robot, "@ohlora_test_bot 안녕", chat=GROUP), BOT)


def test_to_incoming_maps_ids_and_removes_the_mention() -> None:
    incoming = to_incoming(tg(ALICE, "안녕 @ohlora_test_bot 뭐해?", chat=GROUP), BOT, event_id="7")
    assert incoming is not None
    assert (incoming.platform, incoming.user_id, incoming.chat_id) == ("telegram", "1001", str(GROUP_ID))
    assert incoming.text == "안녕 뭐해?"
    assert incoming.event_id == "7" and not incoming.forwarded
    private = to_incoming(tg(ADMIN, "안녕"), BOT)
    assert private is not None and private.chat_id == "777"


def test_to_incoming_is_none_when_not_addressed() -> None:
    assert to_incoming(tg(ALICE, "안녕 여러분", chat=GROUP), BOT) is None


def test_strip_mention_keeps_other_words_and_mentions() -> None:
    assert strip_mention("@ohlora_test_bot", "ohlora_test_bot") == ""
    assert strip_mention("@bob 이랑 @Ohlora_Test_Bot 놀자", "ohlora_test_bot") == "@bob 이랑 놀자"


def test_split_text_cuts_at_spaces_within_the_limit() -> None:
    text = " ".join(f"문장{n}번째는여기까지" for n in range(200))
    pieces = split_text(text, 100)
    assert len(pieces) > 1
    assert all(0 < utf16_length(piece) <= 100 for piece in pieces)
    assert " ".join(pieces).split() == text.split()
    assert all(piece == piece.strip() for piece in pieces)


def test_split_text_counts_utf16_units_and_cuts_unbroken_text_exactly() -> None:
    assert split_text("😀" * 5, 4) == ["😀😀", "😀😀", "😀"]
    unbroken = "가" * 250
    assert "".join(split_text(unbroken, 100)) == unbroken
    assert split_text("  짧은 말  ", 100) == ["짧은 말"]
    assert split_text("", 100) == []


def test_split_caption_fills_the_caption_and_carries_the_rest() -> None:
    text = " ".join("오로라" * 20 for _ in range(150))
    caption, rest = split_caption(text)
    assert 0 < utf16_length(caption) <= 1024
    assert rest and all(utf16_length(piece) <= 4096 for piece in rest)
    assert " ".join([caption, *rest]).split() == text.split()
    assert split_caption("짧아") == ("짧아", [])


@pytest.mark.parametrize(
    ("args", "target"),
    [(["555"], "telegram:555"), (["discord:1234"], "discord:1234"), (["Discord:1234"], "discord:1234")],
)
def test_parse_target(args: list[str], target: str) -> None:
    assert parse_target("block", args, tg(ADMIN, "/block")) == target


def test_parse_target_takes_the_sender_of_a_replied_message() -> None:
    replied = _messages.message(BOB, "스팸", chat=GROUP)
    assert parse_target("block", [], tg(ADMIN, "/block", chat=GROUP, reply_to=replied)) == "telegram:1002"


@pytest.mark.parametrize("args", [[], ["@bob"], ["1", "2"], ["discord:"], [":5"]])
def test_parse_target_rejects_what_it_cannot_resolve(args: list[str]) -> None:
    with pytest.raises(UsageError, match="/block"):
        parse_target("block", args, tg(ADMIN, "/block"))


def test_parse_face() -> None:
    assert parse_face(["931"]) == 931
    assert parse_face(["default"]) is None
    for bad in ([], ["abc"], ["-1"], ["1", "2"]):
        with pytest.raises(UsageError):
            parse_face(bad)


@pytest.mark.parametrize(
    ("text", "chat", "hint"),
    [
        ("/dance", None, True),
        ("/dance", GROUP, False),
        ("/dance@ohlora_test_bot", GROUP, True),
        ("/memory@other_bot", GROUP, False),
    ],
)
def test_unknown_command_hint_only_when_addressed(text: str, chat: Json | None, hint: bool) -> None:
    assert wants_unknown_command_hint(tg(ALICE, text, chat=chat), BOT) is hint


def test_pending_forgets_are_bounded_and_tokens_fit_callback_data() -> None:
    pending = PendingForgets(capacity=2)
    first = pending.add(PendingForget(1, 1, None))
    second = pending.add(PendingForget(2, 2, "좋아하는 음식"))
    third = pending.add(PendingForget(3, 3, None))
    assert pending.get(first) is None
    assert pending.get(second) == PendingForget(2, 2, "좋아하는 음식")
    assert len(f"forget:{third}:yes".encode()) <= 64
    assert parse_forget_data(f"forget:{third}:yes") == (third, True)
    assert parse_forget_data(f"forget:{third}:no") == (third, False)
    assert parse_forget_data("forget:zz:yes") is None


def test_file_url_follows_the_bot_api_layout() -> None:
    assert file_url_for("https://api.telegram.org/bot") == "https://api.telegram.org/file/bot"
    assert file_url_for("http://127.0.0.1:8081/bot") == "http://127.0.0.1:8081/file/bot"


# --------------------------------------------------------------------------------------------
# Through the real client and a fake Bot API


@pytest.fixture
def api() -> Any:
    with FakeBotApi() as server:
        yield server


StartBot = Callable[..., Awaitable[RunningBot]]


@pytest.fixture
async def start_bot(api: FakeBotApi) -> AsyncIterator[StartBot]:
    starter = BotStarter(api)
    yield starter.start
    await starter.close_all()


@pytest.fixture
async def bot(start_bot: StartBot) -> RunningBot:
    return await start_bot()


async def last_answer(harness: Harness, user_key: str) -> str:
    turns = await harness.store.recent_turns(user_key, 1)
    return turns[0].answer.strip()


async def test_a_dm_gets_the_face_as_a_png_with_the_answer_as_caption(bot: RunningBot) -> None:
    await bot.say(ALICE, "안녕 오로라!")

    sent = bot.api.sent(chat_id=1001)
    assert [call.method for call in sent] == ["sendPhoto"]
    photo = sent[0]
    upload = photo.files["photo"]
    assert upload.data.startswith(PNG_SIGNATURE)
    assert upload.content_type == "image/png"
    assert Image.open(io.BytesIO(upload.data)).size == (4, 4)
    assert photo.params["caption"] == await last_answer(bot.harness, "telegram:1001")
    assert "안녕 오로라!" in photo.params["caption"]
    assert photo.reply_to is None
    actions = bot.api.calls("sendChatAction", chat_id=1001)
    assert actions and actions[0].params["action"] == "typing"
    assert bot.api.calls().index(actions[0]) < bot.api.calls().index(photo)


async def test_a_group_message_without_mention_gets_nothing(bot: RunningBot) -> None:
    """Not even a place in the inbox: it is confirmed to Telegram and forgotten."""
    for text in ("오늘 날씨 좋다", "@someone_else 안녕"):
        await bot.ignored(ALICE, text, chat=GROUP)
    assert await bot.harness.store.pending_events("telegram") == []
    assert bot.handled == set()
    assert bot.api.calls("sendMessage", "sendPhoto", "sendAnimation", "sendChatAction", chat_id=GROUP_ID) == []
    assert bot.harness.generator.calls == []


async def test_a_mention_in_a_group_gets_a_reply_to_that_message(bot: RunningBot) -> None:
    message = await bot.say(ALICE, "@ohlora_test_bot 안녕?", chat=GROUP)

    (photo,) = bot.api.sent(GROUP_ID)
    assert photo.method == "sendPhoto"
    assert photo.reply_to == message["message_id"]
    turn = (await bot.harness.store.recent_turns("telegram:1001", 1))[0]
    assert turn.prompt == "안녕?"
    assert turn.conversation_key == f"telegram:{GROUP_ID}:1001"

    follow_up = await bot.say(BOB, "너 누구야?", chat=GROUP, reply_to=photo.result)
    assert bot.api.sent(GROUP_ID)[-1].reply_to == follow_up["message_id"]


async def test_a_non_admin_is_refused_every_admin_command_and_nothing_changes(bot: RunningBot) -> None:
    store = bot.harness.store
    await store.set_blocked("telegram:555", True)
    commands = ["/stats", "/setface 931", "/setface", "/block 556", "/block", "/unblock 555", "/memoryof 555"]
    for command in commands:
        await bot.say(ALICE, command)
        await bot.say(BOB, command, chat=GROUP)

    assert bot.texts(1001) == [NOT_ADMIN_TEXT] * len(commands)
    assert bot.texts(GROUP_ID) == [NOT_ADMIN_TEXT] * len(commands)
    assert await store.face_for(chat_scope("telegram", "1001")) is None
    assert await store.face_for(chat_scope("telegram", str(GROUP_ID))) is None
    assert await store.blocked_users() == ["telegram:555"]


async def test_an_admin_sets_the_face_of_a_chat(bot: RunningBot) -> None:
    await bot.say(ADMIN, "/setface 931", chat=GROUP)
    assert "931" in (bot.texts(GROUP_ID)[-1] or "")
    assert await bot.harness.store.face_for(chat_scope("telegram", str(GROUP_ID))) == 931

    await bot.say(ALICE, "@ohlora_test_bot 안녕", chat=GROUP)
    assert bot.harness.renderer.requests[-1].face == 931
    assert bot.api.sent(GROUP_ID)[-1].files["photo"].filename == "ohlora_931.png"

    await bot.say(ADMIN, "/setface 5", chat=GROUP)
    assert "unknown face 5" in (bot.texts(GROUP_ID)[-1] or "")
    await bot.say(ADMIN, "/setface", chat=GROUP)
    assert bot.texts(GROUP_ID)[-1] == "사용법: /setface <얼굴 번호> (기본 얼굴로 돌리려면 /setface default)"
    assert await bot.harness.store.face_for(chat_scope("telegram", str(GROUP_ID))) == 931


async def test_an_admin_blocks_and_unblocks_a_user(bot: RunningBot) -> None:
    await bot.say(ADMIN, "/block 1001")
    assert await bot.harness.store.is_blocked("telegram:1001")

    await bot.say(ALICE, "안녕")
    await bot.say(ALICE, "왜 대답 안 해?")
    assert bot.texts(1001) == [BLOCKED_TEXT]
    assert bot.harness.generator.calls == []
    assert bot.api.calls("sendChatAction", chat_id=1001) == [], "a blocked user never sees her typing"

    await bot.say(ADMIN, "/unblock 1001")
    await bot.say(ALICE, "이제 돼?")
    assert bot.api.sent(1001)[-1].method == "sendPhoto"

    bobs = await bot.ignored(BOB, "스팸스팸", chat=GROUP)
    await bot.say(ADMIN, "/block", chat=GROUP, reply_to=bobs)
    assert await bot.harness.store.blocked_users() == ["telegram:1002"]
    assert bot.texts(GROUP_ID)[-1] == SENT_PRIVATELY_TEXT, "bot-wide admin output never goes into a group"
    assert bot.texts(777)[-1] == "telegram:1002: 차단했어요."


async def test_an_admin_sees_stats_and_anyones_memories(bot: RunningBot) -> None:
    await bot.say(ALICE, "나는 떡볶이 좋아해")
    await bot.say(ADMIN, "/stats")
    await bot.say(ADMIN, "/memoryof 1001")

    stats, memories = bot.texts(777)
    assert stats is not None and "turns: 1" in stats and "model profile: fake" in stats
    assert memories is not None and "[좋아하는 음식: 떡볶이]" in memories


async def test_forget_deletes_only_after_the_owner_confirms(bot: RunningBot) -> None:
    store = bot.harness.store
    await bot.say(ALICE, "나는 떡볶이 좋아해")
    assert [memory.key for memory in await store.memories("telegram:1001")] == ["좋아하는 음식"]

    await bot.say(ALICE, "/forget")
    question = bot.api.sent(1001)[-1]
    assert question.method == "sendMessage" and "떡볶이" in (question.text or "")
    labels = [button["text"] for button in question.json("reply_markup")["inline_keyboard"][0]]
    assert labels == [FORGET_CONFIRM, FORGET_CANCEL]
    assert len(await store.memories("telegram:1001")) == 1

    await bot.press(BOB, question, FORGET_CONFIRM)
    assert bot.api.calls("answerCallbackQuery")[-1].params["text"] == NOT_YOUR_BUTTON_TEXT
    assert len(await store.memories("telegram:1001")) == 1

    await bot.press(ALICE, question, FORGET_CANCEL)
    assert bot.api.calls("editMessageText")[-1].params["text"] == FORGET_CANCELLED_TEXT
    assert len(await store.memories("telegram:1001")) == 1

    await bot.say(ALICE, "/forget")
    question = bot.api.sent(1001)[-1]
    await bot.press(ALICE, question, FORGET_CONFIRM)
    done = "너에 대해 저장한 것을 모두 지웠어. 🧹\n• 기억 1개, 대화 요약 1개, 대화 기록 1개, 마지막 표정"
    assert bot.api.calls("editMessageText")[-1].params["text"] == done
    assert await store.memories("telegram:1001") == []
    assert await store.footprint("telegram:1001") == Footprint(memories=0, summaries=0, turns=0, expression=False)
    assert bot.api.stored_message(1001, question.result["message_id"])["text"] == done

    await bot.press(ALICE, question, FORGET_CONFIRM)
    assert bot.api.calls("answerCallbackQuery")[-1].params["text"] == FORGET_EXPIRED_TEXT


async def test_forget_one_key(bot: RunningBot) -> None:
    bot.harness.generator.memory_rules = {"떡볶이": "[좋아하는 음식: 떡볶이]", "축구": "[취미: 축구]"}
    await bot.say(ALICE, "나는 떡볶이 좋아해")
    await bot.say(ALICE, "내 취미는 축구야")

    await bot.say(ALICE, "/forget 없는 기억")
    assert bot.api.sent(1001)[-1].text == "'없는 기억'(이)라는 기억은 없어."
    assert "reply_markup" not in bot.api.sent(1001)[-1].params

    await bot.say(ALICE, "/forget 좋아하는 음식")
    await bot.press(ALICE, bot.api.sent(1001)[-1], FORGET_CONFIRM)
    assert [memory.key for memory in await bot.harness.store.memories("telegram:1001")] == ["취미"]


async def test_two_users_in_one_group_never_see_each_others_memories(bot: RunningBot) -> None:
    await bot.say(ALICE, "@ohlora_test_bot 나는 떡볶이 좋아해", chat=GROUP)
    alices_request = await bot.say(ALICE, "/memory", chat=GROUP)
    in_the_group = bot.api.sent(GROUP_ID)[-1]
    await bot.say(BOB, "/memory")
    bobs_view = bot.api.sent(BOB["id"])[-1]
    await bot.say(ALICE, "/memory")
    alices_view = bot.api.sent(ALICE["id"])[-1]

    assert in_the_group.text == PRIVATE_ONLY_TEXT and in_the_group.reply_to == alices_request["message_id"]
    assert bobs_view.text == NO_MEMORIES_TEXT
    assert alices_view.text is not None and "떡볶이" in alices_view.text

    await bot.say(BOB, "@ohlora_test_bot 내가 좋아하는 음식이 뭐게? 떡볶이", chat=GROUP)
    bobs_turn = (await bot.harness.store.recent_turns("telegram:1002", 1))[0]
    assert bobs_turn.used_memory is None
    assert "[좋아하는 음식: 떡볶이]" not in bobs_turn.final_input


async def test_a_long_answer_continues_after_the_caption(start_bot: StartBot) -> None:
    words = ["오로라" * 60 + str(n) for n in range(30)]
    generator = FakeGenerator(scripts={Task.OUTPUT_MESSAGE: lambda _: " " + " ".join(words) + END})
    bot = await start_bot(harness=make_harness(generator=generator))
    message = await bot.say(ALICE, "@ohlora_test_bot 길게 말해 줘", chat=GROUP)

    sent = bot.api.sent(GROUP_ID)
    assert [call.method for call in sent] == ["sendPhoto", "sendMessage", "sendMessage"]
    assert utf16_length(sent[0].params["caption"]) <= 1024
    assert all(utf16_length(call.params["text"]) <= 4096 for call in sent[1:])
    assert " ".join(call.text or "" for call in sent).split() == words
    assert [call.reply_to for call in sent] == [message["message_id"], None, None]


class GifRenderer(FakeRenderer):
    def render(self, request: FaceRequest) -> RenderedFace:
        self.requests.append(request)
        return RenderedFace(data=b"GIF89a" + bytes(16), mime_type="image/gif", face=request.face or 127)


async def test_an_animated_face_goes_as_an_animation(start_bot: StartBot) -> None:
    bot = await start_bot(harness=make_harness(renderer=GifRenderer()))
    await bot.say(ALICE, "웃어 줘")

    (animation,) = bot.api.sent(1001)
    assert animation.method == "sendAnimation"
    assert animation.files["animation"].data.startswith(b"GIF89a")
    assert animation.files["animation"].filename.endswith(".gif")
    assert animation.params["caption"] == await last_answer(bot.harness, "telegram:1001")


async def test_a_notice_is_a_plain_reply(bot: RunningBot) -> None:
    message = await bot.say(ALICE, "@ohlora_test_bot", chat=GROUP)

    (notice,) = bot.api.sent(GROUP_ID)
    assert notice.method == "sendMessage"
    assert notice.text == NOTICES[InputProblem.EMPTY]
    assert notice.reply_to == message["message_id"]


async def test_face_command_sends_the_current_face(bot: RunningBot) -> None:
    await bot.say(ALICE, "/face")

    (face,) = bot.api.sent(1001)
    assert face.method == "sendPhoto" and face.files["photo"].data.startswith(PNG_SIGNATURE)
    assert (face.text or "").startswith("오로라 얼굴 #")
    assert bot.api.calls("sendChatAction", chat_id=1001)[0].params["action"] == "upload_photo"


async def test_help_start_and_reset(bot: RunningBot) -> None:
    await bot.say(ALICE, "/start")
    await bot.say(ALICE, "/help")
    await bot.say(ALICE, "/reset")
    start, help_text, reset = bot.texts(1001)
    assert start == help_text and help_text is not None and "/forget" in help_text
    assert reset is not None and "요약" in reset


async def test_unknown_commands_get_a_hint_only_when_meant_for_us(bot: RunningBot) -> None:
    await bot.say(ALICE, "/dance")
    await bot.say(ALICE, "/dance", chat=GROUP)
    await bot.say(ALICE, "/memory@other_bot", chat=GROUP)
    await bot.say(ALICE, "/dance@ohlora_test_bot", chat=GROUP)

    assert bot.texts(1001) == [UNKNOWN_COMMAND_TEXT]
    assert bot.texts(GROUP_ID) == [UNKNOWN_COMMAND_TEXT]


async def test_the_command_menus_are_registered_at_start(bot: RunningBot) -> None:
    menus = {call.params.get("scope"): call.json("commands") for call in bot.api.calls("setMyCommands")}
    public = [command["command"] for command in menus[None]]
    assert public == ["start", "help", "memory", "forget", "mydata", "reset", "face"]
    (admin_scope,) = [scope for scope in menus if scope is not None]
    assert json.loads(admin_scope) == {"type": "chat", "chat_id": 777}
    assert [command["command"] for command in menus[admin_scope]] == [
        *public,
        "stats",
        "setface",
        "block",
        "unblock",
        "memoryof",
        "forgetof",
    ]


async def test_a_long_turn_keeps_showing_typing(start_bot: StartBot) -> None:
    generator = FakeGenerator(release=threading.Event())
    bot = await start_bot(harness=make_harness(generator=generator), chat_action_every_s=0.01)
    update_id, _ = bot.api.send_message(ALICE, "천천히 생각해 봐")

    actions = await bot.api.wait_for_calls("sendChatAction", chat_id=1001, count=3)
    assert bot.api.sent(1001) == []
    assert {call.params["action"] for call in actions} == {"typing"}

    assert generator.release is not None
    generator.release.set()
    await bot.handled_update(update_id)
    assert bot.api.sent(1001)[-1].method == "sendPhoto"


class ExplodingCommands(Commands):
    async def memory(self, caller: Caller) -> Any:
        raise RuntimeError("the store went away")


async def test_an_unexpected_error_still_gets_the_user_an_apology(start_bot: StartBot) -> None:
    bot = await start_bot(commands_type=ExplodingCommands)
    await bot.say(ALICE, "/memory")
    assert bot.texts(1001) == [ERROR_TEXT]


async def test_a_refused_token_is_a_clear_error(api: FakeBotApi) -> None:
    harness = make_harness()
    try:
        commands = Commands(harness.engine, harness.store, admin_ids=ADMIN_IDS, model_profile="fake")
        adapter = TelegramAdapter(
            commands, settings_for(api, token="999:not-the-token"), inbox=Inbox(harness.store, "telegram")
        )
        with pytest.raises(BotLoginFailed, match="TELEGRAM_TOKEN") as raised:
            await adapter.start()
        assert raised.value.__suppress_context__, "PTB's error quotes the token; it must not be chained"
        assert "not-the-token" not in str(raised.value)
        await adapter.close()
    finally:
        await harness.worker.stop()


async def test_close_lets_a_turn_in_flight_finish(start_bot: StartBot) -> None:
    generator = FakeGenerator(release=threading.Event())
    bot = await start_bot(harness=make_harness(generator=generator), shutdown_grace_s=30.0)
    bot.api.send_message(ALICE, "나는 떡볶이 좋아해")
    await bot.api.wait_until(lambda _: bool(generator.calls), "the turn to reach the model")

    closing = asyncio.create_task(bot.adapter.close())
    await bot.api.wait_until(lambda _: not bot.adapter.polling, "polling to stop")
    assert generator.release is not None
    generator.release.set()
    await asyncio.wait_for(closing, timeout=20)

    assert bot.api.sent(1001)[-1].method == "sendPhoto"
    assert len(await bot.harness.store.memories("telegram:1001")) == 1


async def test_close_cancels_a_turn_that_outlives_the_grace_period(start_bot: StartBot) -> None:
    generator = FakeGenerator(release=threading.Event())
    bot = await start_bot(harness=make_harness(generator=generator), shutdown_grace_s=0.05)
    await bot.say(ALICE, "/memory")
    bot.api.send_message(ALICE, "나는 떡볶이 좋아해")
    await bot.api.wait_until(lambda _: bool(generator.calls), "the turn to reach the model")

    await asyncio.wait_for(bot.adapter.close(), timeout=20)

    assert [call.method for call in bot.api.sent(1001)] == ["sendMessage"]
    assert await bot.harness.store.memories("telegram:1001") == []
    assert (await bot.harness.store.stats()).turns_total == 0
