"""A small Telegram Bot API server on 127.0.0.1, for driving the real python-telegram-bot client.

It speaks the wire protocol the client speaks (HTTP/1.1 POSTs to `/bot<token>/<method>`, form or
multipart bodies, `{"ok": ..., "result": ...}` answers) and keeps just enough state to be
believable: a queue of updates served by long-polling `getUpdates` with offsets, and the messages
the bot sent, so a test can reply to one of them or press one of its buttons. Every call is
recorded with its decoded fields, uploaded files and how it was answered, which is what the tests
assert on.

Updates are confirmed as Telegram confirms them: a `getUpdates` with `offset=N` forgets, for good,
every update below N, whichever client or process asks next. Tests can also meet the faults real
Telegram produces: `inject` queues a fault (flood control, a 5xx, a slow answer, a dropped
connection, a refusal) for a method's next calls, and `fail_chat` makes every call for one chat
fail until `clear_faults`. The answers are the ones Telegram sends, so the client raises exactly
what it raises in production (RetryAfter, NetworkError, TimedOut, BadRequest, ChatMigrated,
Forbidden).

It runs `http.server` in a thread, so it serves a bot in the test's own event loop as well as one
in another process (`TELEGRAM_API_BASE_URL=<base_url>`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Literal, TypeAlias

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_LONG_POLL_S = 1.0
"""getUpdates waits at most this long for news, whatever the client asks: shutdowns stay quick."""

DROPPED = "dropped"
"""`ApiCall.status` of a call whose connection was closed without any answer."""

SEND_METHODS = ("sendMessage", "sendPhoto", "sendAnimation", "sendDocument")
"""The methods that post into a chat: what `sent` lists."""

Json = dict[str, Any]


# ---------------------------------------------------------------- faults

CAPTION_TOO_LONG = "Bad Request: message caption is too long"
REPLY_NOT_FOUND = "Bad Request: message to be replied not found"
CHAT_UPGRADED = "Bad Request: group chat was upgraded to a supergroup chat"
BOT_BLOCKED = "Forbidden: bot was blocked by the user"


def _error(status: int, description: str, **parameters: int) -> Json:
    """An error body as Telegram writes it; `parameters` are what PTB turns into RetryAfter or ChatMigrated."""
    body: Json = {"ok": False, "error_code": status, "description": description}
    if parameters:
        body["parameters"] = parameters
    return body


@dataclass(frozen=True)
class TooManyRequests:
    """Flood control: the call is refused (429) with the seconds to wait; PTB raises RetryAfter."""

    retry_after: int

    def refusal(self) -> tuple[int, Json]:
        description = f"Too Many Requests: retry after {self.retry_after}"
        return 429, _error(429, description, retry_after=self.retry_after)


@dataclass(frozen=True)
class ServerError:
    """Telegram's side failed (5xx) without doing anything; PTB raises a plain NetworkError."""

    status: int = 500

    def __post_init__(self) -> None:
        if not 500 <= self.status <= 599:
            raise ValueError(f"a server error is a 5xx status, not {self.status}")

    def refusal(self) -> tuple[int, Json]:
        try:
            description = HTTPStatus(self.status).phrase
        except ValueError:
            description = "Server Error"
        return self.status, _error(self.status, description)


@dataclass(frozen=True)
class Slow:
    """The answer takes `seconds` before the call is performed and answered with success.

    A client whose read timeout is shorter raises TimedOut, yet the call still takes effect when
    the time is up: the delivery it gave up on happens anyway (wait for it with `wait_until`).
    """

    seconds: float


@dataclass(frozen=True)
class Drop:
    """The request is read, then the connection is closed without any HTTP answer (PTB: NetworkError).

    With `performed=True` the call takes effect first: it was delivered, and the client cannot know.
    """

    performed: bool = False


@dataclass(frozen=True)
class BadRequest:
    """A 400 refusal with Telegram's description (see CAPTION_TOO_LONG, REPLY_NOT_FOUND); PTB: BadRequest."""

    description: str

    def refusal(self) -> tuple[int, Json]:
        return 400, _error(400, self.description)


