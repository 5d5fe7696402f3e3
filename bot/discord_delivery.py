"""Getting an answer into a Discord channel through the platform's faults.

discord.py retries 429s and 5xx itself; what is added here is said in `Delivery`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import discord
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from bot.discord_rules import (
    NETWORK_ERRORS,
    SEND_ATTEMPTS,
    SEND_ERRORS,
    face_file,
    nonce_for,
    split_message,
    upload_limit,
)
from core.engine import Working
from core.types import RenderedFace, Reply

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplyTarget:
    """Where an answer goes: a channel, and the message it answers (which may be gone by then)."""

    channel: discord.abc.Messageable
    channel_id: int
    message_id: int
    guild: discord.Guild | None

    @classmethod
    def of(cls, message: discord.Message) -> ReplyTarget:
        return cls(message.channel, message.channel.id, message.id, message.guild)

    def reference(self) -> discord.MessageReference:
        """`fail_if_not_exists=False`: a user who deleted the message while she was thinking still
        gets the answer, as a plain message."""
        return discord.MessageReference(
            message_id=self.message_id,
            channel_id=self.channel_id,
            guild_id=self.guild.id if self.guild is not None else None,
            fail_if_not_exists=False,
        )


def typing_in(channel: discord.abc.Messageable) -> Working:
    """Shows "typing…" in `channel` while a turn runs; an indicator that fails costs the dots, not the turn."""

    @asynccontextmanager
    async def typing() -> AsyncIterator[None]:
        indicator = channel.typing()
        shown = True
        try:
            await indicator.__aenter__()
        except SEND_ERRORS as error:
            logger.debug("Discord: no typing indicator in this channel: %r", error)
            shown = False
        try:
            yield
        finally:
            if shown:
                await indicator.__aexit__(None, None, None)

    return typing


class Delivery:
    """Sends a reply: text in parts Discord accepts, her face on the first, and what to do when a send fails.

    discord.py's `HTTPClient.request` (discord/http.py, 2.7) already makes up to five tries of every
    request: after a 429 it sleeps the `retry_after` Discord sent (and it waits out exhausted
    buckets and the global limit before sending at all), after a 500/502/504/524 it sleeps 1, 3,
    5, 7 s, and only then raises. It does not retry a dropped connection or a timeout (only
    ECONNRESET under its macOS/Windows numbers 54/10054, not Linux's), and such a request may
    well have reached Discord. Those are retried here, with the same nonce, so Discord hands back
    the message it already posted instead of posting a second one.

    What is left is Discord saying no. A face that cannot be sent (too large, a failed upload, no
    Attach Files permission) costs the picture: the text goes alone. No permission to write at
    all is logged once per channel and not retried. Nothing here ever turns a failed send into an
    apology: the answer existed, and a second message would only add to whatever went wrong.
    """

    def __init__(self) -> None:
        self._forbidden: set[int] = set()
        """Channels where writing was refused and the log has said so."""

    async def send(self, target: ReplyTarget, reply: Reply) -> None:
        parts = split_message(reply.text)
        image = self._attachable(reply.image, target)
        try:
            await self._first(target, parts[0] if parts else None, image)
            for index, part in enumerate(parts[1:], start=1):
                await self._post(target, index, content=part)
        except discord.Forbidden as error:
            self._refused(target, error)
        except SEND_ERRORS as error:
            logger.warning("Discord: the answer to message %s did not go out: %r", target.message_id, error)
        else:
            self._forbidden.discard(target.channel_id)

    async def _first(self, target: ReplyTarget, text: str | None, image: RenderedFace | None) -> None:
        if image is None:
            if text is not None:
                await self._post(target, 0, content=text)
            return
        try:
            await self._post(target, 0, content=text, image=image)
        except discord.HTTPException as error:
            if text is None:
                raise
            logger.warning(
                "Discord: her face did not go out in channel %s (%s, code %s); sending the text alone",
                target.channel_id,
                error.status,
                error.code,
            )
            await self._post(target, 0, content=text)

    @staticmethod
    async def _post(target: ReplyTarget, part: int, *, content: str | None, image: RenderedFace | None = None) -> None:
        """One message; the first part answers the user's message."""
        fields: dict[str, Any] = {"nonce": nonce_for(target.message_id, part)}
        if part == 0:
            fields["reference"] = target.reference()
        if content is not None:
            fields["content"] = content
        retrying = AsyncRetrying(
            stop=stop_after_attempt(SEND_ATTEMPTS),
            wait=wait_exponential(multiplier=0.5, max=4.0),
            retry=retry_if_exception_type(NETWORK_ERRORS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if image is not None:
                    fields["file"] = face_file(image)  # a fresh file each try: a failed upload read it
                await target.channel.send(**fields)

    @staticmethod
    def _attachable(image: RenderedFace | None, target: ReplyTarget) -> RenderedFace | None:
        if image is None:
            return None
        size, limit = len(image.data), upload_limit(target.guild)
        if size > limit:
            logger.warning("Discord: a face of %d bytes is over the upload limit of %d bytes", size, limit)
            return None
        return image

    def _refused(self, target: ReplyTarget, error: discord.Forbidden) -> None:
        if target.channel_id in self._forbidden:
            logger.debug("Discord: still no permission to write in channel %s", target.channel_id)
            return
        self._forbidden.add(target.channel_id)
        logger.warning(
            "Discord: no permission to write in channel %s (%s); her answers there are dropped until it is granted",
            target.channel_id,
            error.text or error.status,
        )
