"""`OHLORA_MODEL_PROFILE=tiny ohlora bot` as a user runs it, against a Bot API on loopback.

The real command, the real composition root, the real tiny models and the real python-telegram-bot
client: a DM gets a PNG face with text, an unmentioned group message gets nothing, a mention gets
a reply, admin commands are gated, and SIGTERM stops it with exit code 0 and the database intact.

Then the faults a deployment meets on day one: an answer whose first two sends get 429 and 500
arrives after the wait with no apology, a malformed update does not stop the next one being
answered, and a message Telegram counted as received before `kill -9` is answered exactly once
by the next start.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from bot.commands import NOT_ADMIN_TEXT
from core.engine import ERROR_TEXT
from models.layout import ModelLayout
from tests.fake_telegram_api import PNG_SIGNATURE, ApiCall, FakeBotApi, ServerError, TooManyRequests, group_chat, user

ADMIN = user(777, "관리자")
ALICE = user(1001, "앨리스")
GROUP = group_chat()


def answers(api: FakeBotApi) -> list[ApiCall]:
    """Faces delivered to Alice (refused attempts excluded)."""
    return [call for call in api.sent(ALICE["id"]) if call.method == "sendPhoto"]


def start_bot(api: FakeBotApi, db_path: Path, tiny_layout: ModelLayout) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"}
    env.update(
        TELEGRAM_TOKEN=api.token,
        TELEGRAM_API_BASE_URL=api.base_url,
        OHLORA_MODEL_PROFILE="tiny",
        OHLORA_TINY_MODELS_DIR=str(tiny_layout.root),
        OHLORA_DB_PATH=str(db_path),
        OHLORA_ADMIN_IDS="telegram:777",
    )
    return subprocess.Popen([sys.executable, "-m", "bot", "bot"], cwd=db_path.parent, env=env)


async def polling(api: FakeBotApi, since: int = 0) -> None:
    await api.wait_until(lambda api: len(api.calls("getUpdates")) > since, "the bot to poll", timeout_s=300)


@pytest.mark.slow
async def test_ohlora_bot_on_the_tiny_profile(tmp_path: Path, tiny_layout: ModelLayout) -> None:
    db_path = tmp_path / "ohlora.sqlite3"
    with FakeBotApi() as api:
        child = start_bot(api, db_path, tiny_layout)
        try:
            await polling(api)
            assert {c["command"] for c in api.calls("setMyCommands")[0].json("commands")} >= {"memory", "forget"}

            api.send_message(ALICE, "안녕 오로라! 나 떡볶이 좋아해")
            (photo,) = await api.wait_for_calls("sendPhoto", chat_id=ALICE["id"])
            assert photo.files["photo"].data.startswith(PNG_SIGNATURE)
            assert photo.text

            api.send_message(ALICE, "다들 안녕", chat=GROUP)
            _, mention = api.send_message(ALICE, "@ohlora_test_bot 뭐해?", chat=GROUP)
            (answer,) = await api.wait_for_calls("sendPhoto", chat_id=GROUP["id"])
            assert answer.reply_to == mention["message_id"]

            api.send_message(ALICE, "/stats")
            api.send_message(ADMIN, "/stats")
            await api.wait_until(lambda api: len(api.calls("sendMessage")) >= 2, "both /stats answers", timeout_s=60)
            assert api.calls("sendMessage", chat_id=ALICE["id"])[-1].text == NOT_ADMIN_TEXT
            assert "model profile: tiny" in (api.calls("sendMessage", chat_id=ADMIN["id"])[-1].text or "")

            child.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(child.wait, 60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()

        assert exit_code == 0
        assert len(api.calls("sendPhoto", chat_id=GROUP["id"])) == 1, "the unmentioned group message got an answer"
    with closing(sqlite3.connect(db_path)) as database:
        assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        prompts = [row[0] for row in database.execute("SELECT prompt FROM turns ORDER BY id")]
    assert prompts == ["안녕 오로라! 나 떡볶이 좋아해", "뭐해?"]


@pytest.mark.slow
async def test_ohlora_bot_through_telegrams_faults_and_a_kill_9(tmp_path: Path, tiny_layout: ModelLayout) -> None:
    db_path = tmp_path / "ohlora.sqlite3"
    alice = ALICE["id"]
    with FakeBotApi() as api:
        child = start_bot(api, db_path, tiny_layout)
        try:
            await polling(api)
            api.inject("sendPhoto", TooManyRequests(retry_after=1), ServerError(500))
            api.send_message(ALICE, "안녕 오로라!")
            await api.wait_until(lambda api: bool(answers(api)), "the first answer", timeout_s=60)
            (photo,) = answers(api)
            refused = [call for call in api.attempts("sendPhoto") if call.status != 200]
            assert [call.status for call in refused] == [429, 500]
            assert photo.at - refused[0].at >= 1.0, "the retry_after wait was honoured"

            api.push_raw({"update_id": 1000, "message": {"message_id": 1, "text": "채팅방도 날짜도 없음"}})
            api.send_message(ALICE, "나 고양이 키워")
            await api.wait_until(lambda api: len(answers(api)) == 2, "the next answer", timeout_s=60)
            assert api.is_confirmed(1000)

            actions = len(api.calls("sendChatAction", chat_id=alice))
            last, _ = api.send_message(ALICE, "고양이 이름은 나비야")
            await api.wait_until(
                lambda api: len(api.calls("sendChatAction", chat_id=alice)) > actions and api.is_confirmed(last),
                "the last turn to start, its update confirmed to Telegram",
            )
            child.kill()  # SIGKILL, mid-turn
            child.wait()
            assert len(answers(api)) == 2, "killed before the answer went out"

            polls = len(api.calls("getUpdates"))
            child = start_bot(api, db_path, tiny_layout)
            await polling(api, since=polls)
            await api.wait_until(lambda api: len(answers(api)) == 3, "the answer after the restart", timeout_s=120)
            child.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(child.wait, 60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()

        assert exit_code == 0
        assert len(api.sent(alice)) == 3 and ERROR_TEXT not in [call.text for call in api.sent(alice)]
    with closing(sqlite3.connect(db_path)) as database:
        prompts = [row[0] for row in database.execute("SELECT prompt FROM turns ORDER BY id")]
    assert prompts == ["안녕 오로라!", "나 고양이 키워", "고양이 이름은 나비야"]
