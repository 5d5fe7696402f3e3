"""How long the turn log keeps what users said: `OHLORA_TURN_LOG_DAYS` and a row cap.

Memories and summaries are what Oh-LoRA needs to talk with someone and stay until the user
forgets them; the turn log is for admins and debugging, and it would otherwise grow with every
turn forever. Pruning runs beside the turns, in small transactions, so it never holds one up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from core.config import Settings
from core.store import Store

logger = logging.getLogger(__name__)

DAY_S = 24 * 3600.0


@dataclass(frozen=True)
class Retention:
    days: float = 30.0
    """Turns older than this are deleted; 0 keeps them whatever their age (the row cap still holds)."""
    max_rows: int = 100_000
    """At most this many turns are kept, the newest."""
    every_s: float = 3600.0
    """How often a running service prunes."""

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        return cls(days=settings.turn_log_days, max_rows=settings.turn_log_max_rows)


async def prune_once(store: Store, retention: Retention, now: float) -> int:
    cutoff = now - retention.days * DAY_S if retention.days > 0 else float("-inf")
    pruned = await store.prune_turns(cutoff, retention.max_rows)
    if pruned:
        logger.info("turn log: pruned %d turn(s) past the retention limits", pruned)
    return pruned


async def keep_pruning(
    store: Store,
    retention: Retention,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Prune now and every `every_s` until cancelled; a failure is logged and tried again later."""
    while True:
        try:
            await prune_once(store, retention, clock())
        except Exception:
            logger.exception("turn log: pruning failed; trying again in %.0f s", retention.every_s)
        await sleep(retention.every_s)
