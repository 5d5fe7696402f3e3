"""What the store holds and hands out, and the rules every implementation applies alike.

The original kept one global memory text file for its single user (SPEC E.6). Here every row is
keyed by the user (`platform:user_id`) or the conversation (`platform:chat_id:user_id`), so one
user's memories and summary can never leak into another's prompt, even in a shared group chat.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import numpy as np

from core.types import Expression, ExpressionScores, Reply, conversation_key

TOTAL_TIMING = "total"
"""The `timings` entry holding a turn's wall time; without it the stages' sum stands in."""


class StoreError(Exception):
    """The store cannot be used as asked."""


class SchemaTooNew(StoreError):
    """The database was written by a newer version of this program; opening it could corrupt it."""


class StoreUnavailable(StoreError):
    """The database file cannot be opened or written at all (a read-only path, a folder, no space)."""

    @classmethod
    def at(cls, path: Path, error: BaseException) -> StoreUnavailable:
        return cls(
            f"cannot use the database at {path}: {error}\n"
            "Point OHLORA_DB_PATH (or --db) at a file in a folder this user can write to."
        )


@dataclass(frozen=True)
class NewMemory:
    """A memory the memory model produced this turn, with its S-BERT embedding."""

    key: str
    value: str
    text: str
    """The line as the model wrote it, e.g. "[오늘 날씨: 비]"; retrieval compares it."""
    embedding: np.ndarray = field(compare=False)


@dataclass(frozen=True)
class StoredMemory:
    """A user's memory as stored; `embedding` is a read-only float32 vector."""

    key: str
    value: str
    text: str
    embedding: np.ndarray = field(compare=False)
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class TurnRecord:
    """Everything one answered (or failed) turn leaves behind.

    `summary` None leaves the conversation's stored summary as it is; "" resets it, as a failed
    summary does upstream (SPEC E.3.3). `scores` None leaves the user's last expression as it is.
    """

    platform: str
    user_key: str
    conversation_key: str
    prompt: str
    final_input: str
    answer: str
    status: str
    used_memory: str | None
    expression: Expression | None
    scores: ExpressionScores | None
    summary: str | None
    timings: Mapping[str, float]
    created_at: float
    event_id: str | None = None
    """The inbox event this turn answers; its `reply` is kept with it in the same transaction."""
    reply: Reply | None = None
    """What the user is sent: kept until delivered, so a restart delivers it instead of redoing the turn."""

    @property
    def total_s(self) -> float:
        return total_seconds(self.timings)


@dataclass(frozen=True)
class TurnRow:
    """One line of the turn log, as admins read it."""

    id: int
    created_at: float
    platform: str
    user_key: str
    conversation_key: str
    prompt: str
    final_input: str
    answer: str
    status: str
    used_memory: str | None
    expression: Expression | None
    timings: Mapping[str, float]
    total_s: float


@dataclass(frozen=True)
class Footprint:
    """How much the store holds about one user: what `/forget all` will delete, or did."""

    memories: int
    summaries: int
    turns: int
    expression: bool

    @property
    def empty(self) -> bool:
        return not (self.memories or self.summaries or self.turns or self.expression)


@dataclass(frozen=True)
class UserData:
    """Everything stored about one user, for `/mydata`."""

    user_key: str
    memories: tuple[StoredMemory, ...]
    summaries: Mapping[str, str]
    """Conversation key → that conversation's running summary."""
    last_scores: ExpressionScores | None
    turns: tuple[TurnRow, ...]
    """Oldest first."""
    settings: Mapping[str, Mapping[str, str]]
    """Settings that name the user (a block, the block notice), by scope."""
    pending_messages: tuple[str, ...]
    """Texts of messages received and not yet answered (the inbox), as the platform sent them."""


@dataclass(frozen=True)
class StoreStats:
    turns_total: int
    users_total: int
    """Users with at least one logged turn."""
    memories_total: int
    recent_latencies_s: tuple[float, ...]
    """Total seconds of the most recent turns, oldest first."""


class EventState(str, Enum):
    RECEIVED = "received"
    """Stored before the platform was told it arrived; not answered yet."""
    ANSWERED = "answered"
    """The reply is computed and kept, not yet delivered."""
    DONE = "done"
    """Delivered (or given up on); only the id stays, to drop duplicates."""


@dataclass(frozen=True)
class InboxEvent:
    """A platform event that will get an answer, kept from its arrival until the answer is delivered.

    `payload` is the event as the platform described it (JSON text), so that a restart can handle
    it again; it is dropped once the event is done.
    """

    platform: str
    event_id: str
    user_key: str
    payload: str
    received_at: float


@dataclass(frozen=True)
class PendingEvent:
    """An inbox event a restart must finish."""

    event: InboxEvent
    reply: Reply | None
    """The reply computed before the restart and not yet delivered; None: still to be handled."""


def normalize(text: str) -> str:
    """All whitespace removed: upstream compared memories "once all spaces are removed"."""
    return "".join(text.split())


def total_seconds(timings: Mapping[str, float]) -> float:
    if TOTAL_TIMING in timings:
        return float(timings[TOTAL_TIMING])
    return float(sum(timings.values()))


def as_embedding(vector: np.ndarray) -> np.ndarray:
    """A private, read-only float32 copy, so a caller's later writes cannot change a memory."""
    array = np.array(vector, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"an embedding must be one non-empty vector, got shape {array.shape}")
    array.flags.writeable = False
    return array


BLOCKED_SCOPE = "blocked"
"""Settings scope whose keys are blocked user keys."""

FACE_KEY = "face"


def forgotten_pseudonym() -> str:
    """Who a forgotten user's logged turns belong to from then on: nobody that can be named."""
    return f"forgotten:{secrets.token_hex(8)}"


def chat_scope(platform: str, chat_id: str) -> str:
    """Settings scope of one chat or channel (its pinned face)."""
    return f"chat:{platform}:{chat_id}"


def conversation_prefix(platform: str, chat_id: str) -> str:
    """What the conversation keys of every user in one chat begin with."""
    return conversation_key(platform, chat_id, "")


def allowed_channels_scope(platform: str) -> str:
    """Settings scope whose keys are the channel ids where the bot answers on `platform`."""
    return f"allowed_channels:{platform}"
