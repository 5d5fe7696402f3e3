"""`ohlora chat` and `ohlora bot` at start-up: plain errors, their own exit codes, quiet loggers, an unmetered console.

Everything runs `main([...])` in-process, with the model loader replaced: a database problem must be
reported before the models load (minutes for the real ones), so a test that reached the loader failed.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import bot.__main__ as cli
from bot import console
from bot.commands import Commands
from bot.console import ConsoleOptions
from core.config import Settings
from core.engine import RATE_LIMIT_TEXT
from core.worker import InferenceWorker
from tests.fakes import FakeEmbedder, FakeGenerator, FakeRenderer

QUIETED = ("httpx", "httpcore", "discord.gateway", "telegram.ext", "telegram", "aiosqlite")
ENVIRONMENT = (
    "DISCORD_TOKEN",
    "TELEGRAM_TOKEN",
    "OHLORA_DB_PATH",
    "OHLORA_LOG_LEVEL",
    "OHLORA_MODEL_PROFILE",
    "OHLORA_RATE_LIMIT_PER_MINUTE",
)


class PipedInput(io.StringIO):
    def isatty(self) -> bool:
        return False


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """No `.env`, no inherited settings, and the global logging state put back afterwards."""
    monkeypatch.chdir(tmp_path)
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    saved = (root.level, list(root.handlers), {name: logging.getLogger(name).level for name in QUIETED})
    yield
    root.setLevel(saved[0])
    root.handlers[:] = saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


@pytest.fixture
def no_models(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(settings: Settings, **options: object) -> InferenceWorker:
        raise AssertionError("the models were loaded before the database was checked")

    monkeypatch.setattr(cli, "_load_worker", refuse)


def unusable_paths(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    return {"folder": tmp_path / "a-folder", "under-a-file": tmp_path / "a-file" / "ohlora.sqlite3"}


def assert_plain_database_error(stderr: str, path: Path) -> None:
    assert str(path) in stderr
    assert "OHLORA_DB_PATH" in stderr
    assert "Traceback" not in stderr and "Exception in thread" not in stderr


@pytest.mark.parametrize("kind", ["folder", "under-a-file"])
@pytest.mark.parametrize("given_by", ["--db", "OHLORA_DB_PATH"])
@pytest.mark.usefixtures("no_models")
def test_chat_with_an_unusable_database_exits_4_before_loading_models(
    kind: str, given_by: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The issue met a raw traceback and exit 1, the "no token" code; a script must tell the two apart."""
    path = unusable_paths(tmp_path)[kind]
    args = ["chat", "--profile", "tiny"]
    if given_by == "--db":
        args += ["--db", str(path)]
    else:
        monkeypatch.setenv("OHLORA_DB_PATH", str(path))

    code = cli.main(args)

    assert code == cli.EXIT_DATABASE_UNUSABLE == 4
    assert_plain_database_error(capsys.readouterr().err, path)


@pytest.mark.usefixtures("no_models")
def test_bot_with_an_unusable_database_exits_4_before_loading_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TELEGRAM_TOKEN", "123:secret")
    path = unusable_paths(tmp_path)["folder"]

    code = cli.main(["bot", "--profile", "tiny", "--db", str(path)])

    assert code == cli.EXIT_DATABASE_UNUSABLE
    stderr = capsys.readouterr().err
    assert_plain_database_error(stderr, path)
    assert "123:secret" not in stderr


@pytest.mark.usefixtures("no_models")
def test_bot_without_tokens_exits_1_before_touching_the_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing token is the first thing to fix, and checking for it must create no database file."""
    fresh = tmp_path / "data" / "ohlora.sqlite3"

    assert cli.main(["bot", "--profile", "tiny", "--db", str(fresh)]) == 1
    assert cli.main(["bot", "--profile", "tiny", "--db", str(unusable_paths(tmp_path)["folder"])]) == 1

    assert not fresh.exists() and not fresh.parent.exists()
    assert "TELEGRAM_TOKEN" in capsys.readouterr().err


def test_debug_logging_keeps_aiosqlite_and_telegram_at_info_or_above() -> None:
    """At DEBUG aiosqlite logs every statement's parameters (what users wrote), telegram its URLs (the token)."""
    root = logging.getLogger()
    root.handlers[:] = []  # pytest's own handlers would make basicConfig a no-op
    for name in QUIETED:
        logging.getLogger(name).setLevel(logging.NOTSET)

    cli._configure_logging("DEBUG")

    assert root.level == logging.DEBUG, "the level asked for was not applied"
    for name in ("aiosqlite", "telegram"):
        assert logging.getLogger(name).getEffectiveLevel() >= logging.INFO, name
    for name in ("aiosqlite", "telegram", "telegram._bot", "telegram.request"):
        assert not logging.getLogger(name).isEnabledFor(logging.DEBUG), name
    assert logging.getLogger("core.engine").isEnabledFor(logging.DEBUG), "our own debug lines still show"


def test_the_console_answers_a_pipe_of_twenty_lines_whatever_the_rate_limit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One person piping a file into `ohlora chat` is no flood: every line is answered."""
    monkeypatch.setenv("OHLORA_RATE_LIMIT_PER_MINUTE", "2")
    monkeypatch.setattr(
        cli, "_load_worker", lambda settings, **_: InferenceWorker(FakeGenerator(), FakeEmbedder(), FakeRenderer())
    )
    real_console = console.run_console
    out = io.StringIO()

    async def piped(commands: Commands, options: ConsoleOptions, **_: object) -> int:
        lines = "".join(f"말 {n}\n" for n in range(20))
        return await real_console(commands, options, stdin=PipedInput(lines), stdout=out, stderr=io.StringIO())

    monkeypatch.setattr(console, "run_console", piped)

    code = cli.main(["chat", "--profile", "tiny", "--db", str(tmp_path / "chat.sqlite3")])

    answers = [line for line in out.getvalue().splitlines() if line.startswith("오로라: ")]
    assert code == 0
    assert len(answers) == 20
    assert not any(RATE_LIMIT_TEXT in answer for answer in answers)


def test_the_real_command_prints_only_the_message_for_a_folder(tmp_path: Path) -> None:
    """End to end in a process of its own: exit code 4 and two plain lines, nothing from a dying thread.

    aiosqlite's failed connect leaves its thread to report to a loop that `asyncio.run` has closed;
    in a real process that printed a traceback after the message on most runs.
    """
    folder = unusable_paths(tmp_path)["folder"]
    environment = {key: value for key, value in os.environ.items() if key not in ENVIRONMENT}

    result = subprocess.run(
        [sys.executable, "-m", "bot", "chat", "--profile", "tiny", "--db", str(folder)],
        input="안녕\n",
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=environment,
        timeout=120,
    )

    assert result.returncode == cli.EXIT_DATABASE_UNUSABLE, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"cannot use the database at {folder}: unable to open database file",
        "Point OHLORA_DB_PATH (or --db) at a file in a folder this user can write to.",
    ]
    assert result.stdout == ""
