"""Per-user persistence: memories, running summaries, last expressions, the turn log, settings.

One `Store` protocol (`protocol.py`) with two implementations: `SqliteStore` (`sqlite.py`) for the
service and `InMemoryStore` (`in_memory.py`) for fast tests. What crosses the boundary and the
rules both apply (whitespace-insensitive comparison, the turn's total time, the settings' names)
are in `values.py`; the schema and its migrations in `schema.py`.
"""

from core.store.in_memory import InMemoryStore
from core.store.protocol import Store
from core.store.schema import MIGRATIONS, SCHEMA_VERSION, Migration, migrate, schema_version
from core.store.sqlite import SqliteStore
from core.store.values import (
    EventState,
    Footprint,
    InboxEvent,
    NewMemory,
    PendingEvent,
    SchemaTooNew,
    StoredMemory,
    StoreError,
    StoreStats,
    StoreUnavailable,
    TurnRecord,
    TurnRow,
    UserData,
    allowed_channels_scope,
    chat_scope,
    normalize,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "EventState",
    "Footprint",
    "InMemoryStore",
    "InboxEvent",
    "Migration",
    "NewMemory",
    "PendingEvent",
    "SchemaTooNew",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoreStats",
    "StoreUnavailable",
    "StoredMemory",
    "TurnRecord",
    "TurnRow",
    "UserData",
    "allowed_channels_scope",
    "chat_scope",
    "migrate",
    "normalize",
    "schema_version",
]
