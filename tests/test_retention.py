"""The turn log's retention: which turns a prune keeps, where the limits come from, and the schedule.

Pruning is what bounds how long what users said stays on disk, so the limits are checked at their
edges with a fixed `now`, and the schedule with an injected clock and sleep (no test waits an hour).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3

import pytest
from pydantic import ValidationError

from core.config import Settings
from core.retention import DAY_S, Retention, keep_pruning, prune_once
from core.store import InMemoryStore, TurnRecord

NOW = 1_700_000_000.0
ALICE = "telegram:1"
BOB = "telegram:2"


def logged(prompt: str, at: float, user: str = ALICE) -> TurnRecord:
    return TurnRecord(
        platform="telegram",
        user_key=user,
        conversation_key=f"telegram:room:{user.split(':')[1]}",
        prompt=prompt,
        final_input=prompt,
        answer=f" {prompt}에 대한 답",
        status="ok",
        used_memory=None,
        expression=None,
        scores=None,
        summary=None,
        timings={"total": 1.0},
        created_at=at,
    )


async def store_with_turns(*ages_days: float) -> InMemoryStore:
    """One turn per age, oldest first, named by its age ("40d"), alternating between two users."""
    store = InMemoryStore()
    for n, age in enumerate(ages_days):
        await store.commit_turn(logged(f"{age:g}d", NOW - age * DAY_S, (ALICE, BOB)[n % 2]), None)
    return store


async def kept(store: InMemoryStore) -> list[str]:
    return [row.prompt for row in reversed(await store.recent_turns(None, 1000))]


async def test_turns_older_than_the_limit_are_pruned_and_the_rest_kept() -> None:
    """`OHLORA_TURN_LOG_DAYS=30`: a turn exactly 30 days old is not yet older than 30 days."""
    store = await store_with_turns(400, 40, 30.5, 30, 29, 1, 0)

    assert await prune_once(store, Retention(days=30, max_rows=100), NOW) == 3
    assert await prune_once(store, Retention(days=30, max_rows=100), NOW) == 0

    assert await kept(store) == ["30d", "29d", "1d", "0d"]
    stats = await store.stats()
    assert (stats.turns_total, stats.users_total, stats.recent_latencies_s) == (4, 2, (1.0,) * 4)


async def test_the_row_cap_keeps_only_the_newest_turns() -> None:
    """However young the turns, no more than `max_rows` stay."""
    store = await store_with_turns(10, 5, 3, 1)

    assert await prune_once(store, Retention(days=30, max_rows=2), NOW) == 2

    assert await kept(store) == ["3d", "1d"]


async def test_zero_days_means_no_age_limit_but_the_cap_still_holds() -> None:
    """`OHLORA_TURN_LOG_DAYS=0` keeps turns whatever their age; only the row cap prunes then."""
    store = await store_with_turns(3650, 400, 1)

    assert await prune_once(store, Retention(days=0, max_rows=100), NOW) == 0
    assert await kept(store) == ["3650d", "400d", "1d"]

    assert await prune_once(store, Retention(days=0, max_rows=2), NOW) == 1
    assert await kept(store) == ["400d", "1d"]


async def test_a_prune_that_took_something_says_so_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """Operators can see retention working; a prune that found nothing stays quiet."""
    store = await store_with_turns(40, 1)

    with caplog.at_level(logging.INFO, logger="core.retention"):
        await prune_once(store, Retention(days=30), NOW)
        await prune_once(store, Retention(days=30), NOW)

    assert [record.getMessage() for record in caplog.records] == [
        "turn log: pruned 1 turn(s) past the retention limits"
    ]


def test_the_limits_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Defaults as documented (30 days, 100 000 rows); the environment overrides them; nonsense is refused."""
    for name in ("OHLORA_TURN_LOG_DAYS", "OHLORA_TURN_LOG_MAX_ROWS"):
        monkeypatch.delenv(name, raising=False)
    assert Retention.of(Settings(_env_file=None)) == Retention(days=30, max_rows=100_000)  # type: ignore[call-arg]

    monkeypatch.setenv("OHLORA_TURN_LOG_DAYS", "0")
    monkeypatch.setenv("OHLORA_TURN_LOG_MAX_ROWS", "500")
    assert Retention.of(Settings(_env_file=None)) == Retention(days=0, max_rows=500)  # type: ignore[call-arg]

    with pytest.raises(ValidationError):
        Settings(_env_file=None, turn_log_days=-1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Settings(_env_file=None, turn_log_max_rows=0)  # type: ignore[call-arg]


class RecordingStore(InMemoryStore):
    """Records each prune in `events`; the first `failures` fail as a locked database does."""

    def __init__(self, events: list[str], failures: int = 0) -> None:
        super().__init__()
        self.events = events
        self.failures = failures
        self.prunes: list[tuple[float, int]] = []

    async def prune_turns(self, created_before: float, keep_latest: int) -> int:
        self.prunes.append((created_before, keep_latest))
        if len(self.prunes) <= self.failures:
            self.events.append("prune failed")
            raise sqlite3.OperationalError("database is locked")
        self.events.append("prune")
        return await super().prune_turns(created_before, keep_latest)


class FakeSleep:
    """Returns at once, records the wait in `events`, and cancels the loop at the `stop_after`-th sleep."""

    def __init__(self, events: list[str], stop_after: int) -> None:
        self.events = events
        self.stop_after = stop_after
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.events.append("sleep")
        if len(self.waits) >= self.stop_after:
            raise asyncio.CancelledError


async def test_keep_pruning_prunes_at_start_and_after_every_sleep() -> None:
    """A service started after a long pause prunes at once, then every `every_s`, each time from `now`."""
    events: list[str] = []
    store = RecordingStore(events)
    await store.commit_turn(logged("old", NOW - 2 * DAY_S), None)
    await store.commit_turn(logged("new", NOW), None)
    times = iter([NOW, NOW + 60, NOW + 120])
    sleep = FakeSleep(events, stop_after=3)

    with pytest.raises(asyncio.CancelledError):
        await keep_pruning(store, Retention(days=1, max_rows=5, every_s=60), clock=lambda: next(times), sleep=sleep)

    assert events == ["prune", "sleep", "prune", "sleep", "prune", "sleep"]
    assert sleep.waits == [60, 60, 60]
    assert store.prunes == [(NOW - DAY_S, 5), (NOW + 60 - DAY_S, 5), (NOW + 120 - DAY_S, 5)]
    assert [row.prompt for row in await store.recent_turns(None, 10)] == ["new"]


async def test_a_failing_store_is_logged_with_its_traceback_and_pruning_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A locked database must not end retention for the life of the service."""
    events: list[str] = []
    store = RecordingStore(events, failures=1)
    await store.commit_turn(logged("old", NOW - 40 * DAY_S), None)

    with caplog.at_level(logging.ERROR, logger="core.retention"), pytest.raises(asyncio.CancelledError):
        await keep_pruning(store, Retention(every_s=5), clock=lambda: NOW, sleep=FakeSleep(events, stop_after=2))

    assert events == ["prune failed", "sleep", "prune", "sleep"]
    (record,) = caplog.records
    assert record.exc_info is not None and isinstance(record.exc_info[1], sqlite3.OperationalError)
    assert "trying again in 5 s" in record.getMessage()
    assert await store.recent_turns(None, 10) == [], "the next round pruned what the failed one could not"


async def test_keep_pruning_runs_beside_turns_and_stops_when_cancelled() -> None:
    """As the service runs it: a background task on the real `asyncio.sleep`, cancelled at shutdown."""
    events: list[str] = []
    store = RecordingStore(events)
    task = asyncio.create_task(keep_pruning(store, Retention(every_s=0.01)))

    async def three_prunes() -> None:
        while events.count("prune") < 3:
            await asyncio.sleep(0.01)

    await asyncio.wait_for(three_prunes(), timeout=5)
    await store.commit_turn(logged("meanwhile", NOW), None)  # the store is free between prunes

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
