"""kill -9 of `ohlora bot` mid-turn, twenty times: the database always opens clean and whole.

Each round starts the service as its own process, the way `ohlora bot` composes it (the real
`serve()`, Telegram adapter, engine, worker and SQLite store) with fake models in place of the
loaded ones, talking to a fake Bot API in this process. Four users send numbered messages; every
turn N stores the memory "[기억N: 값N]" and the summary "요약N", so a turn's rows name their turn.
Then the process is killed with SIGKILL: in odd rounds at a random moment while turns are
running, in even rounds while one turn sits inside its transaction (every statement executed,
COMMIT not yet), which is the moment a torn write would show.

After every kill the file is opened as the next start would open it, and checked: SQLite's
integrity check passes; a turn's memory exists exactly when its logged turn does; each
conversation's summary is that of its latest logged turn; each user's expression exists exactly
when the user has a logged turn; the turn caught inside its transaction left nothing; and every
row seen after earlier rounds is still there, unchanged.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from functools import partial
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest

from core.store import SqliteStore
from tests import fake_telegram_api
from tests.conftest import REPO_ROOT
from tests.fake_telegram_api import FakeBotApi, user

ROUNDS = 20
USERS = tuple(user(number, f"사용자{number}") for number in (1, 2, 3, 4))
MESSAGES_PER_ROUND = 12
IN_COMMIT = "in-commit"

SERVICE_PROCESS = f"""
import asyncio, os, re, sys
from bot.service import serve
from core.config import Settings
from core.store import SqliteStore
from core.types import Task
from tests.fakes import END, FakeGenerator, make_harness

def number(request):
    return re.findall(r"기억 (\\d+)", request.prompt)[-1]

scripts = {{
    Task.MEMORY: lambda request: f" [기억{{number(request)}}: 값{{number(request)}}]{{END}}",
    Task.SUMMARY: lambda request: f" 요약{{number(request)}}{{END}}",
}}

if os.environ.get("CRASH_STALL_IN_COMMIT"):
    log_turn = SqliteStore._log_turn

    async def log_turn_then_stall(conn, turn):
        # The last statement of the turn's transaction has run; COMMIT has not.
        await log_turn(conn, turn)
        print("{IN_COMMIT}", turn.prompt, flush=True)
        await asyncio.sleep(600)

    SqliteStore._log_turn = staticmethod(log_turn_then_stall)

async def main():
    settings = Settings(_env_file=None)
    store = await SqliteStore.open(settings.db_path)
    harness = make_harness(store=store, generator=FakeGenerator(scripts=scripts, delay_s=0.01))
    try:
        await serve(harness.engine, store, settings)
    finally:
        await harness.worker.stop()
        await store.close()

