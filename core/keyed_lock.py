"""First-come, first-served locks per key (a user), that vanish when nobody holds or awaits them.

An uncontended `asyncio.Lock` is taken without yielding and its waiters are served in arrival
order, so coroutines that enter `hold(key)` before their first await keep the order they were
started in. That is what keeps a user's turns in order, however many users there are.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class KeyedLocks:
    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def __len__(self) -> int:
        """Keys with a holder or a waiter; the rest are forgotten, so this stays bounded."""
        return len(self._locks)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(key, asyncio.Lock())
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._users[key] -= 1
            if not self._users[key]:
                del self._users[key], self._locks[key]
