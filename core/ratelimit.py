"""A per-user sliding-window rate limit, so one user cannot monopolise the model."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        """`per_minute` = 0 turns the limit off."""
        self._per_minute = per_minute
        self._clock = clock
        self._hits: dict[str, deque[float]] = {}
        self._recent_size = 64

    def __len__(self) -> int:
        """Users currently tracked."""
        return len(self._hits)

    def allow(self, key: str) -> bool:
        if self._per_minute <= 0:
            return True
        now = self._clock()
        hits = self._hits.setdefault(key, deque())
        while hits and now - hits[0] >= 60.0:
            hits.popleft()
        if len(hits) >= self._per_minute:
            return False
        hits.append(now)
        self._forget_quiet_users(now)
        return True

    def _forget_quiet_users(self, now: float) -> None:
        """Keep the table to users heard from within the window, however many come and go."""
        if len(self._hits) > 2 * self._recent_size:
            self._hits = {key: hits for key, hits in self._hits.items() if now - hits[-1] < 60.0}
            self._recent_size = max(64, len(self._hits))