@dataclass(frozen=True)
class Migrated:
    """The group became a supergroup: calls for the old id are refused (400); PTB raises ChatMigrated."""

    new_chat_id: int

    def refusal(self) -> tuple[int, Json]:
        return 400, _error(400, CHAT_UPGRADED, migrate_to_chat_id=self.new_chat_id)


@dataclass(frozen=True)
class Forbidden:
    """The bot may not write there (blocked, kicked); a 403 refusal that PTB raises as Forbidden."""

    description: str = BOT_BLOCKED

    def refusal(self) -> tuple[int, Json]:
        return 403, _error(403, self.description)


Fault: TypeAlias = TooManyRequests | ServerError | Slow | Drop | BadRequest | Migrated | Forbidden


def _refusal(fault: Fault | None) -> tuple[int, Json] | None:
    """The error answer a fault sends instead of performing the call; None for faults that still perform it."""
    if fault is None or isinstance(fault, (Slow, Drop)):
        return None
    return fault.refusal()


@dataclass(frozen=True)
class _Injection:
    method: str
    fault: Fault
    match: Callable[[Mapping[str, str]], bool] | None


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class UploadedFile:
    field: str
    filename: str
    content_type: str
    data: bytes


@dataclass(frozen=True)
class ApiCall:
    """One Bot API request as the server received it, and what it answered."""

    method: str
    params: Mapping[str, str]
    """Every non-file field as sent: strings, with JSON for structured values."""
    files: Mapping[str, UploadedFile]
    result: Any
    """The answer's result; None for getUpdates, which is recorded as it arrives, and for refused calls."""
    status: int | str = 200
    """The HTTP status answered, or DROPPED when the connection was closed without an answer."""
    fault: Fault | None = None
    """The injected fault this call met, if any."""
    at: float = field(default_factory=time.monotonic)
    """When the call was recorded (`time.monotonic()`), for checking pauses between retries."""

    def json(self, name: str) -> Any:
        return json.loads(self.params[name])

    @property
    def performed(self) -> bool:
        """Whether the call took effect: answered with success, or performed and then dropped."""
        return self.status == 200 or (self.status == DROPPED and isinstance(self.fault, Drop) and self.fault.performed)

    @property
    def chat_id(self) -> int | None:
        return _chat_id_of(self.params)

    @property
    def offset(self) -> int | None:
        """The offset a getUpdates asked for: what it confirmed, if it was answered."""
        return int(self.params["offset"]) if self.params.get("offset") else None

    @property
    def reply_to(self) -> int | None:
        """The message this one answers, by either of the ways a client can say so."""
        if "reply_parameters" in self.params:
            return int(self.json("reply_parameters")["message_id"])
        if "reply_to_message_id" in self.params:
            return int(self.params["reply_to_message_id"])
        return None

    @property
    def text(self) -> str | None:
        return self.params.get("text", self.params.get("caption"))


def _chat_id_of(params: Mapping[str, str]) -> int | None:
    """A numeric chat_id; None when there is none or it is a channel's @username."""
    try:
        return int(params["chat_id"])
    except (KeyError, ValueError):
        return None


def _update_id_of(item: Json) -> int | None:
    """An update's int id; raw items may have none (or a wrong type) and are never confirmed by an offset."""
    value = item.get("update_id")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# ---------------------------------------------------------------- what Telegram delivers


def user(user_id: int, first_name: str = "사용자", *, username: str | None = None, is_bot: bool = False) -> Json:
    data: Json = {"id": user_id, "is_bot": is_bot, "first_name": first_name}
    if username:
        data["username"] = username
    return data


def private_chat(of_user: Json) -> Json:
    return {"id": of_user["id"], "type": "private", "first_name": of_user["first_name"]}


def group_chat(chat_id: int = -1001234567890, title: str = "오로라 팬클럽") -> Json:
    return {"id": chat_id, "type": "supergroup", "title": title}


def basic_group(chat_id: int = -4123456789, title: str = "오로라 친구들") -> Json:
    """A basic group (ids without the -100 prefix): the kind that migrates to a supergroup."""
    return {"id": chat_id, "type": "group", "title": title}


