"""A small Telegram Bot API server on 127.0.0.1, for driving the real python-telegram-bot client.

It speaks the wire protocol the client speaks (HTTP/1.1 POSTs to `/bot<token>/<method>`, form or
multipart bodies, `{"ok": ..., "result": ...}` answers) and keeps just enough state to be
believable: a queue of updates served by long-polling `getUpdates` with offsets, and the messages
the bot sent, so a test can reply to one of them or press one of its buttons. Every call is
recorded with its decoded fields and uploaded files, which is what the tests assert on.

It runs `http.server` in a thread, so it serves a bot in the test's own event loop as well as one
in another process (`TELEGRAM_API_BASE_URL=<base_url>`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

logger = logging.getLogger(__name__)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_LONG_POLL_S = 1.0
"""getUpdates waits at most this long for news, whatever the client asks: shutdowns stay quick."""

Json = dict[str, Any]


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
    """The answer's result; None for getUpdates, which is recorded as it arrives."""

    def json(self, name: str) -> Any:
        return json.loads(self.params[name])

    @property
    def chat_id(self) -> int | None:
        return int(self.params["chat_id"]) if "chat_id" in self.params else None

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


def user(user_id: int, first_name: str = "사용자", *, username: str | None = None, is_bot: bool = False) -> Json:
    data: Json = {"id": user_id, "is_bot": is_bot, "first_name": first_name}
    if username:
        data["username"] = username
    return data


def private_chat(of_user: Json) -> Json:
    return {"id": of_user["id"], "type": "private", "first_name": of_user["first_name"]}


def group_chat(chat_id: int = -1001234567890, title: str = "오로라 팬클럽") -> Json:
    return {"id": chat_id, "type": "supergroup", "title": title}


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


class FakeBotApi:
    """Start with `with FakeBotApi() as api:`; point the bot at `api.base_url` with `api.token`."""

    def __init__(
        self, *, token: str = "123456:TEST-token", bot_id: int = 4242, username: str = "ohlora_test_bot"
    ) -> None:
        self.token = token
        self.bot_user = user(bot_id, "오로라", username=username, is_bot=True)
        self._lock = threading.Condition()
        self._updates: list[Json] = []
        self._calls: list[ApiCall] = []
        self._messages: dict[tuple[int, int], Json] = {}
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._closing = False
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> FakeBotApi:
        handler = type("Handler", (_Handler,), {"api": self})
        self._server = _Server(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-bot-api", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        with self._lock:
            self._closing = True
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

    def push_update(self, update: Json) -> int:
        """Queue an update (without its id) for the next getUpdates; returns its update_id."""
        with self._lock:
            update_id = next(self._update_ids)
            self._updates.append({"update_id": update_id, **update})
            self._lock.notify_all()
        return update_id

    def message(self, from_user: Json, text: str, *, chat: Json | None = None, reply_to: Json | None = None) -> Json:
        """A user's text message as Telegram delivers it (entities included); not yet sent."""
        data: Json = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": chat or private_chat(from_user),
            "from": from_user,
            "text": text,
        }
        entities = entities_of(text)
        if entities:
            data["entities"] = entities
        if reply_to is not None:
            data["reply_to_message"] = reply_to
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

    # ---------------------------------------------------------------- what tests read

    def calls(self, *methods: str, chat_id: int | None = None) -> list[ApiCall]:
        with self._lock:
            calls = list(self._calls)
        return [
            call
            for call in calls
            if (not methods or call.method in methods) and (chat_id is None or call.chat_id == chat_id)
        ]

    def sent(self, chat_id: int | None = None) -> list[ApiCall]:
        """Everything the bot posted to chats (messages, photos, animations), in order."""
        return self.calls("sendMessage", "sendPhoto", "sendAnimation", chat_id=chat_id)

    def stored_message(self, chat_id: int, message_id: int) -> Json:
        with self._lock:
            return dict(self._messages[(chat_id, message_id)])

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

    def handle(self, method: str, params: Mapping[str, str], files: Mapping[str, UploadedFile]) -> tuple[int, Json]:
        if method == "getUpdates":
            # Recorded on arrival: a long poll may be answered much later, or to a client that left.
            self._record(ApiCall(method, dict(params), dict(files), None))
            return 200, {"ok": True, "result": self._get_updates(params)}
        answer = self._METHODS.get(method)
        if answer is None:
            self._record(ApiCall(method, dict(params), dict(files), None))
            return 404, {"ok": False, "error_code": 404, "description": "Not Found: method not found"}
        result = answer(self, params, files)
        self._record(ApiCall(method, dict(params), dict(files), result))
        return 200, {"ok": True, "result": result}

    def _record(self, call: ApiCall) -> None:
        with self._lock:
            self._calls.append(call)
            self._lock.notify_all()

    def _get_updates(self, params: Mapping[str, str]) -> list[Json]:
        offset = int(params.get("offset", 0) or 0)
        limit = int(params.get("limit", 100) or 100)
        wait_s = min(float(params.get("timeout", 0) or 0), MAX_LONG_POLL_S)
        deadline = time.monotonic() + wait_s
        with self._lock:
            self._updates = [update for update in self._updates if update["update_id"] >= offset]
            while not self._updates and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            return [dict(update) for update in self._updates[:limit]]

    def _bot_message(self, params: Mapping[str, str], **content: Any) -> Json:
        chat_id = int(params["chat_id"])
        message: Json = {
            "message_id": next(self._message_ids),
            "date": int(time.time()),
            "chat": {"id": chat_id, "type": "private" if chat_id > 0 else "supergroup"},
            "from": self.bot_user,
            **content,
        }
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
            if call.params.get("scope") == scope:
                return list(call.json("commands"))
        return []

    _METHODS: Mapping[str, Callable[..., Any]] = {
        "getMe": _get_me,
        "sendMessage": _send_message,
        "sendPhoto": _send_photo,
        "sendAnimation": _send_animation,
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
            self._answer(404, {"ok": False, "error_code": 404, "description": "Not Found"})
            return
        if match["token"] != self.api.token:
            self._answer(401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
            return
        params = {key: values[-1] for key, values in urllib.parse.parse_qs(url.query).items()}
        fields, files = decode_body(self.headers.get("Content-Type", ""), body)
        params.update(fields)
        status, answer = self.api.handle(match["method"], params, files)
        self._answer(status, answer)

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
