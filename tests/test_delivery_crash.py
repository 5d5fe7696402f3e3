"""`ohlora bot` killed (-9) and stopped (TERM) mid-turn, again and again: every message Telegram
counted as received is answered exactly once.

The service runs as its own process, composed as `ohlora bot` composes it (real `serve()`,
Telegram adapter, poller, inbox, engine, worker and SQLite file) over fake models that take a
moment per call and say when a call starts. One fake Bot API serves every run, as Telegram does:
update ids never repeat, and an update stays until a later offset confirms it.

Each round, users' messages are answered; then two more turns are caught inside the model, with
their updates already confirmed to Telegram (so Telegram will never send them again), and the
process is killed with SIGKILL, or sent SIGTERM with a grace period shorter than the turns, so
that they are cancelled. The next start must answer them from its inbox. At the end every
message has exactly one answer, and the turn log has each turn once.

Exactly once holds here because the kills land inside the model. A kill in the millisecond
between a delivery and the inbox noting it would send that answer again after the restart:
Telegram has no idempotency key, so "at least once, duplicates only in that window" is the
guarantee, and the README says so.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import sys
from collections import Counter
from contextlib import closing
from functools import partial
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.fake_telegram_api import FakeBotApi, user

ROUNDS = 6
USERS = tuple(user(number, f"사용자{number}") for number in (11, 12, 13))
IN_MODEL = "in-model"

SERVICE_PROCESS = f"""
import asyncio, os, re, sys
from bot.service import serve
from core.config import Settings
from core.store import SqliteStore
from core.types import Task
from tests.fakes import END, FakeGenerator, make_harness

def number(request):
    return re.findall(r"메시지 (\\d+)", request.prompt)[-1]

class AnnouncingGenerator(FakeGenerator):
    def generate(self, requests):
        for request in requests:
            if request.task is Task.OUTPUT_MESSAGE:
                print("{IN_MODEL}", number(request), flush=True)
        return super().generate(requests)

def answer(request):
    return f" 메시지 {{number(request)}} 잘 받았어!{{END}}"

async def main():
    settings = Settings(_env_file=None)
    store = await SqliteStore.open(settings.db_path)
    generator = AnnouncingGenerator(scripts={{Task.OUTPUT_MESSAGE: answer}}, delay_s=0.4)
    harness = make_harness(store=store, generator=generator)
    try:
        await serve(harness.engine, store, settings, shutdown_grace_s=float(os.environ["GRACE_S"]))
    finally:
        await harness.worker.stop()
        await store.close()

sys.exit(asyncio.run(main()))
"""
"""`ohlora bot`'s composition root with fake models that announce each answer they start."""

ANSWER = re.compile(r"메시지 (\d+) 잘 받았어")


async def start_service(api: FakeBotApi, db_path: Path) -> asyncio.subprocess.Process:
    env = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"}
    env.update(
        TELEGRAM_TOKEN=api.token,
        TELEGRAM_API_BASE_URL=api.base_url,
        OHLORA_DB_PATH=str(db_path),
        OHLORA_RATE_LIMIT_PER_MINUTE="0",
        GRACE_S="0.1",
        PYTHONPATH=str(REPO_ROOT),
    )
    polls = len(api.calls("getUpdates"))
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVICE_PROCESS, cwd=REPO_ROOT, env=env, stdout=asyncio.subprocess.PIPE
    )
    await api.wait_until(lambda api: len(api.calls("getUpdates")) > polls, "the service to poll", timeout_s=60)
    return child


def answers(api: FakeBotApi) -> Counter[int]:
    """How often each message number was answered (faces delivered)."""
    found = (ANSWER.search(call.text or "") for call in api.sent() if call.method == "sendPhoto")
    return Counter(int(match.group(1)) for match in found if match)


def all_confirmed(api: FakeBotApi, ids: list[int]) -> bool:
    return all(api.is_confirmed(update_id) for update_id in ids)


async def caught_in_the_model(child: asyncio.subprocess.Process, numbers: set[int]) -> None:
    assert child.stdout is not None
    started: set[int] = set()
    while not numbers <= started:
        words = (await asyncio.wait_for(child.stdout.readline(), timeout=30)).decode().split()
        if words and words[0] == IN_MODEL:
            started.add(int(words[1]))


@pytest.mark.slow
async def test_every_confirmed_message_is_answered_once_across_kills_and_stops(tmp_path: Path) -> None:
    db_path = tmp_path / "ohlora.sqlite3"
    sent: list[int] = []
    numbers = iter(range(1, 10_000))

    def say(sender_index: int) -> tuple[int, int]:
        number = next(numbers)
        sent.append(number)
        update_id, _ = api.send_message(USERS[sender_index], f"메시지 {number}")
        return number, update_id

    with FakeBotApi() as api:
        for round_number in range(ROUNDS):
            child = await start_service(api, db_path)
            try:
                await api.wait_until(lambda api: set(answers(api)) >= set(sent), "what was left", timeout_s=30)
                for index in range(len(USERS)):
                    say(index)
                await api.wait_until(lambda api: set(answers(api)) >= set(sent), "this round's answers", timeout_s=30)

                caught = [say(0), say(1)]
                await caught_in_the_model(child, {number for number, _ in caught})
                ids = [update_id for _, update_id in caught]
                await api.wait_until(partial(all_confirmed, ids=ids), "Telegram to count them as received")
                assert not set(answers(api)) & {number for number, _ in caught}
            finally:
                if round_number % 2:
                    child.send_signal(signal.SIGTERM)
                else:
                    child.kill()
                await asyncio.wait_for(child.wait(), timeout=30)
            assert child.returncode == (0 if round_number % 2 else -signal.SIGKILL)

        child = await start_service(api, db_path)
        try:
            await api.wait_until(lambda api: set(answers(api)) >= set(sent), "the last ones", timeout_s=30)
        finally:
            child.send_signal(signal.SIGTERM)
            await asyncio.wait_for(child.wait(), timeout=30)

        assert answers(api) == Counter({number: 1 for number in sent})
    with closing(sqlite3.connect(db_path)) as database:
        prompts = Counter(row[0] for row in database.execute("SELECT prompt FROM turns WHERE status = 'ok'"))
        unfinished = database.execute("SELECT count(*) FROM inbox WHERE state != 'done'").fetchone()[0]
    assert prompts == Counter({f"메시지 {number}": 1 for number in sent})
    assert unfinished == 0
