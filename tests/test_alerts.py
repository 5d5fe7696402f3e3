"""Admin alarms: every channel hears a fault, at most once per `every_s`, and the log keeps every one."""

from __future__ import annotations

import logging

import pytest

from bot.alerts import AdminAlerts


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Channel:
    def __init__(self, fail: Exception | None = None) -> None:
        self.sent: list[str] = []
        self.fail = fail

    async def __call__(self, text: str) -> None:
        self.sent.append(text)
        if self.fail is not None:
            raise self.fail


def alarm_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.getMessage().startswith("alarm for the admins")]


async def test_every_channel_hears_an_alarm() -> None:
    """Admins may be reachable on one platform only: each platform gets the text."""
    alerts = AdminAlerts(clock=Clock())
    telegram, discord = Channel(), Channel()
    alerts.add_channel(telegram)
    alerts.add_channel(discord)

    await alerts.raise_alarm("디스크가 가득 찼어요")

    assert telegram.sent == discord.sent == ["디스크가 가득 찼어요"]


async def test_an_alarm_goes_out_at_most_once_per_every_s_but_is_logged_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full disk fails every turn: one message per window, not one per turn; the log has them all."""
    clock = Clock()
    alerts = AdminAlerts(every_s=600.0, clock=clock)
    channel = Channel()
    alerts.add_channel(channel)

    with caplog.at_level(logging.ERROR, logger="bot.alerts"):
        for now, text in [(0.0, "첫째"), (1.0, "둘째"), (599.0, "셋째"), (600.0, "넷째"), (700.0, "다섯째")]:
            clock.now = now
            await alerts.raise_alarm(text)

    assert channel.sent == ["첫째", "넷째"]
    assert len(alarm_records(caplog)) == 5
    assert "다섯째" in alarm_records(caplog)[-1]


async def test_a_failing_channel_does_not_silence_the_others(caplog: pytest.LogCaptureFixture) -> None:
    """Telegram being down must not keep the alarm from Discord; the failure is logged, not raised."""
    alerts = AdminAlerts(clock=Clock())
    broken, working = Channel(fail=ConnectionError("telegram is down")), Channel()
    alerts.add_channel(broken)
    alerts.add_channel(working)

    with caplog.at_level(logging.ERROR, logger="bot.alerts"):
        await alerts.raise_alarm("데이터베이스가 잠겼어요")

    assert broken.sent == working.sent == ["데이터베이스가 잠겼어요"]
    failures = [record for record in caplog.records if record.getMessage() == "could not tell the admins"]
    assert len(failures) == 1 and failures[0].exc_info is not None


async def test_an_alarm_without_channels_is_only_logged(caplog: pytest.LogCaptureFixture) -> None:
    alerts = AdminAlerts(clock=Clock())

    with caplog.at_level(logging.ERROR, logger="bot.alerts"):
        await alerts.raise_alarm("혼자")

    assert len(alarm_records(caplog)) == 1
