"""The service's store: SQLite through aiosqlite, in WAL mode, migrated on open.

Everything one turn changes is written by `commit_turn` in ONE transaction, so a crash or an
error never leaves a memory without its turn, or a summary from a turn that was not logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sqlite3
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from types import TracebackType

import aiosqlite
import numpy as np

from core.store.schema import migrate, transaction
from core.store.typed_settings import TypedSettings
from core.store.values import (
    NewMemory,
    StoredMemory,
    StoreError,
    StoreStats,
    TurnRecord,
    TurnRow,
    as_embedding,
    normalize,
)
from core.types import Expression, ExpressionScores

_EMBEDDING_DTYPE = np.dtype("<f4")
"""Little-endian float32 on disk, so a database file moves between machines unchanged."""


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


class SqliteStore(TypedSettings):
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
        async with self._lock, transaction(self._conn):
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
