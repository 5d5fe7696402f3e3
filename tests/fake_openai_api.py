"""A small OpenAI-compatible completions server on 127.0.0.1, standing in for `vllm serve`.

It speaks the part of vLLM's API the backend uses: `GET /v1/models` and `POST /v1/completions`,
JSON in and out, vLLM's extra sampling fields accepted, errors in vLLM's `{"error": {...}}` shape
(404 for a model it does not serve). Every request is recorded with its headers and decoded body,
which is what the tests assert on. Answers come from a `Responder` (request body, choice index) →
`Sample`; failures can be queued (`fail_next`) to exercise retries, and a `gate` barrier makes
concurrent requests observable without timing anything.

It runs `http.server` in a thread, so the code under test uses its real HTTP client.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

Json = dict[str, Any]
END = " (답변 종료)"


@dataclass(frozen=True)
class Sample:
    """One scripted choice: its text and how many tokens the "model" generated for it."""

    text: str
    tokens: int
    finish_reason: str = "stop"


Responder = Callable[[Json, int], Sample]


def echo_responder(body: Json, index: int) -> Sample:
    """Names the model, the prompt and the choice index, so tests can check what went where."""
    return Sample(text=f" {body['model']}|{body['prompt']}|{index}{END}", tokens=3 + index)


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: Mapping[str, str]
    """Names lower-cased."""
    body: Json | None


class FakeOpenAIServer:
    """`with FakeOpenAIServer(models=[...]) as server:` then point a client at `server.base_url`."""

    def __init__(
        self,
        models: Iterable[str],
        *,
        responder: Responder = echo_responder,
        prompt_tokens: Callable[[str], int] = lambda prompt: len(prompt.split()),
        return_token_ids: bool = True,
        api_key: str | None = None,
        gate: threading.Barrier | None = None,
    ) -> None:
        self.models = list(models)
        self.responder = responder
        self.prompt_tokens = prompt_tokens
        self.return_token_ids = return_token_ids
        """False behaves like a vLLM release without `return_token_ids`: no per-choice token ids."""
        self.api_key = api_key
        self.gate = gate
        """Every completion waits here first: a barrier of N proves N requests were in flight."""
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self._failures: list[int] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-openai-api", daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def completions(self) -> list[Json]:
        """The bodies of every completion request, in arrival order."""
        return [r.body for r in self.requests if r.path == "/v1/completions" and r.body is not None]

    def fail_next(self, count: int, status: int = 503) -> None:
        """The next `count` requests (any path) are answered with `status` and an error body."""
        with self._lock:
            self._failures.extend([status] * count)

    def __enter__(self) -> FakeOpenAIServer:
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    # -- request handling ------------------------------------------------------------------------

    def _handle(self, method: str, path: str, headers: Mapping[str, str], raw: bytes) -> tuple[int, Json]:
        body = json.loads(raw) if raw else None
        with self._lock:
            self._requests.append(RecordedRequest(method, path, dict(headers), body))
            failure = self._failures.pop(0) if self._failures else None
        if failure is not None:
            return failure, _error(f"scripted failure {failure}", "InternalServerError", failure)
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, _error("Unauthorized", "Unauthorized", 401)
        if method == "GET" and path == "/v1/models":
            return 200, {"object": "list", "data": [{"id": name, "object": "model"} for name in self.models]}
        if method == "POST" and path == "/v1/completions" and isinstance(body, dict):
            return self._complete(body)
        return 404, _error(f"no route {method} {path}", "NotFound", 404)

    def _complete(self, body: Json) -> tuple[int, Json]:
        if body.get("model") not in self.models:
            return 404, _error(f"The model `{body.get('model')}` does not exist.", "NotFoundError", 404)
        if self.gate is not None:
            try:
                self.gate.wait()
            except threading.BrokenBarrierError:
                return 500, _error("the gate broke: requests were not concurrent", "InternalServerError", 500)
        samples = [self.responder(body, index) for index in range(int(body.get("n", 1)))]
        choices: list[Json] = []
        for index, sample in enumerate(samples):
            choice: Json = {
                "index": index,
                "text": sample.text,
                "logprobs": None,
                "finish_reason": sample.finish_reason,
                "stop_reason": None,
            }
            if self.return_token_ids and body.get("return_token_ids"):
                choice["token_ids"] = list(range(sample.tokens))
            choices.append(choice)
        prompt_tokens = self.prompt_tokens(str(body["prompt"]))
        completion_tokens = sum(sample.tokens for sample in samples)
        # vLLM lists choices in completion order, not by index: the client must sort them.
        choices.reverse()
        return 200, {
            "id": "cmpl-fake",
            "object": "text_completion",
            "created": 0,
            "model": body["model"],
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                self._answer("GET")

            def do_POST(self) -> None:
                self._answer("POST")

            def _answer(self, method: str) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = {name.lower(): value for name, value in self.headers.items()}
                status, payload = fake._handle(method, self.path, headers, raw)
                data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the recorded requests are the log."""

        return Handler


def _error(message: str, kind: str, code: int) -> Json:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
