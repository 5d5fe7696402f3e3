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
    EventState,
    Footprint,
    InboxEvent,
    NewMemory,
    PendingEvent,
    StoredMemory,
    StoreError,
    StoreStats,
    StoreUnavailable,
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
from core.types import Expression, ExpressionScores, RenderedFace, Reply, ReplyKind

_EMBEDDING_DTYPE = np.dtype("<f4")
"""Little-endian float32 on disk, so a database file moves between machines unchanged."""


_PRUNE_BATCH = 500
"""Turns deleted per transaction when the log is pruned: each batch holds the write lock briefly."""

_FINISHED = (
    "state = 'done', payload = NULL, reply_text = NULL, reply_kind = NULL,"
    " image = NULL, image_mime = NULL, image_face = NULL"
)
"""What finishing an event sets: only its id stays, so nothing the user wrote outlives the delivery."""


async def _footprint(conn: aiosqlite.Connection, user_key: str) -> Footprint:
    rows = list(
        await conn.execute_fetchall(
            "SELECT (SELECT count(*) FROM memories WHERE user_key = :key) AS memories,"
            " (SELECT count(*) FROM summaries WHERE user_key = :key) AS summaries,"
            " (SELECT count(*) FROM turns WHERE user_key = :key) AS turns,"
            " (SELECT count(*) FROM expressions WHERE user_key = :key) AS expressions",
            {"key": user_key},
        )
    )
    row = rows[0]
    return Footprint(
        memories=row["memories"], summaries=row["summaries"], turns=row["turns"], expression=bool(row["expressions"])
    )


async def _answer_event(conn: aiosqlite.Connection, platform: str, event_id: str, reply: Reply) -> None:
    image = reply.image
    await conn.execute(
        "UPDATE inbox SET state = ?, reply_text = ?, reply_kind = ?, image = ?, image_mime = ?, image_face = ?"
        " WHERE platform = ? AND event_id = ? AND state != ?",
        (
            EventState.ANSWERED.value,
            reply.text,
            reply.kind.value,
            None if image is None else image.data,
            None if image is None else image.mime_type,
            None if image is None else image.face,
            platform,
            event_id,
            EventState.DONE.value,
        ),
    )


