"""What the engine and the command handlers need from storage; `SqliteStore` and `InMemoryStore` provide it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from core.store.values import (
    Footprint,
    InboxEvent,
    NewMemory,
    PendingEvent,
    StoredMemory,
    StoreStats,
    TurnRecord,
    TurnRow,
    UserData,
)
from core.types import ExpressionScores, Reply


class Store(Protocol):
    """What the engine and the command handlers need from storage."""

    async def close(self) -> None: ...

    async def memories(self, user_key: str) -> list[StoredMemory]:
        """The user's memories in insertion order (retrieval ties keep that order)."""
        ...

    async def summary(self, conversation_key: str) -> str:
        """The running summary of one conversation, "" when there is none."""
        ...

    async def last_scores(self, user_key: str) -> ExpressionScores | None: ...

    async def commit_turn(self, turn: TurnRecord, new_memory: NewMemory | None) -> None:
        """Write the memory, summary, expression and log line of one turn, all or nothing."""
        ...

    async def delete_memories(self, user_key: str, key: str | None = None) -> int:
        """Delete one memory (key compared ignoring whitespace) or all; return how many went."""
        ...

    async def clear_summaries(self, user_key: str, conversation_key: str | None = None) -> int: ...

    async def forget_user(self, user_key: str) -> Footprint:
        """Delete everything the user left and return what went: memories, summaries of every
        conversation, last expression, inbox texts, and the texts of their logged turns.

        Users own their data, so their words go. A logged turn keeps only its status and timings,
        under a pseudonym no one can trace back, so the service's statistics still add up. A
        block is a moderation decision about the user rather than the user's data, and stays.
        Deleted text is overwritten, in the file and its write-ahead log.
        """
        ...

    async def footprint(self, user_key: str) -> Footprint: ...

    async def user_data(self, user_key: str) -> UserData: ...

    async def prune_turns(self, created_before: float, keep_latest: int) -> int:
        """Delete logged turns older than `created_before`, and all but the `keep_latest` newest;
        return how many went. Works in small transactions, so turns are never kept waiting long."""
        ...

    async def move_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        """A chat got a new id (a Telegram group became a supergroup): its summaries and settings follow."""
        ...

    async def receive_events(self, events: Sequence[InboxEvent]) -> list[bool]:
        """Keep each event until it is done; False for one already known (a duplicate), which changes nothing."""
        ...

    async def answer_event(self, platform: str, event_id: str, reply: Reply) -> None:
        """Keep the computed reply with its event until it is delivered (a no-op for a done event)."""
        ...

    async def finish_events(self, platform: str, event_ids: Sequence[str]) -> None:
        """The events are delivered or given up on: payloads and replies go, ids stay for duplicates."""
        ...

    async def pending_events(self, platform: str) -> list[PendingEvent]:
        """Events not yet done, oldest first: what a restart must finish."""
        ...

    async def prune_events(self, platform: str, received_before: float) -> int:
        """Forget done events older than any duplicate could arrive; return how many went."""
        ...

    async def get_setting(self, scope: str, key: str) -> str | None: ...

    async def set_setting(self, scope: str, key: str, value: str) -> None: ...

    async def delete_setting(self, scope: str, key: str) -> None: ...

    async def settings(self, scope: str) -> dict[str, str]: ...

    async def face_for(self, scope: str) -> int | None: ...

    async def set_face(self, scope: str, face: int | None) -> None: ...

    async def is_blocked(self, user_key: str) -> bool: ...

    async def set_blocked(self, user_key: str, blocked: bool) -> None: ...

    async def blocked_users(self) -> list[str]: ...

    async def is_channel_allowed(self, platform: str, channel_id: str) -> bool: ...

    async def set_channel_allowed(self, platform: str, channel_id: str, allowed: bool) -> None: ...

    async def allowed_channels(self, platform: str) -> list[str]: ...

    async def stats(self, window: int = 1000) -> StoreStats: ...

    async def recent_turns(self, user_key: str | None, limit: int) -> list[TurnRow]:
        """The latest turns, newest first, of one user or of everyone."""
        ...
