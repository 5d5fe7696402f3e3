"""What a Discord message means for Oh-LoRA: pure rules, tested without a gateway.

Whether she answers (DMs always; in servers when mentioned, replied to, or in a channel an
admin allowed), what the engine reads (the words without her mentions, a forward's own words),
how an answer is cut into messages, and the autocomplete choices of the slash commands.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
import discord
from discord import app_commands

from core.types import IncomingMessage, RenderedFace

logger = logging.getLogger(__name__)

PLATFORM = "discord"
MESSAGE_LIMIT = 2000
"""Discord's limit on a message's content, counted in code points (Python's `len`)."""
CHOICES_LIMIT = 25
"""Discord shows at most 25 autocomplete choices."""
CHOICE_TEXT_LIMIT = 100
"""Longest name or string value of an autocomplete choice."""
CONFIRM_TIMEOUT_S = 120.0
SEND_ATTEMPTS = 3
"""Tries at one message part when the connection drops or times out (see `Delivery`)."""

SAFE_MENTIONS = discord.AllowedMentions(everyone=False, users=False, roles=False, replied_user=True)
"""Her answers can echo what users typed; an echoed @everyone or <@id> must never ping anyone."""

NETWORK_ERRORS: tuple[type[Exception], ...] = (aiohttp.ClientError, TimeoutError)
"""A request that may or may not have reached Discord: the connection dropped, or no answer came."""
SEND_ERRORS: tuple[type[Exception], ...] = (discord.HTTPException, *NETWORK_ERRORS)
"""Everything a request to Discord can fail with: Discord said no, or nobody knows."""


def default_intents() -> discord.Intents:
    """Guild and DM messages with their text; `message_content` must be enabled in the portal."""
    intents = discord.Intents.default()
    intents.message_content = True
    return intents


# --------------------------------------------------------------------------------------------
# Messages: the pure rules


@dataclass(frozen=True)
class InboundMessage:
    """A Discord message reduced to the facts that decide whether and what Oh-LoRA answers."""

    message_id: int
    author_id: int
    author_is_bot: bool
    """Other bots and webhooks, and her own messages: answering them could start a loop."""
    channel_id: int
    parent_channel_id: int | None
    """A thread's channel: allowing a channel lets her talk in its threads too."""
    in_dm: bool
    is_system: bool
    """Joins, pins, boosts: nobody said anything."""
    mentions_bot: bool
    replies_to_bot: bool
    mentions_everyone: bool
    text: str
    """The content without her own mentions; for a forward, the forwarded message's."""
    has_media: bool
    """Attachments or stickers (the forwarded message's, for a forward), which she cannot read."""
    forwarded: bool
    """Someone else's message passed on: its words are answered, never kept as the sender's memory."""

    @classmethod
    def from_discord(cls, message: discord.Message, me: discord.abc.User) -> InboundMessage:
        """`me` is the bot's own user. Users may also mention the role Discord made for the bot.

        A forward carries the forwarded message as a snapshot and has no content of its own. Only
        the forwarder's own message can speak to her: a mention inside the forwarded words was
        written to someone else.
        """
        guild = message.guild
        bot_role = guild.self_role if guild is not None else None
        bot_role_id = bot_role.id if bot_role is not None else None
        reference = message.reference
        is_reply = reference is not None and reference.type is discord.MessageReferenceType.reply
        referenced = reference.resolved if reference is not None and is_reply else None
        snapshots = message.message_snapshots
        if snapshots:
            content = "\n".join(snapshot.content for snapshot in snapshots)
            has_media = any(snapshot.attachments or snapshot.stickers for snapshot in snapshots)
        else:
            content = message.content
            has_media = bool(message.attachments or message.stickers)
        channel = message.channel
        return cls(
            message_id=message.id,
            author_id=message.author.id,
            author_is_bot=message.author.bot,
            channel_id=channel.id,
            parent_channel_id=channel.parent_id if isinstance(channel, discord.Thread) else None,
            in_dm=guild is None,
            is_system=message.is_system(),
            mentions_bot=me.id in message.raw_mentions
            or (bot_role_id is not None and bot_role_id in message.raw_role_mentions),
            replies_to_bot=isinstance(referenced, discord.Message) and referenced.author.id == me.id,
            mentions_everyone=message.mention_everyone,
            text=strip_mention(content, me.id, bot_role_id),
            has_media=has_media,
            forwarded=bool(snapshots),
        )

    @property
    def media_only(self) -> bool:
        """A picture, a sticker or a file without a word: she answers with `TEXT_ONLY_TEXT`."""
        return self.has_media and not self.text

    def to_incoming(self) -> IncomingMessage:
        return IncomingMessage(
            platform=PLATFORM,
            user_id=str(self.author_id),
            chat_id=str(self.channel_id),
            text=self.text,
            event_id=str(self.message_id),
            forwarded=self.forwarded,
        )


async def should_answer(message: InboundMessage, channel_allowed: Callable[[str], Awaitable[bool]]) -> bool:
    """Her manners: always in DMs; in servers when spoken to, or to words anywhere an admin allowed.

    Every server message from a person reads the allowlist once (twice in a thread of a channel
    that is not allowed), even one that mentions her: a user's messages in one channel then take
    the same awaits before `Commands.chat`, which is what keeps them in the order they arrived.
    In an allowed channel she joins conversations, so a picture or a sticker nobody addressed to
    her is left alone, and an @everyone/@here announcement is not talking to her.
    """
    if message.author_is_bot or message.is_system:
        return False
    if message.in_dm:
        return True
    allowed = await _in_allowed_channel(message, channel_allowed)
    if message.mentions_bot or message.replies_to_bot:
        return True
    return allowed and bool(message.text) and not message.mentions_everyone


async def _in_allowed_channel(message: InboundMessage, channel_allowed: Callable[[str], Awaitable[bool]]) -> bool:
    for channel_id in (message.channel_id, message.parent_channel_id):
        if channel_id is not None and await channel_allowed(str(channel_id)):
            return True
    return False


def strip_mention(text: str, bot_id: int, role_id: int | None = None) -> str:
    """`text` without the bot's mentions (`<@id>`, `<@!id>`, its role `<@&id>`) and the spaces around them.

    The model should read what was said to her, not a snowflake; a run of mentions in the middle
    of a sentence leaves one space.
    """
    targets = [rf"<@!?{bot_id}>"]
    if role_id is not None:
        targets.append(rf"<@&{role_id}>")
    mentions = re.compile(r"(?:[ \t]*(?:" + "|".join(targets) + r"))+[ \t]*")
    return mentions.sub(" ", text).strip()


def split_message(text: str, limit: int = MESSAGE_LIMIT) -> list[str]:
    """Parts of at most `limit` characters, cut at a line break, else a space, else anywhere.

    Whitespace at the cuts and ends goes (Discord drops it anyway) and no part is blank, so an
    empty text gives no parts.
    """
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[: limit + 1]  # a separator right after the limit is still a clean cut
        cut = window.rfind("\n")
        if cut <= 0:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = limit
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if rest:
        parts.append(rest)
    return parts


def fit_message(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """The first part of `text` that fits one message, marked with "…" when something was cut."""
    parts = split_message(text, limit - 2)
    if not parts:
        return ""
    return parts[0] + "\n…" if len(parts) > 1 else parts[0]


def nonce_for(message_id: int, part: int) -> str:
    """The nonce of part `part` of the answer to `message_id`: at most 25 characters, as Discord wants.

    The same answer part always gets the same nonce, so Discord (discord.py sends `enforce_nonce`
    with every nonce) returns the message already posted instead of posting it again.
    """
    return f"{message_id}.{part}"


def suggestions(options: Iterable[str], current: str) -> list[app_commands.Choice[str]]:
    """Autocomplete: the options containing what was typed so far, ignoring case and spaces."""
    typed = "".join(current.split()).casefold()
    choices: list[app_commands.Choice[str]] = []
    for option in dict.fromkeys(options):
        if len(option) > CHOICE_TEXT_LIMIT or typed not in "".join(option.split()).casefold():
            continue
        choices.append(app_commands.Choice(name=option, value=option))
        if len(choices) == CHOICES_LIMIT:
            break
    return choices


def face_choices(faces: Iterable[int], current: str) -> list[app_commands.Choice[int]]:
    """Autocomplete for face numbers: those whose digits contain what was typed."""
    typed = current.strip()
    matching = [face for face in sorted(set(faces)) if typed in str(face)]
    return [app_commands.Choice(name=f"#{face}", value=face) for face in matching[:CHOICES_LIMIT]]


def face_file(image: RenderedFace) -> discord.File:
    return discord.File(io.BytesIO(image.data), filename=image.filename)


def upload_limit(guild: discord.Guild | None) -> int:
    """Bytes a bot may attach here: boosted servers allow more, DMs the default."""
    return guild.filesize_limit if guild is not None else discord.utils.DEFAULT_FILE_SIZE_LIMIT_BYTES


def discord_user_ids(admin_ids: Iterable[str]) -> list[int]:
    """The Discord accounts among OHLORA_ADMIN_IDS (`discord:<id>`), in a stable order."""
    ids = {key.removeprefix(f"{PLATFORM}:") for key in admin_ids if key.startswith(f"{PLATFORM}:")}
    return sorted(int(value) for value in ids if value.isdigit())
