"""`/forget all` as a user runs it: `ohlora chat` on the tiny profile, then the database's bytes.

Mina tells Oh-LoRA a password and her cat's name, exports her data, then forgets everything.
Another user chats on the same file afterwards. No byte of what Mina said may be left in the
database or its write-ahead log, while the other user's turn is kept.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest

from models.layout import ModelLayout

MINA_SAID = ("내 비밀번호는 사과123이야", "나 고양이 키워. 이름은 나비야")
SECRETS = (*MINA_SAID, "사과123", "나비야")


def ohlora_chat(user: str, stdin: str, cwd: Path, tiny_root: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OHLORA_TINY_MODELS_DIR": str(tiny_root)}
    return subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--profile", "tiny", "--db", "x.sqlite3", "--user", user],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def database_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.glob("x.sqlite3*")))


@pytest.mark.slow
def test_forget_all_leaves_no_byte_of_what_the_user_said(tmp_path: Path, tiny_layout: ModelLayout) -> None:
    script = "\n".join([*MINA_SAID, "/mydata", "/forget all"]) + "\n"
    mina = ohlora_chat("mina", script, tmp_path, tiny_layout.root)
    assert mina.returncode == 0, mina.stderr
    assert mina.stdout.count("오로라: ") == 2

    (export_path,) = tmp_path.glob("ohlora-mydata-*.json")
    export = json.loads(export_path.read_text(encoding="utf-8"))
    assert [turn["message"] for turn in export["turns"]] == list(MINA_SAID)
    export_path.unlink()  # hers to keep or delete; the point here is the database
    assert "모두 지웠어" in mina.stdout and "대화 기록 2개" in mina.stdout

    other = ohlora_chat("jun", "오늘 날씨 좋다\n", tmp_path, tiny_layout.root)
    assert other.returncode == 0, other.stderr

    stored = database_bytes(tmp_path)
    left = [secret for secret in SECRETS if secret.encode() in stored]
    assert left == [], f"still in the database files: {left}"
    assert "오늘 날씨 좋다".encode() in stored, "the other user's turn is kept"
    with closing(sqlite3.connect(tmp_path / "x.sqlite3")) as database:
        users = [row[0] for row in database.execute("SELECT user_key FROM turns ORDER BY id")]
    assert users[-1] == "console:jun" and all(user.startswith("forgotten:") for user in users[:-1])
