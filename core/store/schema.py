"""The SQLite schema as a list of migrations, applied in one transaction by `PRAGMA user_version`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import aiosqlite

from core.store.values import SchemaTooNew

logger = logging.getLogger(__name__)


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
    # 2: the inbox of platform events, kept from arrival until their answer is delivered.
    (
        """
        CREATE TABLE inbox (
            platform TEXT NOT NULL,
            event_id TEXT NOT NULL,
            user_key TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('received', 'answered', 'done')),
            received_at REAL NOT NULL,
            payload TEXT,
            reply_text TEXT,
            reply_kind TEXT,
            image BLOB,
            image_mime TEXT,
            image_face INTEGER,
            PRIMARY KEY (platform, event_id)
        )
        """,
        "CREATE INDEX inbox_by_state ON inbox (platform, state, received_at)",
        "CREATE INDEX inbox_by_user ON inbox (user_key)",
    ),
)
"""Append a step to change the schema; never edit a step that has shipped."""

SCHEMA_VERSION = len(MIGRATIONS)


@asynccontextmanager
async def transaction(conn: aiosqlite.Connection) -> AsyncIterator[None]:
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
    async with transaction(conn):
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
