"""Per-user persistence: memories, running summaries, last expressions, the turn log, settings.

The original kept one global memory text file for its single user (SPEC E.6). Here every row is
keyed by the user (`platform:user_id`) or the conversation (`platform:chat_id:user_id`), so one
user's memories and summary can never leak into another's prompt, even in a shared group chat.

Two implementations satisfy one `Store` protocol: `SqliteStore` (aiosqlite, WAL, migrations by
`PRAGMA user_version`) for the service, and `InMemoryStore` for fast engine tests. The rules that
decide what a write means (whitespace-insensitive text and key comparison, the turn's total time,
the settings' names) live in small functions and one mixin that both use.

Everything one turn changes is written by `commit_turn` in ONE transaction, so a crash or an
error never leaves a memory without its turn, or a summary from a turn that was not logged.
"""

from __future__ import annotations

import abc
import asyncio
import dataclasses
import itertools
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Protocol

import aiosqlite
import numpy as np

from core.types import Expression, ExpressionScores

logger = logging.getLogger(__name__)

TOTAL_TIMING = "total"
"""The `timings` entry holding a turn's wall time; without it the stages' sum stands in."""

_EMBEDDING_DTYPE = np.dtype("<f4")
"""Little-endian float32 on disk, so a database file moves between machines unchanged."""


# --------------------------------------------------------------------------------------------
# Values


class StoreError(Exception):
    """The store cannot be used as asked."""


class SchemaTooNew(StoreError):
    """The database was written by a newer version of this program; opening it could corrupt it."""


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
class StoreStats:
    turns_total: int
    users_total: int
    """Users with at least one logged turn."""
    memories_total: int
    recent_latencies_s: tuple[float, ...]
    """Total seconds of the most recent turns, oldest first."""


# --------------------------------------------------------------------------------------------
# The rules both implementations share


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


def _encode_embedding(vector: np.ndarray) -> bytes:
    return as_embedding(vector).astype(_EMBEDDING_DTYPE, copy=False).tobytes()


def _decode_embedding(blob: bytes, dim: int) -> np.ndarray:
    array = np.frombuffer(blob, dtype=_EMBEDDING_DTYPE)
    if array.size != dim:
        raise StoreError(f"stored embedding has {array.size} values, its row says {dim}")
    return as_embedding(array)


def _encode_expression(expression: Expression | None) -> str | None:
    if expression is None:
        return None
    return json.dumps(dataclasses.asdict(expression), ensure_ascii=False)


def _decode_expression(text: str | None) -> Expression | None:
    return None if text is None else Expression(**json.loads(text))


BLOCKED_SCOPE = "blocked"
"""Settings scope whose keys are blocked user keys."""

FACE_KEY = "face"


def allowed_channels_scope(platform: str) -> str:
    """Settings scope whose keys are the channel ids where the bot answers on `platform`."""
    return f"allowed_channels:{platform}"


class _TypedSettings(abc.ABC):
    """Face numbers, blocks and channel allowlists, written as plain settings rows.

    Written once, over the four plain settings methods, so each setting's encoding (its scope,
    key and value) exists in one place for both stores and for any future migration.
    """

    @abc.abstractmethod
    async def get_setting(self, scope: str, key: str) -> str | None: ...

    @abc.abstractmethod
    async def set_setting(self, scope: str, key: str, value: str) -> None: ...

    @abc.abstractmethod
    async def delete_setting(self, scope: str, key: str) -> None: ...

    @abc.abstractmethod
    async def settings(self, scope: str) -> dict[str, str]: ...

    async def face_for(self, scope: str) -> int | None:
        value = await self.get_setting(scope, FACE_KEY)
        return None if value is None else int(value)

    async def set_face(self, scope: str, face: int | None) -> None:
        """Pin a face number for a guild or chat; None goes back to the configured default."""
        if face is None:
            await self.delete_setting(scope, FACE_KEY)
        else:
            await self.set_setting(scope, FACE_KEY, str(face))

    async def is_blocked(self, user_key: str) -> bool:
        return await self.get_setting(BLOCKED_SCOPE, user_key) is not None

    async def set_blocked(self, user_key: str, blocked: bool) -> None:
        if blocked:
            await self.set_setting(BLOCKED_SCOPE, user_key, "1")
        else:
            await self.delete_setting(BLOCKED_SCOPE, user_key)

    async def blocked_users(self) -> list[str]:
        return sorted(await self.settings(BLOCKED_SCOPE))

    async def is_channel_allowed(self, platform: str, channel_id: str) -> bool:
        """Whether the channel is on the allowlist; what an empty allowlist means is policy."""
        return await self.get_setting(allowed_channels_scope(platform), channel_id) is not None

    async def set_channel_allowed(self, platform: str, channel_id: str, allowed: bool) -> None:
        if allowed:
            await self.set_setting(allowed_channels_scope(platform), channel_id, "1")
        else:
            await self.delete_setting(allowed_channels_scope(platform), channel_id)

    async def allowed_channels(self, platform: str) -> list[str]:
        return sorted(await self.settings(allowed_channels_scope(platform)))


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

    async def forget_user(self, user_key: str) -> None:
        """Delete everything the user left: memories, summaries, expression and logged turns.

        Users own their data, so their turns go too. A block is a moderation decision about the
        user rather than the user's data, and stays.
        """
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