def forum_chat(chat_id: int = -1009876543210, title: str = "오로라 토론방") -> Json:
    """A supergroup with topics: its messages carry a message_thread_id."""
    return {"id": chat_id, "type": "supergroup", "title": title, "is_forum": True}


def _chat_type(chat_id: int) -> str:
    """What Telegram's ids say: users are positive, supergroups -100…, basic groups other negatives."""
    if chat_id > 0:
        return "private"
    return "supergroup" if chat_id <= -1_000_000_000_000 else "group"


_COMMAND = re.compile(r"^/\w+(?:@\w+)?")
_MENTION = re.compile(r"@\w+")


def utf16_len(text: str) -> int:
    """Telegram measures entity offsets in UTF-16 code units."""
    return len(text.encode("utf-16-le")) // 2


def entities_of(text: str) -> list[Json]:
    """The entities Telegram's server would attach: a leading bot command and @mentions."""
    entities: list[Json] = []
    command = _COMMAND.match(text)
    if command:
        entities.append({"type": "bot_command", "offset": 0, "length": utf16_len(command.group())})
    for mention in _MENTION.finditer(text):
        if command and mention.start() < command.end():
            continue
        entities.append(
            {"type": "mention", "offset": utf16_len(text[: mention.start()]), "length": utf16_len(mention.group())}
        )
    return entities


def _allowed_updates(params: Mapping[str, str]) -> frozenset[str] | None:
    """The update kinds a getUpdates asked for; None (everything) when it named none."""
    if "allowed_updates" not in params:
        return None
    kinds = json.loads(params["allowed_updates"])
    return frozenset(str(kind) for kind in kinds) if isinstance(kinds, list) and kinds else None


def _is_allowed(item: Json, allowed: frozenset[str] | None) -> bool:
    return allowed is None or any(key in allowed for key in item if key != "update_id")


