"""The inbox as the adapters use it: what arrives is kept until its answer is delivered.

A platform event that will get an answer is written down before the platform is told it
arrived (Telegram confirms updates by the next poll's offset) and finished only once its reply is
out. So a restart, even after kill -9, knows what was received and not answered: it delivers a
reply computed before the crash, answers a recent event again, or tells the user of an old one
that she was restarted. An event id seen before is a duplicate and is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.store import InboxEvent, PendingEvent, Store
from core.types import Reply, ReplyKind

logger = logging.getLogger(__name__)

RESTARTED_TEXT = "미안, 잠깐 다시 시작하느라 이 메시지에 답을 못 했어 🙏 다시 한 번 보내 줄래?"


@dataclass(frozen=True)
class InboxPolicy:
    replay_within_s: float = 600.0
    """After a restart, events younger than this are answered; older ones get `RESTARTED_TEXT`."""
    keep_done_s: float = 2 * 24 * 3600.0
    """How long a finished event's id is kept to recognise a duplicate (Telegram redelivers within a day)."""


@dataclass
class _Batch:
    event_ids: list[str]
    written: asyncio.Future[None]
    writing: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class Arrival:
    """One event as an adapter hands it to the inbox."""

    event_id: str
    user_key: str
    payload: Mapping[str, Any]


class Inbox:
    def __init__(
        self,
        store: Store,
        platform: str,
        policy: InboxPolicy = InboxPolicy(),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._platform = platform
        self._policy = policy
        self._clock = clock
        self._finishing: _Batch | None = None

    async def receive(self, arrivals: Sequence[Arrival]) -> list[bool]:
        """Keep every arrival in one transaction; False for a duplicate, which must not be handled."""
        now = self._clock()
        events = [
            InboxEvent(
                platform=self._platform,
                event_id=arrival.event_id,
                user_key=arrival.user_key,
                payload=json.dumps(arrival.payload, ensure_ascii=False),
                received_at=now,
            )
            for arrival in arrivals
        ]
        return await self._store.receive_events(events)

    async def keep_reply(self, event_id: str, reply: Reply) -> None:
        """Keep a reply until it is delivered. An answer was kept by its turn's own transaction;
        notices and apologies are kept here."""
        if reply.kind is not ReplyKind.ANSWER:
            await self._store.answer_event(self._platform, event_id, reply)

    async def done(self, event_id: str) -> None:
        """Finish an event, in one transaction with every other event finished meanwhile.

        A flood of updates that get no answer (rate-limited, not addressed) finishes in a few
        writes rather than one per update, which would keep everyone else's turns waiting on the
        database. Each caller still returns only once its own event is written.
        """
        batch = self._finishing
        if batch is None:
            # The write starts on the loop's next round: every event finished before then joins it.
            batch = self._finishing = _Batch([], asyncio.get_running_loop().create_future())
            batch.writing = asyncio.create_task(self._finish(batch), name=f"inbox-finish-{self._platform}")
        batch.event_ids.append(event_id)
        await asyncio.shield(batch.written)

    async def _finish(self, batch: _Batch) -> None:
        self._finishing = None
        try:
            await self._store.finish_events(self._platform, batch.event_ids)
        except asyncio.CancelledError:
            batch.written.cancel()  # the waiters must not wait for a write that will never come
            raise
        except Exception as error:
            batch.written.set_exception(error)
        else:
            batch.written.set_result(None)

    async def unfinished(self) -> list[PendingEvent]:
        """What a restart must finish, oldest first; ids of long-finished events are forgotten."""
        await self._store.prune_events(self._platform, self._clock() - self._policy.keep_done_s)
        return await self._store.pending_events(self._platform)

    def is_stale(self, event: InboxEvent) -> bool:
        """Too old to answer as if nothing happened: the user gets `RESTARTED_TEXT` instead."""
        return self._clock() - event.received_at > self._policy.replay_within_s

    @staticmethod
    def payload_of(event: InboxEvent) -> dict[str, Any]:
        payload = json.loads(event.payload)
        if not isinstance(payload, dict):
            raise ValueError(f"inbox event {event.event_id} holds {type(payload).__name__}, not an object")
        return payload