def _decode_reply(row: sqlite3.Row) -> Reply:
    image = None
    if row["image"] is not None:
        image = RenderedFace(data=bytes(row["image"]), mime_type=row["image_mime"], face=row["image_face"])
    return Reply(text=row["reply_text"], kind=ReplyKind(row["reply_kind"]), image=image)


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
        """Open (creating folders and file as needed) and migrate the database at `path`.

        A path that cannot hold a database (read-only, a folder, no space) is a `StoreUnavailable`
        that names the path and the fix, rather than a traceback from deep inside SQLite.
        """
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Tried plainly first: aiosqlite's failed connect leaves its thread to report to a closed loop.
            await asyncio.to_thread(lambda: sqlite3.connect(path).close())
            conn = await aiosqlite.connect(path, isolation_level=None)
        except (OSError, sqlite3.Error) as error:
            raise StoreUnavailable.at(path, error) from error
        try:
            conn.row_factory = sqlite3.Row
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")
            # Deleted text is overwritten with zeros, not left in free pages for anyone to read.
            await conn.execute("PRAGMA secure_delete = ON")
            await migrate(conn)
            rows = list(await conn.execute_fetchall("PRAGMA journal_mode = WAL"))
            if rows[0][0] != "wal":
                raise StoreError(f"{path}: SQLite refused WAL mode (journal mode {rows[0][0]!r})")
            await conn.execute("PRAGMA synchronous = NORMAL")
        except BaseException as error:
            await conn.close()
            if isinstance(error, (OSError, sqlite3.Error)):
                raise StoreUnavailable.at(path, error) from error
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
            if turn.event_id is not None and turn.reply is not None:
                await _answer_event(conn, turn.platform, turn.event_id, turn.reply)

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

    async def forget_user(self, user_key: str) -> Footprint:
        async with self._write() as conn:
            gone = await _footprint(conn, user_key)
            for table in ("memories", "summaries", "expressions"):
                await conn.execute(f"DELETE FROM {table} WHERE user_key = ?", (user_key,))
            pseudonym = forgotten_pseudonym()
            await conn.execute(
                "UPDATE turns SET user_key = ?, conversation_key = ?, prompt = '', final_input = '', answer = '',"
                " expression = NULL, used_memory = NULL WHERE user_key = ?",
                (pseudonym, pseudonym, user_key),
            )
            await conn.execute(f"UPDATE inbox SET {_FINISHED} WHERE user_key = ?", (user_key,))
        await self._scrub_log()
        return gone

    async def _scrub_log(self) -> None:
        """Copy the write-ahead log into the file and empty it: with `secure_delete`, no page of
        it keeps deleted text."""
        async with self._lock:
            await self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def footprint(self, user_key: str) -> Footprint:
        async with self._lock:
            return await _footprint(self._conn, user_key)

    async def user_data(self, user_key: str) -> UserData:
        summaries = await self._fetch(
            "SELECT conversation_key, text FROM summaries WHERE user_key = ? ORDER BY conversation_key", (user_key,)
        )
        turns = await self._fetch("SELECT * FROM turns WHERE user_key = ? ORDER BY id", (user_key,))
        settings = await self._fetch(
            "SELECT scope, key, value FROM settings WHERE scope = ? OR key = ? ORDER BY scope, key",
            (user_key, user_key),
        )
        pending = await self._fetch(
            "SELECT payload FROM inbox WHERE user_key = ? AND payload IS NOT NULL ORDER BY received_at", (user_key,)
        )
        named: dict[str, dict[str, str]] = {}
        for row in settings:
            named.setdefault(row["scope"], {})[row["key"]] = row["value"]
        return UserData(
            user_key=user_key,
            memories=tuple(await self.memories(user_key)),
            summaries={row["conversation_key"]: row["text"] for row in summaries},
            last_scores=await self.last_scores(user_key),
            turns=tuple(_turn_row(row) for row in turns),
            settings=named,
            pending_messages=tuple(row["payload"] for row in pending),
        )

    async def prune_turns(self, created_before: float, keep_latest: int) -> int:
        pruned = 0
        while True:
            async with self._write() as conn:
                cursor = await conn.execute(
                    "DELETE FROM turns WHERE id IN (SELECT id FROM turns WHERE created_at < ?"
                    " OR id < (SELECT min(id) FROM (SELECT id FROM turns ORDER BY id DESC LIMIT ?))"
                    " ORDER BY id LIMIT ?)",
                    (created_before, max(keep_latest, 1), _PRUNE_BATCH),
                )
            pruned += cursor.rowcount
            if cursor.rowcount < _PRUNE_BATCH:
                break
        if pruned:
            await self._scrub_log()  # pruned text must not stay readable in the file until a later checkpoint
        return pruned

    async def move_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        old_prefix, new_prefix = conversation_prefix(platform, old_chat_id), conversation_prefix(platform, new_chat_id)
        async with self._write() as conn:
            await conn.execute(
                "UPDATE OR REPLACE summaries SET conversation_key = ? || substr(conversation_key, ?)"
                " WHERE substr(conversation_key, 1, ?) = ?",
                (new_prefix, len(old_prefix) + 1, len(old_prefix), old_prefix),
            )
            await conn.execute(
                "UPDATE OR REPLACE settings SET scope = ? WHERE scope = ?",
                (chat_scope(platform, new_chat_id), chat_scope(platform, old_chat_id)),
            )
            await conn.execute(
                "UPDATE OR REPLACE settings SET key = ? WHERE scope = ? AND key = ?",
                (new_chat_id, allowed_channels_scope(platform), old_chat_id),
            )

    # the inbox

    async def receive_events(self, events: Sequence[InboxEvent]) -> list[bool]:
        fresh = []
        async with self._write() as conn:
            for event in events:
                cursor = await conn.execute(
                    "INSERT OR IGNORE INTO inbox (platform, event_id, user_key, state, received_at, payload)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        event.platform,
                        event.event_id,
                        event.user_key,
                        EventState.RECEIVED.value,
                        event.received_at,
                        event.payload,
                    ),
                )
                fresh.append(cursor.rowcount == 1)
        return fresh

    async def answer_event(self, platform: str, event_id: str, reply: Reply) -> None:
        async with self._write() as conn:
            await _answer_event(conn, platform, event_id, reply)

    async def finish_events(self, platform: str, event_ids: Sequence[str]) -> None:
        async with self._write() as conn:
            await conn.executemany(
                f"UPDATE inbox SET {_FINISHED} WHERE platform = ? AND event_id = ?",
                [(platform, event_id) for event_id in event_ids],
            )

    async def pending_events(self, platform: str) -> list[PendingEvent]:
        rows = await self._fetch(
            "SELECT * FROM inbox WHERE platform = ? AND state != ? ORDER BY received_at, rowid",
            (platform, EventState.DONE.value),
        )
        return [
            PendingEvent(
                event=InboxEvent(
                    platform=row["platform"],
                    event_id=row["event_id"],
                    user_key=row["user_key"],
                    payload=row["payload"],
                    received_at=row["received_at"],
                ),
                reply=_decode_reply(row) if row["state"] == EventState.ANSWERED.value else None,
            )
            for row in rows
        ]

    async def prune_events(self, platform: str, received_before: float) -> int:
        async with self._write() as conn:
            cursor = await conn.execute(
                "DELETE FROM inbox WHERE platform = ? AND state = ? AND received_at < ?",
                (platform, EventState.DONE.value, received_before),
            )
            return cursor.rowcount

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
        return [_turn_row(row) for row in rows]


def _turn_row(row: sqlite3.Row) -> TurnRow:
    return TurnRow(
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
