"""The store's behaviour in dictionaries, for tests that need a store but not a file."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from core.store.typed_settings import TypedSettings
from core.store.values import (
    EventState,
    Footprint,
    InboxEvent,
    NewMemory,
    PendingEvent,
    StoredMemory,
    StoreStats,
    TurnRecord,
    TurnRow,
    UserData,
    allowed_channels_scope,
    as_embedding,
    chat_scope,
    conversation_prefix,
    forgotten_pseudonym,
    normalize,
)
from core.types import ExpressionScores, Reply


@dataclass(frozen=True)
class _InboxRow:
    event: InboxEvent
    state: EventState
    reply: Reply | None

    @staticmethod
    def finished(row: _InboxRow) -> _InboxRow:
        """Only the id stays, as in SQLite: nothing the user wrote outlives the delivery."""
        return _InboxRow(dataclasses.replace(row.event, payload=""), EventState.DONE, None)


@dataclass(frozen=True)
class _Summary:
    user_key: str
    text: str


class InMemoryStore(TypedSettings):
    """The same behaviour in dictionaries, for tests that need a store but not a file.

    Nothing here awaits, so every method is atomic on the event loop; `commit_turn` still works
    out every change before applying any, so a failure leaves nothing half-written, as in SQLite.
    """

    def __init__(self) -> None:
        self._memories: dict[str, list[StoredMemory]] = {}
        self._summaries: dict[str, _Summary] = {}
        self._scores: dict[str, ExpressionScores] = {}
        self._turns: list[TurnRow] = []
        self._turn_ids = itertools.count(1)
        self._settings: dict[str, dict[str, str]] = {}
        self._inbox: dict[tuple[str, str], _InboxRow] = {}

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> InMemoryStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def memories(self, user_key: str) -> list[StoredMemory]:
        return list(self._memories.get(user_key, ()))

    async def summary(self, conversation_key: str) -> str:
        stored = self._summaries.get(conversation_key)
        return stored.text if stored else ""

    async def last_scores(self, user_key: str) -> ExpressionScores | None:
        return self._scores.get(user_key)

    async def commit_turn(self, turn: TurnRecord, new_memory: NewMemory | None) -> None:
        memories = self._memories.get(turn.user_key, [])
        if new_memory is not None:
            memories = _upserted(memories, new_memory, turn.created_at)
        row = self._log_turn(turn)
        # Nothing below can fail.
        if memories:
            self._memories[turn.user_key] = memories
        if turn.summary:
            self._summaries[turn.conversation_key] = _Summary(turn.user_key, turn.summary)
        elif turn.summary is not None:
            self._summaries.pop(turn.conversation_key, None)
        if turn.scores is not None:
            self._scores[turn.user_key] = turn.scores
        self._turns.append(row)
        if turn.event_id is not None and turn.reply is not None:
            self._answer(turn.platform, turn.event_id, turn.reply)

    def _log_turn(self, turn: TurnRecord) -> TurnRow:
        return TurnRow(
            id=next(self._turn_ids),
            created_at=turn.created_at,
            platform=turn.platform,
            user_key=turn.user_key,
            conversation_key=turn.conversation_key,
            prompt=turn.prompt,
            final_input=turn.final_input,
            answer=turn.answer,
            status=turn.status,
            used_memory=turn.used_memory,
            expression=turn.expression,
            timings=dict(turn.timings),
            total_s=turn.total_s,
        )

    async def delete_memories(self, user_key: str, key: str | None = None) -> int:
        memories = self._memories.pop(user_key, [])
        kept = [] if key is None else [m for m in memories if normalize(m.key) != normalize(key)]
        if kept:
            self._memories[user_key] = kept
        return len(memories) - len(kept)

    async def clear_summaries(self, user_key: str, conversation_key: str | None = None) -> int:
        doomed = [
            conversation
            for conversation, stored in self._summaries.items()
            if stored.user_key == user_key and conversation_key in (None, conversation)
        ]
        for conversation in doomed:
            del self._summaries[conversation]
        return len(doomed)

    async def forget_user(self, user_key: str) -> Footprint:
        gone = await self.footprint(user_key)
        self._memories.pop(user_key, None)
        await self.clear_summaries(user_key)
        self._scores.pop(user_key, None)
        pseudonym = forgotten_pseudonym()
        self._turns = [
            dataclasses.replace(
                row,
                user_key=pseudonym,
                conversation_key=pseudonym,
                prompt="",
                final_input="",
                answer="",
                used_memory=None,
                expression=None,
            )
            if row.user_key == user_key
            else row
            for row in self._turns
        ]
        for key, row in self._inbox.items():
            if row.event.user_key == user_key:
                self._inbox[key] = _InboxRow.finished(row)
        return gone

    async def footprint(self, user_key: str) -> Footprint:
        return Footprint(
            memories=len(self._memories.get(user_key, ())),
            summaries=sum(stored.user_key == user_key for stored in self._summaries.values()),
            turns=sum(row.user_key == user_key for row in self._turns),
            expression=user_key in self._scores,
        )

    async def user_data(self, user_key: str) -> UserData:
        named = {
            scope: {key: value for key, value in values.items() if user_key in (scope, key)}
            for scope, values in self._settings.items()
        }
        return UserData(
            user_key=user_key,
            memories=tuple(self._memories.get(user_key, ())),
            summaries={
                key: stored.text for key, stored in sorted(self._summaries.items()) if stored.user_key == user_key
            },
            last_scores=self._scores.get(user_key),
            turns=tuple(row for row in self._turns if row.user_key == user_key),
            settings={scope: values for scope, values in sorted(named.items()) if values},
            pending_messages=tuple(
                row.event.payload
                for row in sorted(self._inbox.values(), key=lambda row: row.event.received_at)
                if row.event.user_key == user_key and row.state is not EventState.DONE
            ),
        )

    async def prune_turns(self, created_before: float, keep_latest: int) -> int:
        newest = {row.id for row in self._turns[-max(keep_latest, 1) :]}
        kept = [row for row in self._turns if row.created_at >= created_before and row.id in newest]
        pruned = len(self._turns) - len(kept)
        self._turns = kept
        return pruned

    async def move_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        old_prefix, new_prefix = conversation_prefix(platform, old_chat_id), conversation_prefix(platform, new_chat_id)
        for key in [key for key in self._summaries if key.startswith(old_prefix)]:
            self._summaries[new_prefix + key[len(old_prefix) :]] = self._summaries.pop(key)
        moved = self._settings.pop(chat_scope(platform, old_chat_id), None)
        if moved is not None:
            self._settings[chat_scope(platform, new_chat_id)] = moved
        channels = self._settings.get(allowed_channels_scope(platform), {})
        if old_chat_id in channels:
            channels[new_chat_id] = channels.pop(old_chat_id)

    async def receive_events(self, events: Sequence[InboxEvent]) -> list[bool]:
        fresh = []
        for event in events:
            key = (event.platform, event.event_id)
            fresh.append(key not in self._inbox)
            self._inbox.setdefault(key, _InboxRow(event, EventState.RECEIVED, None))
        return fresh

    async def answer_event(self, platform: str, event_id: str, reply: Reply) -> None:
        self._answer(platform, event_id, reply)

    def _answer(self, platform: str, event_id: str, reply: Reply) -> None:
        row = self._inbox.get((platform, event_id))
        if row is not None and row.state is not EventState.DONE:
            self._inbox[(platform, event_id)] = dataclasses.replace(row, state=EventState.ANSWERED, reply=reply)

    async def finish_events(self, platform: str, event_ids: Sequence[str]) -> None:
        for event_id in event_ids:
            row = self._inbox.get((platform, event_id))
            if row is not None:
                self._inbox[(platform, event_id)] = _InboxRow.finished(row)

    async def pending_events(self, platform: str) -> list[PendingEvent]:
        rows = [row for (row_platform, _), row in self._inbox.items() if row_platform == platform]
        return [
            PendingEvent(row.event, row.reply)
            for row in sorted(rows, key=lambda row: row.event.received_at)
            if row.state is not EventState.DONE
        ]

    async def prune_events(self, platform: str, received_before: float) -> int:
        doomed = [
            key
            for key, row in self._inbox.items()
            if key[0] == platform and row.state is EventState.DONE and row.event.received_at < received_before
        ]
        for key in doomed:
            del self._inbox[key]
        return len(doomed)

    async def get_setting(self, scope: str, key: str) -> str | None:
        return self._settings.get(scope, {}).get(key)

    async def set_setting(self, scope: str, key: str, value: str) -> None:
        self._settings.setdefault(scope, {})[key] = value

    async def delete_setting(self, scope: str, key: str) -> None:
        self._settings.get(scope, {}).pop(key, None)

    async def settings(self, scope: str) -> dict[str, str]:
        return dict(sorted(self._settings.get(scope, {}).items()))

    async def stats(self, window: int = 1000) -> StoreStats:
        recent = self._turns[max(len(self._turns) - max(window, 0), 0) :]
        return StoreStats(
            turns_total=len(self._turns),
            users_total=len({row.user_key for row in self._turns}),
            memories_total=sum(len(memories) for memories in self._memories.values()),
            recent_latencies_s=tuple(row.total_s for row in recent),
        )

    async def recent_turns(self, user_key: str | None, limit: int) -> list[TurnRow]:
        rows = [row for row in reversed(self._turns) if user_key in (None, row.user_key)]
        return rows[: max(limit, 0)]


def _upserted(memories: Sequence[StoredMemory], new: NewMemory, now: float) -> list[StoredMemory]:
    """`memories` after storing `new`, by the rules of `SqliteStore._upsert_memory`."""
    if any(normalize(memory.text) == normalize(new.text) for memory in memories):
        return list(memories)
    stored = StoredMemory(
        key=new.key,
        value=new.value,
        text=new.text,
        embedding=as_embedding(new.embedding),
        created_at=now,
        updated_at=now,
    )
    for index, memory in enumerate(memories):
        if normalize(memory.key) == normalize(new.key):
            kept = dataclasses.replace(stored, created_at=memory.created_at)
            return [*memories[:index], kept, *memories[index + 1 :]]
    return [*memories, stored]
