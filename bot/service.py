"""`ohlora bot`: every configured platform in one process, one event loop, one engine.

Each adapter starts in the background and the service waits for a stop request: SIGINT or
SIGTERM, or a test's event. Shutdown stops the adapters together, and each gives the turns it
has in flight a few seconds before cancelling them; the engine writes a turn's data in one
shielded transaction, so a cancelled turn leaves the store exactly as it was. Closing the store
and the inference worker stays with the composition root that opened them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Protocol

from bot.alerts import AdminAlerts
from bot.commands import Commands
from bot.inbox import Inbox, InboxPolicy
from core.config import Settings
from core.engine import Engine
from core.retention import Retention, keep_pruning
from core.store import Store

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

SignalHandler = Callable[[int, FrameType | None], Any] | int | None
"""What `signal.getsignal` returns."""


class MissingTokens(Exception):
    """No platform is configured, so there is nothing to run."""

    MESSAGE = (
        "No bot token is set, so there is nothing to run.\n"
        "Set DISCORD_TOKEN and/or TELEGRAM_TOKEN in .env (see .env.example) or in the environment,\n"
        "then start `ohlora bot` again. The README explains how to create each bot and get its token."
    )

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class Adapter(Protocol):
    """A platform connection: `start` returns once it runs in the background."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


async def serve(
    engine: Engine,
    store: Store,
    settings: Settings,
    *,
    alerts: AdminAlerts | None = None,
    stop: asyncio.Event | None = None,
    shutdown_grace_s: float = 5.0,
) -> None:
    """Run every adapter whose token is set until SIGINT, SIGTERM or `stop`, then shut down cleanly.

    `alerts` is the engine's alarm: each adapter adds a way to reach the admins on its platform.
    """
    commands = Commands(engine, store, admin_ids=settings.admin_ids, model_profile=settings.model_profile.value)
    adapters = _adapters(commands, store, settings, alerts or AdminAlerts(), shutdown_grace_s)
    stop = stop or asyncio.Event()
    started: list[Adapter] = []
    pruning = asyncio.create_task(keep_pruning(store, Retention.of(settings)), name="turn-log-retention")
    with _stop_on_signals(stop):
        try:
            for adapter in adapters:
                await adapter.start()
                started.append(adapter)
            logger.info("serving on %s", ", ".join(type(adapter).__name__ for adapter in started))
            await stop.wait()
            logger.info("stopping")
        finally:
            pruning.cancel()
            await _close_all(started)
            await asyncio.gather(pruning, return_exceptions=True)


def _adapters(
    commands: Commands, store: Store, settings: Settings, alerts: AdminAlerts, shutdown_grace_s: float
) -> list[Adapter]:
    """Imported here, so that a deployment with one platform never loads the other's library."""
    adapters: list[Adapter] = []
    policy = InboxPolicy(replay_within_s=settings.replay_within_s)
    if settings.telegram_token is not None:
        from bot.telegram_bot import TelegramAdapter

        adapters.append(
            TelegramAdapter(
                commands,
                settings,
                inbox=Inbox(store, "telegram", policy),
                alerts=alerts,
                shutdown_grace_s=shutdown_grace_s,
            )
        )
    if settings.discord_token is not None:
        from bot.discord_bot import DiscordAdapter

        adapters.append(
            DiscordAdapter(
                commands,
                settings,
                inbox=Inbox(store, "discord", policy),
                alerts=alerts,
                shutdown_grace_s=shutdown_grace_s,
                sync_guild_id=settings.discord_dev_guild_id,
            )
        )
    if not adapters:
        raise MissingTokens()
    return adapters


async def _close_all(adapters: list[Adapter]) -> None:
    """Together, so their grace periods overlap; one failing to close does not keep the other open."""
    results = await asyncio.gather(*(adapter.close() for adapter in adapters), return_exceptions=True)
    for adapter, result in zip(adapters, results, strict=True):
        if isinstance(result, BaseException):
            logger.error("closing %s failed", type(adapter).__name__, exc_info=result)


@contextmanager
def _stop_on_signals(stop: asyncio.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` while the service runs; the old handlers come back after.

    Where the loop cannot watch signals (Windows, a thread other than the main one) the service
    still stops through the event.
    """
    loop = asyncio.get_running_loop()
    previous: dict[signal.Signals, SignalHandler] = {}
    for number in STOP_SIGNALS:
        handler = signal.getsignal(number)
        try:
            loop.add_signal_handler(number, _request_stop, stop, number)
        except (NotImplementedError, RuntimeError, ValueError):
            logger.debug("cannot watch %s here; stop the service through its event", number.name)
        else:
            previous[number] = handler
    try:
        yield
    finally:
        for number, handler in previous.items():
            loop.remove_signal_handler(number)
            # remove_signal_handler installs Python's default; asyncio.run's own SIGINT handler
            # (cancel the main task) is what the rest of the shutdown should run under.
            if handler is not None:
                signal.signal(number, handler)


def _request_stop(stop: asyncio.Event, number: signal.Signals) -> None:
    logger.info("%s received: shutting down", number.name)
    stop.set()