sys.exit(asyncio.run(main()))
"""
"""`ohlora bot`'s composition root with fake models; optionally stalls inside a turn's transaction."""


Row = dict[str, object]


@dataclass(frozen=True)
class Snapshot:
    turns: dict[object, Row]
    memories: dict[object, Row]
    summaries: dict[str, str]
    expressions: set[str]


def read(path: Path) -> Snapshot:
    with closing(sqlite3.connect(path)) as database:
        database.row_factory = sqlite3.Row
        assert [tuple(row) for row in database.execute("PRAGMA integrity_check")] == [("ok",)]

        def rows(table: str) -> dict[object, Row]:
            return {row["id"]: dict(row) for row in database.execute(f"SELECT * FROM {table}")}

        return Snapshot(
            turns=rows("turns"),
            memories=rows("memories"),
            summaries={row["conversation_key"]: row["text"] for row in database.execute("SELECT * FROM summaries")},
            expressions={row["user_key"] for row in database.execute("SELECT user_key FROM expressions")},
        )


def turn_number(prompt: object) -> int:
    match = re.fullmatch(r"기억 (\d+)", str(prompt))
    assert match, prompt
    return int(match.group(1))


def check_consistent(snapshot: Snapshot) -> set[int]:
    """What one transaction per turn guarantees; returns the numbers of the logged turns."""
    turns = list(snapshot.turns.values())
    assert {turn["status"] for turn in turns} <= {"ok"}, "no turn should have failed or timed out"
    logged = {turn_number(turn["prompt"]): turn for turn in turns}
    assert len(logged) == len(turns), "a turn was logged twice"
    for turn in turns:
        assert turn["final_input"] and turn["answer"], f"a half-written turn: {turn}"

    remembered: dict[int, object] = {}
    for memory in snapshot.memories.values():
        number = int(str(memory["key"]).removeprefix("기억"))
        assert memory["value"] == f"값{number}"
        remembered[number] = memory["user_key"]
    assert set(remembered) == set(logged), "a memory without its turn, or a turn without its memory"
    assert all(remembered[number] == turn["user_key"] for number, turn in logged.items())

    latest: dict[str, tuple[int, int]] = {}
    for number, turn in logged.items():
        key = str(turn["conversation_key"])
        latest[key] = max(latest.get(key, (0, 0)), (int(str(turn["id"])), number))
    assert {key: text.strip() for key, text in snapshot.summaries.items()} == {
        key: f"요약{number}" for key, (_, number) in latest.items()
    }
    assert snapshot.expressions == {str(turn["user_key"]) for turn in turns}
    return set(logged)


def child_environment(api: FakeBotApi, db_path: Path, *, stall: bool) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("DISCORD_TOKEN", "CRASH_STALL_IN_COMMIT")}
    env.update(
        TELEGRAM_TOKEN=api.token,
        TELEGRAM_API_BASE_URL=api.base_url,
        OHLORA_DB_PATH=str(db_path),
        OHLORA_RATE_LIMIT_PER_MINUTE="0",
        OHLORA_QUEUE_SIZE="64",
        PYTHONPATH=str(REPO_ROOT),
    )
    if stall:
        env["CRASH_STALL_IN_COMMIT"] = "1"
    return env


def more_calls(api: FakeBotApi, method: str, than: int) -> bool:
    return len(api.calls(method)) > than


@pytest.fixture
def fast_fake_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(ThreadingHTTPServer, "request_queue_size", 256)
    monkeypatch.setattr(fake_telegram_api._Handler, "disable_nagle_algorithm", True)
    yield


@pytest.mark.slow
async def test_kill_9_mid_turn_twenty_times_leaves_a_clean_whole_database(tmp_path: Path, fast_fake_api: None) -> None:
    db_path = tmp_path / "ohlora.sqlite3"
    rng = random.Random(20)
    numbers = iter(range(1, 10_000))
    seen = Snapshot({}, {}, {}, set())
    killed_mid_turn = 0

    with FakeBotApi() as api:  # one Bot API for every run, as Telegram is: update ids never repeat
        for round_number in range(ROUNDS):
            stall = round_number % 2 == 0
            polls, actions, photos = (
                len(api.calls(method)) for method in ("getUpdates", "sendChatAction", "sendPhoto")
            )
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                SERVICE_PROCESS,
                cwd=REPO_ROOT,
                env=child_environment(api, db_path, stall=stall),
                stdout=asyncio.subprocess.PIPE,
            )
            try:
                await api.wait_until(
                    partial(more_calls, method="getUpdates", than=polls), "the service to poll", timeout_s=60
                )
                sent = [next(numbers) for _ in range(MESSAGES_PER_ROUND)]
                for index, number in enumerate(sent):
                    api.send_message(USERS[index % len(USERS)], f"기억 {number}")
                caught: int | None = None
                if stall:
                    assert child.stdout is not None
                    line = (await asyncio.wait_for(child.stdout.readline(), timeout=60)).decode().split()
                    assert line[0] == IN_COMMIT, line
                    caught = turn_number(" ".join(line[1:]))
                else:
                    await api.wait_until(partial(more_calls, method="sendChatAction", than=actions), "a turn to start")
                    await asyncio.sleep(rng.uniform(0.0, 0.25))
                answered = len(api.calls("sendPhoto")) - photos
            finally:
                child.kill()  # SIGKILL
                await child.wait()
            assert child.returncode == -signal.SIGKILL
            killed_mid_turn += not stall and answered < len(sent)

            store = await SqliteStore.open(db_path)  # as the next start opens it: migrations, WAL
            await store.close()
            snapshot = read(db_path)
            logged = check_consistent(snapshot)
            if caught is not None:
                assert caught not in logged, f"turn {caught} was killed inside its transaction yet left rows"
            assert {key: row for key, row in snapshot.turns.items() if key in seen.turns} == seen.turns
            assert {key: row for key, row in snapshot.memories.items() if key in seen.memories} == seen.memories
            assert len(snapshot.turns) >= len(seen.turns) and len(snapshot.memories) >= len(seen.memories)
            seen = snapshot

    assert killed_mid_turn >= ROUNDS // 4, "random kills should mostly land while turns are still running"
    assert len(seen.turns) >= ROUNDS // 2, "the rounds should have logged turns between the kills"
