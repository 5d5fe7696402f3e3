"""`OHLORA_MODEL_PROFILE=tiny ohlora bot` as a user runs it, against a Bot API on loopback.

The real command, the real composition root, the real tiny models and the real python-telegram-bot
client: a DM gets a PNG face with text, an unmentioned group message gets nothing, a mention gets
a reply, admin commands are gated, and SIGTERM stops it with exit code 0 and the database intact.
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
from models.layout import ModelLayout
from tests.fake_telegram_api import PNG_SIGNATURE, FakeBotApi, group_chat, user

ADMIN = user(777, "관리자")
ALICE = user(1001, "앨리스")
GROUP = group_chat()


@pytest.mark.slow
async def test_ohlora_bot_on_the_tiny_profile(tmp_path: Path, tiny_layout: ModelLayout) -> None:
    db_path = tmp_path / "ohlora.sqlite3"
    with FakeBotApi() as api:
        env = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"}
        env.update(
            TELEGRAM_TOKEN=api.token,
            TELEGRAM_API_BASE_URL=api.base_url,
            OHLORA_MODEL_PROFILE="tiny",
            OHLORA_TINY_MODELS_DIR=str(tiny_layout.root),
            OHLORA_DB_PATH=str(db_path),
            OHLORA_ADMIN_IDS="telegram:777",
        )
        child = subprocess.Popen([sys.executable, "-m", "bot", "bot"], cwd=tmp_path, env=env)
        try:
            await api.wait_until(lambda api: bool(api.calls("getUpdates")), "the bot to poll", timeout_s=300)
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
