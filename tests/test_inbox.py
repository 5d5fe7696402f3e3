"""The inbox as adapters use it: kept on arrival, finished in group commits, stale after a restart.

Run over `InMemoryStore` (the store tests hold both stores to the same inbox rules), wrapped where a
test must count or hold the writes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from bot.inbox import Arrival, Inbox, InboxPolicy
from core.store import InboxEvent, InMemoryStore
from core.types import RenderedFace, Reply, ReplyKind


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class RecordingStore(InMemoryStore):
    """Records each `finish_events` write; `gate` holds writes open, `fail` makes them raise."""

    def __init__(self) -> None:
        super().__init__()
        self.finish_calls: list[list[str]] = []
        self.finished: set[str] = set()
        self.gate: asyncio.Event | None = None
        self.fail: Exception | None = None

    async def finish_events(self, platform: str, event_ids: Sequence[str]) -> None:
        self.finish_calls.append(list(event_ids))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        await super().finish_events(platform, event_ids)
        self.finished.update(event_ids)


def arrival(event_id: str, user_key: str = "telegram:1", **payload: object) -> Arrival:
    return Arrival(event_id=event_id, user_key=user_key, payload=payload or {"text": f"{event_id}번 메시지"})


async def received(inbox: Inbox, *event_ids: str) -> None:
    assert await inbox.receive([arrival(event_id) for event_id in event_ids]) == [True] * len(event_ids)


async def pending_ids(inbox: Inbox) -> list[str]:
    return [pending.event.event_id for pending in await inbox.unfinished()]


async def test_many_concurrent_dones_become_one_write() -> None:
    """A flood of unanswered updates must not cost one transaction each while others wait on the file."""
    store = RecordingStore()
    inbox = Inbox(store, "telegram")
    ids = [str(n) for n in range(50)]
    await received(inbox, *ids)

    await asyncio.gather(*(inbox.done(event_id) for event_id in ids))

    assert len(store.finish_calls) <= 2
    assert sorted(event_id for call in store.finish_calls for event_id in call) == sorted(ids), "each once"
    assert await pending_ids(inbox) == []


async def test_each_done_returns_only_once_its_own_event_is_written() -> None:
    """The platform may be told "handled" only after the write: returning early would lose it in a crash."""
    store = RecordingStore()
    store.gate = asyncio.Event()
    inbox = Inbox(store, "telegram")
    await received(inbox, "a", "b", "c")
    seen_on_return: dict[str, bool] = {}

    async def finish(event_id: str) -> None:
        await inbox.done(event_id)
        seen_on_return[event_id] = event_id in store.finished

    first = asyncio.create_task(finish("a"))
    while not store.finish_calls:
        await asyncio.sleep(0)
    later = [asyncio.create_task(finish(event_id)) for event_id in ("b", "c")]  # while "a" is being written
    await asyncio.sleep(0.05)
    assert not first.done() and not any(task.done() for task in later)

    store.gate.set()
    await asyncio.gather(first, *later)

    assert seen_on_return == {"a": True, "b": True, "c": True}
    assert store.finish_calls == [["a"], ["b", "c"]], "events arriving during a write join the next one"


async def test_a_failing_write_raises_in_every_waiting_caller_and_the_next_one_works() -> None:
    """Each caller must learn its event was not finished (a restart will redo it), not only the first."""
    store = RecordingStore()
    store.fail = OSError("disk full")
    inbox = Inbox(store, "telegram")
    await received(inbox, "1", "2", "3")

    outcomes = await asyncio.gather(*(inbox.done(event_id) for event_id in "123"), return_exceptions=True)

    assert len(outcomes) == 3 and all(isinstance(outcome, OSError) for outcome in outcomes)
    assert await pending_ids(inbox) == ["1", "2", "3"]
    store.fail = None
    await inbox.done("2")
    assert await pending_ids(inbox) == ["1", "3"]


@pytest.mark.parametrize("kind", [ReplyKind.NOTICE, ReplyKind.ERROR, ReplyKind.BUSY])
async def test_keep_reply_keeps_notices_and_apologies(kind: ReplyKind) -> None:
    """No turn stored these; the inbox must, so a restart sends them instead of redoing the message."""
    store = InMemoryStore()
    inbox = Inbox(store, "telegram")
    await received(inbox, "1")
    reply = Reply(text="잠깐만!", kind=kind, image=RenderedFace(b"\x89PNG\x00", "image/png", 127))

    await inbox.keep_reply("1", reply)

    (pending,) = await inbox.unfinished()
    assert pending.reply is not None
    assert (pending.reply.text, pending.reply.kind, pending.reply.image) == (reply.text, kind, reply.image)


async def test_keep_reply_leaves_answers_to_their_turn() -> None:
    """An answer is kept by its turn's own transaction; writing it again here is a second, separate write."""
    store = InMemoryStore()
    inbox = Inbox(store, "telegram")
    await received(inbox, "1")

    await inbox.keep_reply("1", Reply(text="답", kind=ReplyKind.ANSWER))

    (pending,) = await inbox.unfinished()
    assert pending.reply is None


async def test_duplicates_are_refused_and_payloads_round_trip() -> None:
    """A redelivered update is dropped; what a restart reads back is the payload as it arrived."""
    clock = Clock()
    inbox = Inbox(InMemoryStore(), "telegram", clock=clock)

    assert await inbox.receive([arrival("1", text="안녕 😊", n=[1, 2]), arrival("1"), arrival("2")]) == [
        True,
        False,
        True,
    ]
    assert await inbox.receive([arrival("2")]) == [False]

    first, second = await inbox.unfinished()
    assert Inbox.payload_of(first.event) == {"text": "안녕 😊", "n": [1, 2]}
    assert "안녕" in first.event.payload, "Korean is kept as text, not escaped"
    assert first.event.received_at == clock.now and first.event.user_key == "telegram:1"
    assert second.event.event_id == "2"


def test_a_payload_that_is_not_an_object_is_refused() -> None:
    event = InboxEvent(platform="telegram", event_id="1", user_key="telegram:1", payload="[1, 2]", received_at=0.0)

    with pytest.raises(ValueError, match="inbox event 1 holds list"):
        Inbox.payload_of(event)


async def test_unfinished_forgets_ids_finished_longer_ago_than_keep_done_s() -> None:
    """The table of finished ids must not grow forever; recent ones still catch duplicates."""
    clock = Clock(now=0.0)
    inbox = Inbox(InMemoryStore(), "telegram", InboxPolicy(keep_done_s=100.0), clock=clock)
    await received(inbox, "old")
    await inbox.done("old")
    clock.now = 50.0
    await received(inbox, "recent", "waiting")
    await inbox.done("recent")

    clock.now = 120.0
    assert await pending_ids(inbox) == ["waiting"]

    assert await inbox.receive([arrival("old"), arrival("recent"), arrival("waiting")]) == [True, False, False]


def test_an_event_is_stale_after_replay_within_s() -> None:
    """Past the replay window, "I was restarted" is kinder than an answer to a question long moved on."""
    clock = Clock(now=1000.0)
    inbox = Inbox(InMemoryStore(), "telegram", InboxPolicy(replay_within_s=600.0), clock=clock)
    event = InboxEvent(platform="telegram", event_id="1", user_key="telegram:1", payload="{}", received_at=1000.0)

    clock.now = 1600.0
    assert not inbox.is_stale(event)
    clock.now = 1600.5
    assert inbox.is_stale(event)