# --------------------------------------------------------------------------------------------
# SQLite


Migration = Sequence[str]
"""The SQL statements that take the schema from one version to the next."""

MIGRATIONS: tuple[Migration, ...] = (
    # 1: the full schema.
    (
        """
        CREATE TABLE memories (
            id INTEGER PRIMARY KEY,
            user_key TEXT NOT NULL,
            key TEXT NOT NULL,
            norm_key TEXT NOT NULL,
            value TEXT NOT NULL,
            text TEXT NOT NULL,
            norm_text TEXT NOT NULL,
            embedding BLOB NOT NULL,
            dim INTEGER NOT NULL CHECK (dim > 0 AND length(embedding) = 4 * dim),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            UNIQUE (user_key, norm_text),
            UNIQUE (user_key, norm_key)
        )
        """,
        """
        CREATE TABLE summaries (
            conversation_key TEXT PRIMARY KEY,
            user_key TEXT NOT NULL,
            text TEXT NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX summaries_by_user ON summaries (user_key)",
        """
        CREATE TABLE expressions (
            user_key TEXT PRIMARY KEY,
            eyes REAL NOT NULL,
            mouth REAL NOT NULL,
            pose REAL NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        """
        CREATE TABLE turns (
            id INTEGER PRIMARY KEY,
            created_at REAL NOT NULL,
            platform TEXT NOT NULL,
            user_key TEXT NOT NULL,
            conversation_key TEXT NOT NULL,
            prompt TEXT NOT NULL,
            final_input TEXT NOT NULL,
            answer TEXT NOT NULL,
            expression TEXT,
            used_memory TEXT,
            timings TEXT NOT NULL,
            total_s REAL NOT NULL,
            status TEXT NOT NULL
        )
        """,
        "CREATE INDEX turns_by_user ON turns (user_key, id)",
        """
        CREATE TABLE settings (
            scope TEXT NOT NULL,
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (scope, key)
        ) WITHOUT ROWID
        """,
    ),
)
"""Append a step to change the schema; never edit a step that has shipped."""

SCHEMA_VERSION = len(MIGRATIONS)


@asynccontextmanager
async def _transaction(conn: aiosqlite.Connection) -> AsyncIterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front: a busy file waits instead of failing late."""
    await conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:  # SQLite ends the transaction itself after some errors
            await conn.execute("ROLLBACK")
        raise
    await conn.execute("COMMIT")


async def schema_version(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def migrate(conn: aiosqlite.Connection, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the file to the latest version in one transaction and return that version.

    An empty file is version 0. A failing step leaves the file exactly as it was, and a file from
    a newer program is refused before anything is written.
    """
    async with _transaction(conn):
        found = await schema_version(conn)
        if found > len(migrations):
            raise SchemaTooNew(
                f"the database is at schema version {found}, this program knows up to "
                f"{len(migrations)}: upgrade ohlora-bot or point OHLORA_DB_PATH at another file"
            )
        for version in range(found + 1, len(migrations) + 1):
            logger.info("migrating the database to schema version %d", version)
            for statement in migrations[version - 1]:
                await conn.execute(statement)
            await conn.execute(f"PRAGMA user_version = {version}")
    return len(migrations)


class SqliteStore(_TypedSettings):
    """The service's store: one aiosqlite connection, one write at a time.

    aiosqlite runs each connection on its own thread, so the database never blocks the event loop.
    A transaction spans several awaits, and another task's statement on the same connection
    would land inside it; an asyncio lock therefore serialises every use of the connection.
    Other processes on the same file are kept in order by SQLite's own locking and busy timeout.
    """

    def __init__(self, conn: aiosqlite.Connection) -> None:
        """Wrap an open, migrated connection; use `SqliteStore.open`."""
        self._conn = conn
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, *, busy_timeout_s: float = 5.0) -> SqliteStore:
        """Open (creating folders and file as needed) and migrate the database at `path`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(path, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")
            await migrate(conn)
            rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
            if rows[0][0] != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (journal mode {rows[0][0]!r})")
            await conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()

    async def __aenter__(self) -> SqliteStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _fetch(self, sql: str, parameters: Sequence[object] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, parameters))

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, _transaction(self._conn):
            yield self._conn

    # memories and summaries

    async def memories(self, user_key: str) -> list[StoredMemory]:
        rows = await self._fetch(
            "SELECT key, value, text, embedding, dim, created_at, updated_at"
            " FROM memories WHERE user_key = ? ORDER BY id",
            (user_key,),
        )
        return [
            StoredMemory(
                key=row["key"],
                value=row["value"],
                text=row["text"],
                embedding=_decode_embedding(row["embedding"], row["dim"]),
                created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
            for row in rows
        ]

    async def summary(self, conversation_key: str) -> str:
        rows = await self._fetch("SELECT text FROM summaries WHERE conversation_key = ?", (conversation_key,))
        return rows[0]["text"] if rows else ""

    async def last_scores(self, user_key: str) -> ExpressionScores | None:
        rows = await self._fetch("SELECT eyes, mouth, pose FROM expressions WHERE user_key = ?", (user_key,))
        if not rows:
            return None
        return ExpressionScores(eyes=rows[0]["eyes"], mouth=rows[0]["mouth"], pose=rows[0]["pose"])

    async def commit_turn(self, turn: TurnRecord, new_memory: NewMemory | None) -> None:
        async with self._write() as conn:
            if new_memory is not None:
                await self._upsert_memory(conn, turn.user_key, new_memory, turn.created_at)
            if turn.summary is not None:
                await self._set_summary(conn, turn)
            if turn.scores is not None:
                await conn.execute(
                    "INSERT INTO expressions (user_key, eyes, mouth, pose, updated_at)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_key) DO UPDATE SET"
                    " eyes = excluded.eyes, mouth = excluded.mouth, pose = excluded.pose,"
                    " updated_at = excluded.updated_at",
                    (
                        turn.user_key,
                        turn.scores.eyes,
                        turn.scores.mouth,
                        turn.scores.pose,
                        turn.created_at,
                    ),
                )
            await self._log_turn(conn, turn)

    @staticmethod
    async def _upsert_memory(conn: aiosqlite.Connection, user_key: str, memory: NewMemory, now: float) -> None:
        """Same text (ignoring whitespace): nothing to do; same key: new value; else a new row.

        Checking the text first also keeps the unique text index satisfied when a key's row takes
        a new text: no other row of the user can hold that text.
        """
        norm_text = normalize(memory.text)
        duplicate = list(
            await conn.execute_fetchall(
                "SELECT 1 FROM memories WHERE user_key = ? AND norm_text = ?",
                (user_key, norm_text),
            )
        )
        if duplicate:
            return
        blob = _encode_embedding(memory.embedding)
        row = {
            "user_key": user_key,
            "key": memory.key,
            "norm_key": normalize(memory.key),
            "value": memory.value,
            "text": memory.text,
            "norm_text": norm_text,
            "embedding": blob,
            "dim": len(blob) // _EMBEDDING_DTYPE.itemsize,
            "now": now,
        }
        cursor = await conn.execute(
            "UPDATE memories SET key = :key, value = :value, text = :text, norm_text = :norm_text,"
            " embedding = :embedding, dim = :dim, updated_at = :now"
            " WHERE user_key = :user_key AND norm_key = :norm_key",
            row,
        )
        if cursor.rowcount == 0:
            await conn.execute(
                "INSERT INTO memories (user_key, key, norm_key, value, text, norm_text, embedding,"
                " dim, created_at, updated_at) VALUES (:user_key, :key, :norm_key, :value, :text,"
                " :norm_text, :embedding, :dim, :now, :now)",
                row,
            )

    @staticmethod
    async def _set_summary(conn: aiosqlite.Connection, turn: TurnRecord) -> None:
        """An empty summary is stored as no row: "none yet" and "reset" are the same state."""
        if not turn.summary:
            await conn.execute("DELETE FROM summaries WHERE conversation_key = ?", (turn.conversation_key,))
            return
        await conn.execute(
            "INSERT INTO summaries (conversation_key, user_key, text, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (conversation_key) DO UPDATE SET"
            " text = excluded.text, updated_at = excluded.updated_at",
            (turn.conversation_key, turn.user_key, turn.summary, turn.created_at),
        )

    @staticmethod
    async def _log_turn(conn: aiosqlite.Connection, turn: TurnRecord) -> None:
        await conn.execute(
            "INSERT INTO turns (created_at, platform, user_key, conversation_key, prompt,"
            " final_input, answer, expression, used_memory, timings, total_s, status)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                turn.created_at,
                turn.platform,
                turn.user_key,
                turn.conversation_key,
                turn.prompt,
                turn.final_input,
                turn.answer,
                _encode_expression(turn.expression),
                turn.used_memory,
                json.dumps(dict(turn.timings)),
                turn.total_s,
                turn.status,
            ),
        )

    async def delete_memories(self, user_key: str, key: str | None = None) -> int:
        async with self._write() as conn:
            if key is None:
                cursor = await conn.execute("DELETE FROM memories WHERE user_key = ?", (user_key,))
            else:
                cursor = await conn.execute(
                    "DELETE FROM memories WHERE user_key = ? AND norm_key = ?",
                    (user_key, normalize(key)),
                )
            return cursor.rowcount

    async def clear_summaries(self, user_key: str, conversation_key: str | None = None) -> int:
        async with self._write() as conn:
            if conversation_key is None:
                cursor = await conn.execute("DELETE FROM summaries WHERE user_key = ?", (user_key,))
            else:
                cursor = await conn.execute(
                    "DELETE FROM summaries WHERE user_key = ? AND conversation_key = ?",
                    (user_key, conversation_key),
                )
            return cursor.rowcount

    async def forget_user(self, user_key: str) -> None:
        async with self._write() as conn:
            for table in ("memories", "summaries", "expressions", "turns"):
                await conn.execute(f"DELETE FROM {table} WHERE user_key = ?", (user_key,))

    # settings

    async def get_setting(self, scope: str, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM settings WHERE scope = ? AND key = ?", (scope, key))
        return rows[0]["value"] if rows else None

    async def set_setting(self, scope: str, key: str, value: str) -> None:
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO settings (scope, key, value) VALUES (?, ?, ?)"
                " ON CONFLICT (scope, key) DO UPDATE SET value = excluded.value",
                (scope, key, value),
            )

    async def delete_setting(self, scope: str, key: str) -> None:
        async with self._write() as conn:
            await conn.execute("DELETE FROM settings WHERE scope = ? AND key = ?", (scope, key))

    async def settings(self, scope: str) -> dict[str, str]:
        rows = await self._fetch("SELECT key, value FROM settings WHERE scope = ? ORDER BY key", (scope,))
        return {row["key"]: row["value"] for row in rows}

    # admin views

    async def stats(self, window: int = 1000) -> StoreStats:
        counts = await self._fetch(
            "SELECT (SELECT count(*) FROM turns) AS turns,"
            " (SELECT count(DISTINCT user_key) FROM turns) AS users,"
            " (SELECT count(*) FROM memories) AS memories"
        )
        latencies = await self._fetch(
            "SELECT total_s FROM (SELECT id, total_s FROM turns ORDER BY id DESC LIMIT ?) ORDER BY id",
            (max(window, 0),),
        )
        return StoreStats(
            turns_total=counts[0]["turns"],
            users_total=counts[0]["users"],
            memories_total=counts[0]["memories"],
            recent_latencies_s=tuple(row["total_s"] for row in latencies),
        )

    async def recent_turns(self, user_key: str | None, limit: int) -> list[TurnRow]:
        # A negative LIMIT means "no limit" to SQLite.
        if user_key is None:
            rows = await self._fetch("SELECT * FROM turns ORDER BY id DESC LIMIT ?", (max(limit, 0),))
        else:
            rows = await self._fetch(
                "SELECT * FROM turns WHERE user_key = ? ORDER BY id DESC LIMIT ?",
                (user_key, max(limit, 0)),
            )
        return [
            TurnRow(
                id=row["id"],
                created_at=row["created_at"],
                platform=row["platform"],
                user_key=row["user_key"],
                conversation_key=row["conversation_key"],
                prompt=row["prompt"],
                final_input=row["final_input"],
                answer=row["answer"],
                status=row["status"],
                used_memory=row["used_memory"],
                expression=_decode_expression(row["expression"]),
                timings=json.loads(row["timings"]),
                total_s=row["total_s"],
            )
            for row in rows
        ]


# --------------------------------------------------------------------------------------------
# In memory


@dataclass(frozen=True)
class _Summary:
    user_key: str
    text: str


class InMemoryStore(_TypedSettings):
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

    async def forget_user(self, user_key: str) -> None:
        self._memories.pop(user_key, None)
        await self.clear_summaries(user_key)
        self._scores.pop(user_key, None)
        self._turns = [row for row in self._turns if row.user_key != user_key]

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
