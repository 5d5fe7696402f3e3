"""Long polling that confirms an update to Telegram only once it is safe in the inbox.

Telegram forgets an update for good when a later offset is polled, and python-telegram-bot's own
updater polls again the moment it has fetched a batch: an update it fetched but had not answered
was lost to a crash or a shutdown. This poller fetches a batch, writes every update it will answer
into the inbox in one transaction, and only then moves the offset past them. So:

- an update is either unconfirmed (Telegram sends it again) or in the inbox (a restart finishes it);
- a duplicate (the same update_id again, in one batch or after a restart) is dropped by the inbox;
- an update the library cannot parse is logged once, skipped and confirmed: one bad update never
  stops the others or fills the log;
- a failing `getUpdates` (or a failing inbox write) backs off, doubling up to a minute, and only the
  first failure of a run is a warning;
- at most `max_in_flight` updates are handled at once; beyond that the poller stops fetching and
  Telegram keeps the rest, so a backlog after downtime cannot grow the process without bound.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from telegram import Bot, Update
from telegram.error import Conflict, InvalidToken, RetryAfter, TelegramError
from telegram.warnings import PTBUserWarning

from bot.inbox import Arrival, Inbox
from bot.telegram_delivery import seconds_to_wait

logger = logging.getLogger(__name__)

BATCH_LIMIT = 100
"""Telegram's largest getUpdates batch."""
MAX_BACKOFF_S = 60.0

Handle = Callable[[Update], Coroutine[Any, Any, None]]
Screen = Callable[[Update], str | None]
"""The user key an update is answered for, or None for one that gets no answer (not kept)."""


@dataclass(frozen=True)
class PollingOptions:
    timeout_s: float = 10.0
    """How long one getUpdates waits for news."""
    allowed_updates: Sequence[str] = (Update.MESSAGE, Update.CALLBACK_QUERY)
    """What the handlers answer; Telegram keeps other kinds (edits, reactions) to itself."""
    max_in_flight: int = 256
    first_backoff_s: float = 1.0


def parse_update(raw: object, bot: Bot) -> Update | None:
    """The update, or None (logged once) for one python-telegram-bot cannot make sense of."""
    update_id = raw.get("update_id") if isinstance(raw, dict) else None
    try:
        if not isinstance(raw, dict):
            raise TypeError(f"an update must be an object, got {type(raw).__name__}")
        update = Update.de_json(raw, bot)
        # Parsing is lazy in places: touching what the handlers read makes a broken update fail here.
        _ = update.effective_chat, update.effective_user, update.effective_message
    except Exception as error:
        logger.warning(
            "Telegram: skipping update %s that cannot be read (%s: %s)", update_id, type(error).__name__, error
        )
        return None
    return update


class UpdatePoller:
    def __init__(
        self,
        bot: Bot,
        inbox: Inbox,
        *,
        screen: Screen,
        handle: Handle,
        options: PollingOptions = PollingOptions(),
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._bot = bot
        self._inbox = inbox
        self._screen = screen
        self._handle = handle
        self._options = options
        self._sleep = sleep
        self._offset: int | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._room = asyncio.Event()
        self._room.set()
        # The raw result is what lets one unreadable update be skipped instead of failing the batch;
        # `do_api_request` warns that `get_updates` exists, which parses the whole batch at once.
        warnings.filterwarnings("ignore", message=r"Please use 'Bot\.getUpdates'", category=PTBUserWarning)

    @property
    def in_flight(self) -> set[asyncio.Task[None]]:
        return self._in_flight

    def dispatch(self, update: Update) -> None:
        """Handle one update in its own task; the poller pauses while too many are running."""
        task = asyncio.create_task(self._handle(update), name=f"telegram-update-{update.update_id}")
        self._in_flight.add(task)
        if len(self._in_flight) >= self._options.max_in_flight:
            self._room.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._in_flight.discard(task)
        if len(self._in_flight) < self._options.max_in_flight:
            self._room.set()
        if not task.cancelled() and task.exception() is not None:
            logger.error("Telegram: handling an update failed", exc_info=task.exception())

    async def run(self) -> None:
        """Poll until cancelled."""
        failures = 0
        while True:
            await self._room.wait()
            try:
                batch = await self._fetch()
                fresh = await self._keep(batch)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                failures += 1
                await self._back_off(error, failures)
                continue
            if failures:
                logger.info("Telegram: polling works again after %d failed attempt(s)", failures)
            failures = 0
            for update in fresh:
                self.dispatch(update)

    async def _fetch(self) -> list[Any]:
        options = self._options
        result = await self._bot.do_api_request(
            "getUpdates",
            api_kwargs={
                "offset": self._offset,
                "limit": BATCH_LIMIT,
                "timeout": int(options.timeout_s),
                "allowed_updates": list(options.allowed_updates),
            },
            read_timeout=options.timeout_s + 10.0,
        )
        if not isinstance(result, list):
            raise TelegramError(f"getUpdates answered {type(result).__name__}, not a list")
        return result

    async def _keep(self, batch: list[Any]) -> list[Update]:
        """Write what will be answered into the inbox, then move the offset past the whole batch."""
        ids = [raw["update_id"] for raw in batch if isinstance(raw, dict) and isinstance(raw.get("update_id"), int)]
        answered: list[tuple[Update, Arrival]] = []
        for raw in batch:
            update = parse_update(raw, self._bot)
            user_key = None if update is None else self._screen(update)
            if update is not None and user_key is not None:
                answered.append((update, Arrival(str(update.update_id), user_key, raw)))
        fresh = await self._inbox.receive([arrival for _, arrival in answered]) if answered else []
        if ids:
            self._offset = max(ids) + 1
        return [update for (update, _), is_new in zip(answered, fresh, strict=True) if is_new]

    async def _back_off(self, error: Exception, failures: int) -> None:
        """Wait before the next poll: as long as Telegram asks, or doubling; warn once per run of failures."""
        if isinstance(error, RetryAfter):
            delay = seconds_to_wait(error)
        else:
            delay = min(self._options.first_backoff_s * 2 ** (failures - 1), MAX_BACKOFF_S)
        if failures == 1:
            hint = ""
            if isinstance(error, Conflict):
                hint = " (is another `ohlora bot` polling with the same token?)"
            elif isinstance(error, InvalidToken):
                hint = " (was the token revoked in @BotFather?)"
            logger.warning("Telegram: polling failed, retrying in %.1f s%s: %s", delay, hint, error)
        else:
            logger.debug("Telegram: polling failed %d times in a row: %s", failures, error)
        await self._sleep(delay)
