"""The Telegram adapter run as in production, against the fake Bot API, over fake models.

`BotStarter.start` builds the real adapter (python-telegram-bot's client, our poller, delivery and
inbox) over `tests.fakes`' engine; `RunningBot` sends what users would and waits until the bot has
finished with it, which a handler group after the adapter's own records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr
from telegram import Update
from telegram.ext import TypeHandler

from bot.commands import Commands
from bot.inbox import Inbox, InboxPolicy
from bot.telegram_bot import TelegramAdapter
from core.config import Settings
from tests.fake_telegram_api import ApiCall, FakeBotApi, Json
from tests.fakes import Harness, make_harness

ADMIN_IDS = frozenset({"telegram:777"})


def settings_for(api: FakeBotApi, token: str | None = None) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        telegram_token=SecretStr(token or api.token),
        telegram_api_base_url=api.base_url,
        discord_token=None,
        admin_ids=ADMIN_IDS,
    )


@dataclass
class RunningBot:
    api: FakeBotApi
    adapter: TelegramAdapter
    harness: Harness
    handled: set[int] = field(default_factory=set)

    async def handled_update(self, update_id: int) -> None:
        await self.api.wait_until(lambda _: update_id in self.handled, f"update {update_id} handled")

    async def say(self, from_user: Json, text: str, **kwargs: Any) -> Json:
        """Send a message and wait until the bot has finished with it."""
        update_id, message = self.api.send_message(from_user, text, **kwargs)
        await self.handled_update(update_id)
        return message

    async def ignored(self, from_user: Json, text: str, **kwargs: Any) -> Json:
        """Send a message she does not answer and wait until Telegram counts it as received."""
        update_id, message = self.api.send_message(from_user, text, **kwargs)
        await self.api.wait_until(lambda api: api.is_confirmed(update_id), f"update {update_id} confirmed")
        return message

    async def press(self, from_user: Json, call: ApiCall, label: str) -> None:
        buttons = call.json("reply_markup")["inline_keyboard"][0]
        data = next(button["callback_data"] for button in buttons if button["text"] == label)
        await self.handled_update(self.api.press_button(from_user, call.result, data))

    def texts(self, chat_id: int) -> list[str | None]:
        return [call.text for call in self.api.sent(chat_id)]


class BotStarter:
    """Starts adapters for one test and closes them, and their workers, at its end."""

    def __init__(self, api: FakeBotApi) -> None:
        self.api = api
        self._running: list[RunningBot] = []

    async def start(
        self,
        *,
        harness: Harness | None = None,
        commands_type: type[Commands] = Commands,
        policy: InboxPolicy | None = None,
        **adapter_options: Any,
    ) -> RunningBot:
        harness = harness or make_harness()
        commands = commands_type(harness.engine, harness.store, admin_ids=ADMIN_IDS, model_profile="fake")
        inbox = Inbox(harness.store, "telegram", policy or InboxPolicy())
        adapter = TelegramAdapter(commands, settings_for(self.api), inbox=inbox, **adapter_options)
        bot = RunningBot(self.api, adapter, harness)

        async def mark_handled(update: Update, _: object) -> None:
            bot.handled.add(update.update_id)

        # A later handler group runs after the adapter's handlers have finished with the update.
        adapter.application.add_handler(TypeHandler(Update, mark_handled), group=1)
        self._running.append(bot)
        await adapter.start()
        return bot

    async def close_all(self) -> None:
        for bot in self._running:
            if bot.harness.generator.release is not None:
                bot.harness.generator.release.set()
            await bot.adapter.close()
            await bot.harness.worker.stop()