class FakeBotApi:
    """Start with `with FakeBotApi() as api:`; point the bot at `api.base_url` with `api.token`."""

    def __init__(
        self, *, token: str = "123456:TEST-token", bot_id: int = 4242, username: str = "ohlora_test_bot"
    ) -> None:
        self.token = token
        self.bot_user = user(bot_id, "오로라", username=username, is_bot=True)
        self._lock = threading.Condition()
        self._updates: list[Json] = []
        """Unconfirmed updates, in the order they were pushed."""
        self._confirmed_below = 0
        self._next_update_id = 1
        self._calls: list[ApiCall] = []
        self._messages: dict[tuple[int, int], Json] = {}
        self._message_ids = itertools.count(1)
        self._injected: list[_Injection] = []
        self._chat_faults: dict[int, Fault] = {}
        self._closed = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FakeBotApi:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # serve_forever notices shutdown() only between polls: at its default 0.5 s, every close waited that long.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-bot-api", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed.set()  # ends long polls and Slow waits at once
            self._lock.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeBotApi:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        """What TELEGRAM_API_BASE_URL should say: the client appends the token."""
        assert self._server is not None, "start the server first"
        port = self._server.server_address[1]
        return f"http://127.0.0.1:{port}/bot"

    # ---------------------------------------------------------------- what tests drive

    def push_update(self, update: Json, *, update_id: int | None = None) -> int:
        """Queue an update (without its id) for the next getUpdates; returns its update_id.

        An explicit `update_id` lets a test deliver the same update twice, as Telegram does when a
        confirmation was lost; the default counter then continues past it.
        """
        if "update_id" in update:
            raise ValueError("pass the id as update_id=..., or queue the object as it is with push_raw")
        with self._lock:
            if update_id is None:
                update_id = max(self._next_update_id, self._confirmed_below)
            self._queue({"update_id": update_id, **update})
        return update_id

    def push_raw(self, obj: Json) -> None:
        """Queue a JSON object exactly as given, for updates the client may not be able to parse.

        One with an int update_id is confirmed by offsets like any update; one without can never be
        confirmed, so it is served by one getUpdates and then forgotten.
        """
        with self._lock:
            self._queue(dict(obj))

    def _queue(self, item: Json) -> None:
        """Append to the pending updates; the caller holds the lock."""
        update_id = _update_id_of(item)
        if update_id is not None:
            if update_id < self._confirmed_below:
                raise ValueError(
                    f"update {update_id} is below the confirmed offset {self._confirmed_below}: "
                    "Telegram would never serve it"
                )
            self._next_update_id = max(self._next_update_id, update_id + 1)
        self._updates.append(item)
        self._lock.notify_all()

    def message(
        self,
        from_user: Json,
        text: str,
        *,
        chat: Json | None = None,
        reply_to: Json | None = None,
        message_thread_id: int | None = None,
        forwarded_from: Json | None = None,
    ) -> Json:
        """A user's text message as Telegram delivers it (entities included); not yet sent.

        `message_thread_id` puts it in a forum topic (its chat marked `is_forum`); `forwarded_from`
        makes it a forward of that user's message, with the `forward_origin` of Bot API 7.
        """
        data = self._new_message(from_user, chat, message_thread_id)
        data["text"] = text
        entities = entities_of(text)
        if entities:
            data["entities"] = entities
        if reply_to is not None:
            data["reply_to_message"] = reply_to
        if forwarded_from is not None:
            data["forward_origin"] = {"type": "user", "sender_user": forwarded_from, "date": data["date"] - 60}
        return data

    def media_message(
        self, from_user: Json, kind: Literal["photo", "sticker"] = "photo", *, chat: Json | None = None
    ) -> Json:
        """A photo (every size Telegram keeps) or a sticker, with no text: what a text-only bot must survive."""
        data = self._new_message(from_user, chat, None)
        n = data["message_id"]
        if kind == "photo":
            data["photo"] = [
                {"file_id": f"photo-{n}-{side}", "file_unique_id": f"p{n}-{side}", "width": side, "height": side}
                for side in (90, 320, 800)
            ]
        else:
            data["sticker"] = {
                "file_id": f"sticker-{n}",
                "file_unique_id": f"s{n}",
                "type": "regular",
                "width": 512,
                "height": 512,
                "is_animated": False,
                "is_video": False,
                "emoji": "😊",
            }
        return data

    def migration_message(self, old_chat: Json, new_chat_id: int, *, from_user: Json | None = None) -> Json:
        """The service message Telegram posts in a basic group that has just become a supergroup."""
        data: Json = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": old_chat,
            "migrate_to_chat_id": new_chat_id,
        }
        if from_user is not None:
            data["from"] = from_user
        return data

    def _new_message(self, from_user: Json, chat: Json | None, message_thread_id: int | None) -> Json:
        data: Json = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat or private_chat(from_user),
            "from": from_user,
        }
        if message_thread_id is not None:
            data["chat"] = {**data["chat"], "is_forum": True}
            data["message_thread_id"] = message_thread_id
            data["is_topic_message"] = True
        return data

    def send_message(self, from_user: Json, text: str, **kwargs: Any) -> tuple[int, Json]:
        """A user writes to the bot: returns (update_id, message)."""
        message = self.message(from_user, text, **kwargs)
        return self.push_update({"message": message}), message

    def press_button(self, from_user: Json, message: Json, data: str) -> int:
        """A user presses an inline keyboard button under one of the bot's messages."""
        query = {
            "id": f"query-{next(self._message_ids)}",
            "from": from_user,
            "message": message,
            "chat_instance": "fake-chat-instance",
            "data": data,
        }
        return self.push_update({"callback_query": query})

    # ---------------------------------------------------------------- faults

    def inject(self, method: str, *faults: Fault, match: Callable[[Mapping[str, str]], bool] | None = None) -> None:
        """Queue faults for the next calls of `method` (those whose params satisfy `match`), one call each.

        Queued faults are met in the order they were injected, before any `fail_chat` rule.
        """
        with self._lock:
            self._injected.extend(_Injection(method, fault, match) for fault in faults)

    def fail_chat(self, chat_id: int, fault: Fault) -> None:
        """Every call for `chat_id` meets `fault` until `clear_faults`: a migrated group, a user who blocked us."""
        with self._lock:
            self._chat_faults[chat_id] = fault

    def clear_faults(self) -> None:
        """Forget every queued fault and every standing rule."""
        with self._lock:
            self._injected.clear()
            self._chat_faults.clear()

    def queued_faults(self, method: str | None = None) -> list[Fault]:
        """Injected faults no call has met yet: a test can check its whole script was played."""
        with self._lock:
            return [injection.fault for injection in self._injected if method is None or injection.method == method]

    def _take_fault(self, method: str, params: Mapping[str, str]) -> Fault | None:
        with self._lock:
            for index, injection in enumerate(self._injected):
                if injection.method == method and (injection.match is None or injection.match(params)):
                    del self._injected[index]
                    return injection.fault
            chat_id = _chat_id_of(params)
            return self._chat_faults.get(chat_id) if chat_id is not None else None

    # ---------------------------------------------------------------- what tests read

    def calls(self, *methods: str, chat_id: int | None = None) -> list[ApiCall]:
        """Every call received, failed ones included, in order (getUpdates as it arrives)."""
        with self._lock:
            calls = list(self._calls)
        return [
            call
            for call in calls
            if (not methods or call.method in methods) and (chat_id is None or call.chat_id == chat_id)
        ]

    def attempts(self, method: str, chat_id: int | None = None) -> list[ApiCall]:
        """Every call of `method`, refused and dropped ones included: what a retry policy is judged by."""
        return self.calls(method, chat_id=chat_id)

    def sent(self, chat_id: int | None = None) -> list[ApiCall]:
        """What the bot actually posted to chats (messages, photos, animations), in order; failed attempts left out."""
        return [call for call in self.calls(*SEND_METHODS, chat_id=chat_id) if call.performed]

    def stored_message(self, chat_id: int, message_id: int) -> Json:
        with self._lock:
            return dict(self._messages[(chat_id, message_id)])

    @property
    def confirmed_below(self) -> int:
        """The highest offset a served getUpdates has applied: every update below it is gone for good."""
        with self._lock:
            return self._confirmed_below

    def is_confirmed(self, update_id: int) -> bool:
        return update_id < self.confirmed_below

    def pending_updates(self) -> list[Json]:
        """The updates no offset has confirmed yet, in the order they were pushed."""
        with self._lock:
            return [dict(item) for item in self._updates]

    async def wait_until(self, condition: Callable[[FakeBotApi], bool], what: str, timeout_s: float = 10.0) -> None:
        """Let the bot under test work until `condition` holds; a bound, not a timing assertion."""
        deadline = time.monotonic() + timeout_s
        while not condition(self):
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.005)

    async def wait_for_calls(self, *methods: str, chat_id: int | None = None, count: int = 1) -> list[ApiCall]:
        await self.wait_until(
            lambda api: len(api.calls(*methods, chat_id=chat_id)) >= count,
            f"{count} x {'/'.join(methods) or 'any call'} (chat {chat_id})",
        )
        return self.calls(*methods, chat_id=chat_id)

    # ---------------------------------------------------------------- the methods

    def handle(
        self, method: str, params: Mapping[str, str], files: Mapping[str, UploadedFile]
    ) -> tuple[int, Json] | None:
        """Answer one call: (status, body), or None to close the connection without a word.

        Runs in the request's own thread and sleeps outside the lock, so a slow or faulted call
        never holds up the others.
        """
        params, files = dict(params), dict(files)
        fault = self._take_fault(method, params)
        refusal = _refusal(fault)
        if refusal is not None:
            self._record(ApiCall(method, params, files, None, refusal[0], fault))
            return refusal
        if isinstance(fault, Drop) and not fault.performed:
            self._record(ApiCall(method, params, files, None, DROPPED, fault))
            return None
        status: int | str = DROPPED if isinstance(fault, Drop) else 200
        if method == "getUpdates":
            # Recorded on arrival: a long poll may be answered much later, or to a client that left.
            self._record(ApiCall(method, params, files, None, status, fault))
            self._pause(fault)
            result: Any = self._get_updates(params)
        else:
            answer = self._METHODS.get(method)
            self._pause(fault)
            if answer is None:
                self._record(ApiCall(method, params, files, None, 404, fault))
                return 404, _error(404, "Not Found: method not found")
            result = answer(self, params, files)
            self._record(ApiCall(method, params, files, result, status, fault))
        return None if isinstance(fault, Drop) else (200, {"ok": True, "result": result})

    def _pause(self, fault: Fault | None) -> None:
        """A Slow fault's wait; cut short when the server closes. Never called with the lock held."""
        if isinstance(fault, Slow):
            self._closed.wait(fault.seconds)

    def _record(self, call: ApiCall) -> None:
        with self._lock:
            self._calls.append(call)
            self._lock.notify_all()

    def _get_updates(self, params: Mapping[str, str]) -> list[Json]:
        """Confirm what the offset says, then serve what is left (waiting for news up to the timeout)."""
        offset = int(params.get("offset", 0) or 0)
        limit = min(max(int(params.get("limit", 100) or 100), 1), 100)
        allowed = _allowed_updates(params)
        wait_s = min(float(params.get("timeout", 0) or 0), MAX_LONG_POLL_S)
        deadline = time.monotonic() + wait_s
        with self._lock:
            self._confirm(offset)
            while True:
                batch = [item for item in self._updates if _is_allowed(item, allowed)][:limit]
                left = deadline - time.monotonic()
                if batch or self._closed.is_set() or left <= 0:
                    break
                self._lock.wait(left)
            served_once = {id(item) for item in batch if _update_id_of(item) is None}
            if served_once:
                self._updates = [item for item in self._updates if id(item) not in served_once]
            return [dict(item) for item in batch]

    def _confirm(self, offset: int) -> None:
        """Forget every update below `offset` for good; a negative one keeps only the last -offset updates."""
        if offset < 0:
            ids = sorted(i for i in map(_update_id_of, self._updates) if i is not None)
            offset = ids[offset] if len(ids) > -offset else 0
        if offset <= self._confirmed_below:
            return
        self._confirmed_below = offset
        self._updates = [
            item for item in self._updates if (update_id := _update_id_of(item)) is None or update_id >= offset
        ]

    def _bot_message(self, params: Mapping[str, str], **content: Any) -> Json:
        chat_id = int(params["chat_id"])
        message: Json = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": _chat_type(chat_id)},
            "from": self.bot_user,
            **content,
        }
        if "message_thread_id" in params:
            if message["chat"]["type"] == "supergroup":
                message["chat"]["is_forum"] = True
            message["message_thread_id"] = int(params["message_thread_id"])
            message["is_topic_message"] = True
        if "reply_markup" in params:
            message["reply_markup"] = json.loads(params["reply_markup"])
        with self._lock:
            self._messages[(chat_id, message["message_id"])] = message
        return message

    def _send_message(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> Json:
        return self._bot_message(params, text=params["text"])

    def _send_photo(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> Json:
        size = {"file_id": "photo-file", "file_unique_id": "photo-unique", "width": 256, "height": 256}
        return self._bot_message(params, photo=[size], **_caption(params))

    def _send_animation(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> Json:
        animation = {
            "file_id": "animation-file",
            "file_unique_id": "animation-unique",
            "width": 256,
            "height": 256,
            "duration": 1,
            "mime_type": "image/gif",
        }
        return self._bot_message(params, animation=animation, **_caption(params))

    def _send_document(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> Json:
        uploaded = files.get("document")
        document = {
            "file_id": "document-file",
            "file_unique_id": "document-unique",
            "file_name": uploaded.filename if uploaded else "document",
        }
        return self._bot_message(params, document=document, **_caption(params))

    def _edit_message_text(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> Json | bool:
        key = (int(params["chat_id"]), int(params["message_id"]))
        with self._lock:
            message = self._messages[key]
            message["text"] = params["text"]
            if "reply_markup" in params:
                message["reply_markup"] = json.loads(params["reply_markup"])
            else:
                message.pop("reply_markup", None)
            return dict(message)

    def _get_me(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> Json:
        return {
            **self.bot_user,
            "can_join_groups": True,
            "can_read_all_group_messages": False,
            "supports_inline_queries": False,
        }

    def _get_my_commands(self, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> list[Json]:
        scope = params.get("scope")
        for call in reversed(self.calls("setMyCommands")):
            if not call.performed:
                continue
            if call.params.get("scope") == scope:
                return list(call.json("commands"))
        return []

    _METHODS: Mapping[str, Callable[..., Any]] = {
        "getMe": _get_me,
        "sendMessage": _send_message,
        "sendPhoto": _send_photo,
        "sendAnimation": _send_animation,
        "sendDocument": _send_document,
        "editMessageText": _edit_message_text,
        "getMyCommands": _get_my_commands,
        "sendChatAction": lambda self, params, files: True,
        "setMyCommands": lambda self, params, files: True,
        "deleteMyCommands": lambda self, params, files: True,
        "deleteWebhook": lambda self, params, files: True,
        "answerCallbackQuery": lambda self, params, files: True,
        "close": lambda self, params, files: True,
        "logOut": lambda self, params, files: True,
    }


def _caption(params: Mapping[str, str]) -> Json:
    return {"caption": params["caption"]} if "caption" in params else {}


class _Server(ThreadingHTTPServer):
    request_queue_size = 128
    """Bursts of concurrent requests (flood tests) must not overflow the listen backlog."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client killed mid-request (the crash tests' kill -9) resets its connection: not news."""
        if isinstance(sys.exc_info()[1], ConnectionError):
            logger.debug("fake Bot API: a client went away mid-request")
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    """One HTTP request: find the token and method in the path, decode the body, answer JSON."""

    disable_nagle_algorithm = True
    """Without it every response waits ~40 ms for a delayed acknowledgement."""

    api: FakeBotApi
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self._serve(self._read_body())

    def do_GET(self) -> None:  # noqa: N802
        self._serve(b"")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        logger.debug("fake Bot API: " + format, *args)

    def _serve(self, body: bytes) -> None:
        url = urllib.parse.urlsplit(self.path)
        match = re.fullmatch(r"/bot(?P<token>[^/]+)/(?P<method>\w+)", url.path)
        if match is None:
            self._answer(404, _error(404, "Not Found"))
            return
        if match["token"] != self.api.token:
            self._answer(401, _error(401, "Unauthorized"))
            return
        params = {key: values[-1] for key, values in urllib.parse.parse_qs(url.query).items()}
        fields, files = decode_body(self.headers.get("Content-Type", ""), body)
        params.update(fields)
        reply = self.api.handle(match["method"], params, files)
        if reply is None:
            # No status line at all: the client sees the server hang up, as when a proxy drops it.
            self.close_connection = True
            return
        self._answer(*reply)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))

    def _answer(self, status: int, answer: Json) -> None:
        payload = json.dumps(answer, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            logger.debug("fake Bot API: the client left before the answer (a cancelled long poll)")


def decode_body(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    """Form, JSON or multipart fields as strings, and the files of a multipart body."""
    kind, _, options = content_type.partition(";")
    kind = kind.strip().lower()
    if not body:
        return {}, {}
    if kind == "application/json":
        decoded = json.loads(body)
        return {key: value if isinstance(value, str) else json.dumps(value) for key, value in decoded.items()}, {}
    if kind == "multipart/form-data":
        boundary = re.search(r'boundary="?([^";]+)"?', options)
        if boundary is None:
            raise ValueError("multipart body without a boundary")
        return _decode_multipart(body, boundary.group(1).encode())
    pairs = urllib.parse.parse_qsl(body.decode(), keep_blank_values=True)
    return dict(pairs), {}


def _decode_multipart(body: bytes, boundary: bytes) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    for part in _parts(body, boundary):
        head, _, content = part.partition(b"\r\n\r\n")
        headers = _part_headers(head.decode())
        disposition = dict(re.findall(r'(\w+)="([^"]*)"', headers.get("content-disposition", "")))
        name = disposition["name"]
        if "filename" in disposition:
            content_type = headers.get("content-type", "application/octet-stream")
            files[name] = UploadedFile(name, disposition["filename"], content_type, content)
        else:
            fields[name] = content.decode()
    return fields, files


def _parts(body: bytes, boundary: bytes) -> Iterator[bytes]:
    for section in body.split(b"--" + boundary)[1:]:
        if section.startswith(b"--"):
            return
        yield section.removeprefix(b"\r\n").removesuffix(b"\r\n")


def _part_headers(head: str) -> dict[str, str]:
    headers = {}
    for line in head.split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers
