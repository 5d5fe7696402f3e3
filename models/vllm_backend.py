"""The `TextGenerator` over OpenAI-compatible vLLM servers: scaling out is configuration, not code.

Every task is a model name, the task's own name, on some server. Two deployments give that:

- four merged models (`ohlora export-merged`), one `vllm serve` each with
  `--served-model-name <task>` (`merged_serve_commands`). This is the one that works today:
  vLLM's GPT-NeoX implementation has no LoRA support, so it cannot serve the adapters as they are.
- one server with the adapters as LoRA modules, `--lora-modules <task>=<adapter dir>`
  (`lora_serve_command`). Only vLLM's Transformers modelling backend (`--model-impl transformers`)
  could apply LoRA to GPT-NeoX; that path is untested here, so check it against the merged models
  before relying on it.

What goes over the wire keeps the results those of the local backend: upstream's sampling
(temperature per task, top_k 50, top_p 1.0), a task's samples drawn in one request (`n`), a stop
at the end marker that keeps the marker in the text so the task filters see it, and a length
limit computed from `max_total_tokens` with the adapter's own tokenizer. Token counts matter (the
memory filter rejects a sample that hit its limit), so `new_tokens` is exact wherever the server
says it: the choice's `token_ids` (vLLM's `return_token_ids`), else the usage of a one-sample
request, else the limit itself when the choice stopped on length; only when none applies is the
text counted with the local tokenizer.

`generate` is called synchronously from the inference worker's thread; the requests of one call
go out concurrently from a small thread pool, so the server batches them with everything else it
is serving. Tokenizing stays on the calling thread. A request's deadline bounds the wait for its
answer: past it, its samples come back empty (nobody waits for them any more) while the other
requests of the call are answered as usual, so one stalled server cannot hold the worker up.
It also bounds the retries: none starts, or waits, past it.
"""

from __future__ import annotations

import logging
import shlex
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
)
from tenacity.stop import stop_base

from core.prompts import ANSWER_END
from core.types import Generation, GenerationRequest, Task
from models.hub import BASE_MODEL_REPO, RetryPolicy
from models.layout import TASKS, ModelLayout

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

STOP_TEXT = ANSWER_END
"""Where a sample ends, as in the local backend (`models/llm.py`); it stays in the output."""
# transformers' sampling defaults, which upstream generated with (SPEC E.3.3). vLLM's own default
# top_k is "off", so they are always sent.
TOP_K = 50
TOP_P = 1.0

DEFAULT_RETRY = RetryPolicy(attempts=3, first_wait_s=0.5, max_wait_s=4.0)
DEFAULT_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 5.0
DEFAULT_CONCURRENCY = 16

Json = dict[str, Any]


class VllmError(RuntimeError):
    """The vLLM backend cannot answer; the message says what to fix."""


class VllmUnavailable(VllmError):
    """The server could not be reached, or kept failing, after every retry."""


class VllmModelsMissing(VllmError):
    """A server does not serve the model name of a task routed to it."""


class VllmBadResponse(VllmError):
    """The server refused a request (4xx) or answered something that is not a completion."""


@dataclass(frozen=True)
class _Plan:
    """One request as it goes on the wire, with what is needed to read its answer."""

    request: GenerationRequest
    url: str
    prompt_tokens: int
    max_tokens: int

    @property
    def sends(self) -> bool:
        """False when there is nothing to ask: no samples, or a prompt that fills `max_total_tokens`."""
        return self.max_tokens > 0 and self.request.num_samples > 0

    def payload(self) -> Json:
        body: Json = {
            "model": self.request.task.value,
            "prompt": self.request.prompt,
            "max_tokens": self.max_tokens,
            "n": self.request.num_samples,
            "temperature": self.request.temperature,
            "top_p": TOP_P,
            "top_k": TOP_K,
            "stop": [STOP_TEXT],
            "include_stop_str_in_output": True,
            "skip_special_tokens": True,
            "return_token_ids": True,
        }
        if self.request.seed is not None:
            body["seed"] = self.request.seed
        return body


def normalize_base_url(url: str) -> str:
    """The server's root: "http://host:8000", ".../" and the OpenAI-client style ".../v1" are one server."""
    trimmed = url.strip().rstrip("/")
    return trimmed.removesuffix("/v1")


def parse_endpoints(setting: str) -> dict[Task, str]:
    """Which server answers each task, from one setting.

    A single URL serves every task (LoRA modules, or a router in front of the merged models);
    `output_message=http://gpu:8001,memory=http://gpu:8002,...` names one server per task and
    must name all four.
    """
    if "=" not in setting:
        if not setting.strip():
            raise ValueError("the vLLM URL is empty")
        return {task: normalize_base_url(setting) for task in TASKS}
    endpoints: dict[Task, str] = {}
    for part in filter(None, (piece.strip() for piece in setting.split(","))):
        name, _, url = part.partition("=")
        try:
            task = Task(name.strip())
        except ValueError:
            raise ValueError(f"unknown task {name.strip()!r} in the vLLM URL setting") from None
        endpoints[task] = normalize_base_url(url)
    missing = [task.value for task in TASKS if task not in endpoints]
    if missing:
        raise ValueError(f"the vLLM URL setting names no server for {', '.join(missing)}")
    return endpoints


def _is_transient(error: BaseException) -> bool:
    """Worth another try: the connection failed or timed out, or the server had a bad moment."""
    if isinstance(error, httpx.TransportError):
        return True
    return isinstance(error, httpx.HTTPStatusError) and (
        error.response.status_code >= 500 or error.response.status_code == 429
    )


def _error_detail(response: httpx.Response) -> str:
    """vLLM answers errors as {"error": {"message": ...}} (older releases: {"message": ...})."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict):
        inner = body.get("error")
        if isinstance(inner, dict) and "message" in inner:
            return str(inner["message"])
        if "message" in body:
            return str(body["message"])
    return response.text[:300]


class VllmTextGenerator:
    """Oh-LoRA's four task models behind OpenAI-compatible `/v1/completions` endpoints."""

    def __init__(
        self,
        endpoints: Mapping[Task, str],
        tokenizer: PreTrainedTokenizerBase,
        *,
        api_key: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = DEFAULT_RETRY,
        max_concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        missing = [task.value for task in TASKS if task not in endpoints]
        if missing:
            raise ValueError(f"no vLLM server given for {', '.join(missing)}")
        self._endpoints = {task: normalize_base_url(url) for task, url in endpoints.items()}
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        """A fast tokenizer may not be entered from two threads (the event loop counts tokens too)."""
        self._retry = retry
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(CONNECT_TIMEOUT_S, timeout_s)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="vllm-request")

    @property
    def endpoints(self) -> Mapping[Task, str]:
        return dict(self._endpoints)

    # -- the TextGenerator protocol --------------------------------------------------------------

    def count_tokens(self, text: str) -> int:
        with self._tokenizer_lock:
            return len(self._tokenizer(text)["input_ids"])

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        plans = [self._plan(request) for request in requests]
        futures: list[Future[Json] | None] = [
            self._pool.submit(self._call, "POST", plan.url, "/v1/completions", plan.payload(), plan.request.deadline)
            if plan.sends
            else None
            for plan in plans
        ]
        try:
            responses = [
                None if future is None else self._answer(plan, future)
                for plan, future in zip(plans, futures, strict=True)
            ]
        except BaseException:
            for future in futures:
                if future is not None:
                    future.cancel()
            raise
        return [self._read(plan, response) for plan, response in zip(plans, responses, strict=True)]

    # -- start-up check and shutdown -------------------------------------------------------------

    def check_models(self) -> None:
        """Every task's model name is listed by its server's `/v1/models`; one error names all gaps.

        Done once at start-up, so that a misconfigured deployment fails before the first user
        waits for an answer that cannot come.
        """
        by_server: dict[str, list[Task]] = {}
        for task, url in self._endpoints.items():
            by_server.setdefault(url, []).append(task)
        problems: list[str] = []
        for url, tasks in by_server.items():
            served = self.served_models(url)
            absent = [task.value for task in tasks if task.value not in served]
            if absent:
                listed = ", ".join(sorted(served)) or "nothing"
                problems.append(f"{url} does not serve {', '.join(absent)} (it serves: {listed})")
        if problems:
            raise VllmModelsMissing(
                "vLLM is missing task models:\n  "
                + "\n  ".join(problems)
                + "\nEach task must be served under its own name: merged models (`ohlora export-merged`) "
                "with `vllm serve <merged dir> --served-model-name <task>`, or adapters with "
                "`--enable-lora --lora-modules <task>=<adapter dir>`."
            )

    def served_models(self, url: str) -> set[str]:
        body = self._call("GET", url, "/v1/models")
        try:
            return {str(model["id"]) for model in body["data"]}
        except (KeyError, TypeError) as error:
            raise VllmBadResponse(f"{url}/v1/models did not answer a model list: {body!r:.300}") from error

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._http.close()

    def __enter__(self) -> VllmTextGenerator:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------------

    def _plan(self, request: GenerationRequest) -> _Plan:
        prompt_tokens = self.count_tokens(request.prompt)
        max_tokens = request.max_new_tokens
        if request.max_total_tokens is not None:
            max_tokens = min(max_tokens, request.max_total_tokens - prompt_tokens)
        return _Plan(request, self._endpoints[request.task], prompt_tokens, max(max_tokens, 0))

    def _answer(self, plan: _Plan, future: Future[Json]) -> Json | None:
        """The server's answer, or None (empty samples) when it has not come by the request's deadline.

        Only the wait is cut short: the exchange runs on in the pool, bounded by the client's
        timeout and retries.
        """
        deadline = plan.request.deadline
        if deadline is None:
            return future.result()
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            future.cancel()
            logger.warning("no answer from %s for %s by the turn's deadline", plan.url, plan.request.task.value)
            return None

    def _read(self, plan: _Plan, body: Json | None) -> list[Generation]:
        if body is None:
            return [Generation(text="", prompt_tokens=plan.prompt_tokens, new_tokens=0)] * plan.request.num_samples
        try:
            choices = sorted(body["choices"], key=lambda choice: int(choice["index"]))
            usage = body["usage"] if isinstance(body.get("usage"), dict) else {}
            texts = [str(choice["text"]) for choice in choices]
        except (KeyError, TypeError, ValueError) as error:
            raise VllmBadResponse(f"{plan.url}/v1/completions did not answer a completion: {body!r:.300}") from error
        if len(choices) != plan.request.num_samples:
            raise VllmBadResponse(
                f"{plan.url} answered {len(choices)} samples for {plan.request.task.value}, "
                f"{plan.request.num_samples} were asked for"
            )
        prompt_tokens = self._prompt_tokens(plan, usage)
        return [
            Generation(text=text, prompt_tokens=prompt_tokens, new_tokens=self._new_tokens(plan, choice, usage, text))
            for choice, text in zip(choices, texts, strict=True)
        ]

    def _prompt_tokens(self, plan: _Plan, usage: Json) -> int:
        served = usage.get("prompt_tokens")
        if not isinstance(served, int):
            return plan.prompt_tokens
        if served != plan.prompt_tokens:
            logger.warning(
                "the %s server counted %d prompt tokens where the local tokenizer counted %d: "
                "are both using the adapter's tokenizer?",
                plan.request.task.value,
                served,
                plan.prompt_tokens,
            )
        return served

    def _new_tokens(self, plan: _Plan, choice: Json, usage: Json, text: str) -> int:
        token_ids = choice.get("token_ids")
        if isinstance(token_ids, list):
            return len(token_ids)
        completion_tokens = usage.get("completion_tokens")
        if plan.request.num_samples == 1 and isinstance(completion_tokens, int):
            return completion_tokens
        if choice.get("finish_reason") == "length":
            return plan.max_tokens
        with self._tokenizer_lock:
            counted = len(self._tokenizer(text, add_special_tokens=False)["input_ids"])
        return min(counted, plan.max_tokens)

    def _call(
        self, method: str, url: str, path: str, payload: Json | None = None, deadline: float | None = None
    ) -> Json:
        """One HTTP exchange with retries on connection failures and 5xx; errors say what to do.

        No retry starts, or sleeps, past `deadline` (a `time.monotonic()` instant): nobody is
        waiting for the answer by then.
        """

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            logger.warning(
                "%s %s%s failed (attempt %d of %d): %s",
                method,
                url,
                path,
                state.attempt_number,
                self._retry.attempts,
                error,
            )

        def exchange() -> httpx.Response:
            response = self._http.request(method, url + path, json=payload)
            response.raise_for_status()
            return response

        stop: stop_base = stop_after_attempt(self._retry.attempts)
        if deadline is not None:
            stop = stop | stop_before_delay(max(0.0, deadline - time.monotonic()))
        retrying = Retrying(
            stop=stop,
            wait=wait_exponential(multiplier=self._retry.first_wait_s, max=self._retry.max_wait_s),
            retry=retry_if_exception(_is_transient),
            before_sleep=log_retry,
            reraise=True,
        )
        try:
            response = retrying(exchange)
        except httpx.TransportError as error:
            raise VllmUnavailable(
                f"could not reach the vLLM server at {url} after {self._retry.attempts} attempts "
                f"({type(error).__name__}: {error}); is `vllm serve` running there?"
            ) from error
        except httpx.HTTPStatusError as error:
            status = error.response.status_code
            detail = _error_detail(error.response)
            if _is_transient(error):
                raise VllmUnavailable(
                    f"the vLLM server at {url} kept failing ({status}: {detail}) after {self._retry.attempts} attempts"
                ) from error
            raise VllmBadResponse(f"{method} {url}{path} was refused ({status}): {detail}") from error
        try:
            body = response.json()
        except ValueError as error:
            raise VllmBadResponse(
                f"{url}{path} answered something that is not JSON: {response.text[:300]!r}"
            ) from error
        if not isinstance(body, dict):
            raise VllmBadResponse(f"{url}{path} answered {body!r:.300} instead of an object")
        return body


