"""Faults only the operators can fix (a full disk, a locked database), sent to the admins directly.

A log line alone is read too late: the admins listed in `OHLORA_ADMIN_IDS` get a private message
on every platform that can reach them. One fault tends to repeat on every turn, so an alarm goes
out at most once per `every_s`; the log keeps every occurrence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

Notify = Callable[[str], Awaitable[None]]
"""Sends one text to the admins a platform can reach."""


class AdminAlerts:
    def __init__(self, *, every_s: float = 600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._channels: list[Notify] = []
        self._last_sent: float | None = None

    def add_channel(self, notify: Notify) -> None:
        self._channels.append(notify)

    async def raise_alarm(self, text: str) -> None:
        """Tell the admins, unless they were told within `every_s`; an alarm nobody received
        does not count as told."""
        logger.error("alarm for the admins: %s", text)
        now = self._clock()
        if self._last_sent is not None and now - self._last_sent < self._every_s:
            return
        reached = False
        for notify in self._channels:
            try:
                await notify(text)
            except Exception:
                logger.exception("could not tell the admins")
            else:
                reached = True
        if reached:
            self._last_sent = now