def load_vllm_generator(
    layout: ModelLayout,
    base_url: str | Mapping[Task, str],
    api_key: str | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    retry: RetryPolicy = DEFAULT_RETRY,
    max_concurrency: int = DEFAULT_CONCURRENCY,
) -> VllmTextGenerator:
    """Connect to the configured servers and check that they serve all four tasks.

    `base_url` is the `OHLORA_VLLM_URL` setting (see `parse_endpoints`) or a task → URL mapping.
    Only the tokenizer is loaded locally, from the output_message adapter folder: token counts
    must be the ones the adapters were trained with, as the local backend's are.
    """
    from transformers import AutoTokenizer

    endpoints = parse_endpoints(base_url) if isinstance(base_url, str) else dict(base_url)
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(Task.OUTPUT_MESSAGE), local_files_only=True)
    generator = VllmTextGenerator(
        endpoints, tokenizer, api_key=api_key, timeout_s=timeout_s, retry=retry, max_concurrency=max_concurrency
    )
    try:
        generator.check_models()
    except BaseException:
        generator.close()
        raise
    logger.info(
        "LLM tasks served by vLLM: %s", ", ".join(f"{task.value}@{url}" for task, url in generator.endpoints.items())
    )
    return generator


# ---------------------------------------------------------------------------------------------
# How to start the servers (printed by `ohlora export-merged`, quoted in the README)
# ---------------------------------------------------------------------------------------------

MERGED_GPU_MEMORY_FRACTION = 0.2
"""Four 1.3B servers share one GPU: each takes a fifth for weights and KV cache."""


def merged_serve_commands(
    merged_dirs: Mapping[Task, Path], *, first_port: int = 8001, host: str = "0.0.0.0"
) -> dict[Task, str]:
    """One `vllm serve` per merged model, each on its own port, serving under the task's name."""
    commands: dict[Task, str] = {}
    for offset, task in enumerate(TASKS):
        if task not in merged_dirs:
            continue
        commands[task] = shlex.join(
            [
                "vllm",
                "serve",
                str(merged_dirs[task]),
                "--served-model-name",
                task.value,
                "--host",
                host,
                "--port",
                str(first_port + offset),
                "--dtype",
                "bfloat16",
                "--gpu-memory-utilization",
                str(MERGED_GPU_MEMORY_FRACTION),
            ]
        )
    return commands


def merged_url_setting(host: str, *, first_port: int = 8001) -> str:
    """The `OHLORA_VLLM_URL` value that matches `merged_serve_commands` on `host`."""
    return ",".join(f"{task.value}=http://{host}:{first_port + offset}" for offset, task in enumerate(TASKS))


def lora_serve_command(layout: ModelLayout, *, port: int = 8000, host: str = "0.0.0.0") -> str:
    """One server with the four adapters as LoRA modules (rank 128); untested, see the module docstring."""
    base = str(layout.base_model_dir) if (layout.base_model_dir / "config.json").is_file() else BASE_MODEL_REPO
    modules = [f"{task.value}={layout.adapter_dir(task)}" for task in TASKS]
    return shlex.join(
        [
            "vllm",
            "serve",
            base,
            "--host",
            host,
            "--port",
            str(port),
            "--dtype",
            "bfloat16",
            "--model-impl",
            "transformers",
            "--enable-lora",
            "--max-lora-rank",
            "128",
            "--max-loras",
            str(len(TASKS)),
            "--lora-modules",
            *modules,
        ]
    )
