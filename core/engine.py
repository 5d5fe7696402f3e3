"""One conversation turn of Oh-LoRA v2, for many users at once.

The engine knows the conversation (SPEC E.4), not platforms and not torch: models sit behind the
`InferenceWorker`, storage behind the `Store` protocol. A turn never blocks the event loop, a
user's turns run in order, a full house answers "busy", and a failing or slow model still gets
the user a polite answer while everything already stored stays as it was.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Generic, Protocol, TypeVar

from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from core import prompts
from core.expression import scores_for
from core.keyed_lock import KeyedLocks
from core.ratelimit import RateLimiter
from core.retrieval import best_memory
from core.safety import NOTICES, validate_user_text
from core.store import Footprint, NewMemory, Store, TurnRecord, chat_scope
from core.types import (
    IDLE_SCORES,
    Expression,
    ExpressionScores,
    FaceRequest,
    Generation,
    GenerationRequest,
    IncomingMessage,
    RenderedFace,
    Reply,
    ReplyKind,
    Task,
)
from core.worker import InferenceWorker

logger = logging.getLogger(__name__)

T = TypeVar("T")

Working = Callable[[], AbstractAsyncContextManager[object]]
"""The platform's "working on it" signal (typing…), shown while a turn runs."""

BUSY_TEXT = "앗, 지금 이야기하는 사람이 너무 많아서 정신이 없어! 😵 잠깐 뒤에 다시 말 걸어 줄래?"
TIMEOUT_TEXT = "미안, 생각이 너무 길어졌어 😢 다시 한 번 말해 줄래?"
ERROR_TEXT = "어라, 나 지금 머리가 잠깐 하얘졌어 😢 조금 있다가 다시 말해 줄래?"
RATE_LIMIT_TEXT = "말이 너무 빨라! 😳 나 따라가기 힘들어, 조금만 천천히 보내 줄래?"


STORE_FAILED_ALARM = (
    "⚠️ 데이터베이스에 대화를 저장하지 못했어요 ({error}). 답은 보냈지만 기억, 요약, 기록은 남지 않았어요. "
    "디스크 공간과 OHLORA_DB_PATH 의 권한을 확인해 주세요."
)


@dataclass(frozen=True)
class Refused:
    """A message turned away the moment it arrived, before it waited for anything.

    `notice` is what to tell the user, or None to stay silent: a user is told once, not once per
    message, until a message of theirs is admitted again.
    """

    notice: Reply | None


class Alarm(Protocol):
    """Whoever runs the service, told about a fault only they can fix (a full disk, a locked file)."""

    async def raise_alarm(self, text: str) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    max_prompt_tokens: int = 48
    max_pending_turns: int = 32
    turn_timeout_s: float = 120.0
    memory_threshold: float = 0.95
    parallel_samples: int = 3
    """Retry candidates drawn per batched call; the SPEC's attempt counts stay the limit."""
    rate_limit_per_minute: int = 0
    default_face: int | None = None
    animate: bool = False
    commit_attempts: int = 4
    """Tries at storing a turn (a busy or failing database) before the answer goes out unstored."""


@dataclass
class _TaskRun(Generic[T]):
    """The attempts of one task within a turn (SPEC E.3.3: each task has its own trial budget)."""

    task: Task
    prompt: str
    clean: Callable[[Generation, int], T | None]
    attempts_left: int
    trials: int = 0
    result: T | None = None

    def result_or(self, fallback: T) -> T:
        return fallback if self.result is None else self.result


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


class Engine:
    def __init__(
        self,
        worker: InferenceWorker,
        store: Store,
        options: EngineOptions = EngineOptions(),
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        alarm: Alarm | None = None,
    ) -> None:
        self._worker = worker
        self._store = store
        self._options = options
        self._rng = rng or random.Random()
        self._clock = clock
        self._alarm = alarm
        self._rate_limiter = RateLimiter(options.rate_limit_per_minute)
        self._told_to_slow_down: set[str] = set()
        self._user_locks = KeyedLocks()
        self._pending = 0
        self.started_at = clock()

    @property
    def pending_turns(self) -> int:
        """Turns admitted and not yet answered: the queue depth admins see in stats."""
        return self._pending

    @property
    def users_in_flight(self) -> int:
        """Users with a turn running or waiting; their locks are forgotten afterwards."""
        return len(self._user_locks)

    def faces(self) -> Sequence[int]:
        return self._worker.renderer.faces()

    def admit(self, user_key: str) -> Refused | None:
        """Whether a message (or a command that uses a model) may wait for a turn at all.

        Decided at once and without awaiting, so a flood is turned away before its messages
        queue behind each other, show "typing…" or cost the platform one notice each.
        """
        if self._rate_limiter.allow(user_key):
            self._told_to_slow_down.discard(user_key)
            return None
        if user_key in self._told_to_slow_down:
            return Refused(notice=None)
        self._told_to_slow_down.add(user_key)
        return Refused(notice=Reply(text=RATE_LIMIT_TEXT, kind=ReplyKind.NOTICE))

    async def reply(self, message: IncomingMessage, working: Working | None = None) -> Reply:
        """Answer one admitted message; every outcome is a Reply, never an exception.

        The user's place in line is taken before the first await, so a user's messages are
        answered in the order they arrived. `working` (the platform's "typing…") is entered once
        the turn itself starts, not while it waits behind the user's earlier ones.
        """
        if self._pending >= self._options.max_pending_turns:
            return Reply(text=BUSY_TEXT, kind=ReplyKind.BUSY)
        self._pending += 1
        try:
            async with self._user_locks.hold(message.user_key):
                if working is None:
                    return await self._guarded_turn(message)
                async with working():
                    return await self._guarded_turn(message)
        finally:
            self._pending -= 1

    async def render_current_face(self, platform: str, chat_id: str, user_key: str) -> RenderedFace:
        """The face as the user last saw it, for `/face`: in the user's line, like a turn."""

        async def render() -> RenderedFace:
            face = await self._face_for_chat(platform, chat_id)
            scores = await self._store.last_scores(user_key) or IDLE_SCORES
            return await self._worker.render(FaceRequest(face=face, scores=scores))

        return await self._in_line(user_key, render)

    async def forget_user(self, user_key: str) -> Footprint:
        """Forget everything about a user, in the user's line: a turn already running commits
        first and is forgotten with the rest; nothing computed before can be written back after."""
        return await self._in_line(user_key, lambda: self._store.forget_user(user_key))

    async def forget_memory(self, user_key: str, key: str) -> int:
        """Delete one memory, in the user's line (a running turn cannot write it back after)."""
        return await self._in_line(user_key, lambda: self._store.delete_memories(user_key, key))

    async def _in_line(self, user_key: str, change: Callable[[], Awaitable[T]]) -> T:
        """Run `change` after the user's earlier turns and commands; the busy count sees it waiting."""
        self._pending += 1
        try:
            async with self._user_locks.hold(user_key):
                return await change()
        finally:
            self._pending -= 1

    async def move_chat(self, platform: str, old_chat_id: str, new_chat_id: str) -> None:
        """A chat got a new id: its summaries and pinned face go with it."""
        await self._store.move_chat(platform, old_chat_id, new_chat_id)

    async def _guarded_turn(self, message: IncomingMessage) -> Reply:
        """The turn under its deadline; any failure (a model that raised or stalled) is an apology."""
        timer = _Timer()
        # The instant the turn is given up on, read on time.monotonic() (asyncio's timeouts run on
        # that clock too): generators stop there instead of finishing work nobody will wait for.
        deadline = time.monotonic() + self._options.turn_timeout_s
        try:
            return await asyncio.wait_for(self._turn(message, timer, deadline), self._options.turn_timeout_s)
        except TimeoutError:
            logger.warning("turn of %s passed the %.0f s deadline", message.user_key, self._options.turn_timeout_s)
            await self._log_failed_turn(message, "timeout", timer)
            return Reply(text=TIMEOUT_TEXT, kind=ReplyKind.ERROR, timings=timer.timings)
        except Exception:
            logger.exception("turn of %s failed", message.user_key)
            await self._log_failed_turn(message, "error", timer)
            return Reply(text=ERROR_TEXT, kind=ReplyKind.ERROR, timings=timer.timings)

    async def _turn(self, message: IncomingMessage, timer: _Timer, deadline: float) -> Reply:
        with timer.stage("validate"):
            check = await self._worker.call(
                lambda: validate_user_text(
                    message.text, self._worker.generator.count_tokens, self._options.max_prompt_tokens
                )
            )
        if check.problem is not None:
            return Reply(text=NOTICES[check.problem], kind=ReplyKind.NOTICE, timings=timer.timings)
        user_text = check.text

        with timer.stage("retrieve"):
            memory = await self._retrieve(message.user_key, user_text)
            summary = await self._store.summary(message.conversation_key)
        final_input = prompts.compose_final_input(user_text, memory, summary)

        with timer.stage("answer"):
            answer_run = self._task_run(Task.OUTPUT_MESSAGE, final_input, prompts.clean_output_message)
            memory_run = self._task_run(Task.MEMORY, final_input, _memory_cleaner())
            # Forwarded words are someone else's: nothing in them is a memory of the sender.
            await self._run_tasks([answer_run] if message.forwarded else [answer_run, memory_run], deadline)
        answer = answer_run.result_or(prompts.FALLBACK_OUTPUT_MESSAGE)

        with timer.stage("reflect"):
            summary_run = self._task_run(Task.SUMMARY, final_input, _summary_cleaner(), answer)
            expression_run = self._task_run(Task.EYES_MOUTH_POSE, final_input, _expression_parser, answer)
            await self._run_tasks([summary_run, expression_run], deadline)
        new_summary = summary_run.result_or(prompts.FALLBACK_SUMMARY)
        expression = expression_run.result_or(prompts.FALLBACK_EXPRESSION)
        scores = scores_for(expression, self._rng)

        new_memory = None
        item = memory_run.result_or(prompts.FALLBACK_MEMORY).item
        if item is not None:
            with timer.stage("embed"):
                embedding = (await self._worker.encode([item.text]))[0]
            new_memory = NewMemory(key=item.key, value=item.value, text=item.text, embedding=embedding)

        with timer.stage("render"):
            image = await self._render(message, scores)

        timings = {**timer.timings, "total": sum(timer.timings.values())}
        reply = Reply(
            text=answer.strip() or answer,
            kind=ReplyKind.ANSWER,
            image=image,
            expression=expression,
            scores=scores,
            used_memory=memory,
            summary=new_summary,
            timings=timings,
        )
        record = TurnRecord(
            platform=message.platform,
            user_key=message.user_key,
            conversation_key=message.conversation_key,
            prompt=user_text,
            final_input=final_input,
            answer=answer,
            status="ok",
            used_memory=memory,
            expression=expression,
            scores=scores,
            summary=new_summary,
            timings=timings,
            created_at=self._clock(),
            event_id=message.event_id,
            reply=reply,
        )
        # Shielded: a deadline or shutdown that lands now must not cut the transaction in half.
        await asyncio.shield(self._commit(record, new_memory))
        return reply

    async def _commit(self, record: TurnRecord, new_memory: NewMemory | None) -> None:
        """Store the turn, retrying a busy or failing database; the answer goes out either way.

        The user has waited for this answer and it is already computed: losing the turn's memory
        is better than losing the answer. The operators are told, since only they can free a
        disk or a lock.
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._options.commit_attempts),
            wait=wait_exponential(multiplier=0.25, max=2.0),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._store.commit_turn(record, new_memory)
        except Exception as error:
            logger.error(
                "could not store the turn of %s after %d attempts; answering anyway",
                record.user_key,
                self._options.commit_attempts,
                exc_info=error,
            )
            if self._alarm is not None:
                await self._alarm.raise_alarm(STORE_FAILED_ALARM.format(error=error))

    async def _retrieve(self, user_key: str, user_text: str) -> str | None:
        """Only this user's memories are ever candidates; an empty store costs no encoder call."""
        memories = await self._store.memories(user_key)
        if not memories:
            return None
        query = (await self._worker.encode([user_text]))[0]
        match = best_memory(
            query,
            [memory.text for memory in memories],
            [memory.embedding for memory in memories],
            self._options.memory_threshold,
        )
        return match.text if match else None

    @staticmethod
    def _task_run(
        task: Task, final_input: str, clean: Callable[[Generation, int], T | None], answer: str | None = None
    ) -> _TaskRun[T]:
        return _TaskRun(
            task=task,
            prompt=prompts.task_prompt(task, final_input, answer),
            clean=clean,
            attempts_left=prompts.TASK_SETTINGS[task].attempts,
        )

    async def _run_tasks(self, runs: Sequence[_TaskRun[Any]], deadline: float) -> None:
        """Draw candidates for every unfinished task in one batched call per round.

        Each round asks for up to `parallel_samples` candidates per task, taken in order as the
        original's successive trials were, so the SPEC's trial budgets and first-trial rule hold.
        Every request carries the turn's deadline, so a generator can stop when the turn gives up.
        """
        while pending := [run for run in runs if run.result is None and run.attempts_left > 0]:
            requests: list[GenerationRequest] = [
                replace(
                    prompts.build_request(
                        run.task, run.prompt, num_samples=min(self._options.parallel_samples, run.attempts_left)
                    ),
                    deadline=deadline,
                )
                for run in pending
            ]
            results = await self._worker.generate(requests)
            for run, samples in zip(pending, results, strict=True):
                for generation in samples:
                    trial, run.trials, run.attempts_left = run.trials, run.trials + 1, run.attempts_left - 1
                    cleaned = run.clean(generation, trial)
                    if cleaned is not None:
                        run.result = cleaned
                        break
                else:
                    logger.debug("%s: %d trials rejected so far", run.task.value, run.trials)

    async def _render(self, message: IncomingMessage, scores: ExpressionScores) -> RenderedFace | None:
        """A face that fails to render costs the picture, not the answer."""
        previous = await self._store.last_scores(message.user_key)
        request = FaceRequest(
            face=await self._face_for_chat(message.platform, message.chat_id),
            scores=scores,
            previous=previous or IDLE_SCORES,
            animate=self._options.animate,
        )
        try:
            return await self._worker.render(request)
        except Exception:
            logger.exception("rendering the face failed")
            return None

    async def set_face(self, platform: str, chat_id: str, face: int | None) -> None:
        """Admins pin a chat's face; None goes back to the default."""
        if face is not None and face not in self.faces():
            raise ValueError(f"unknown face {face}; choose one of {', '.join(map(str, self.faces()))}")
        await self._store.set_face(chat_scope(platform, chat_id), face)

    async def _face_for_chat(self, platform: str, chat_id: str) -> int:
        """A chat keeps one face: the pinned one, the configured default, or a random pick kept."""
        scope = chat_scope(platform, chat_id)
        face = await self._store.face_for(scope)
        if face is None:
            face = self._options.default_face
        if face is None:
            face = self._rng.choice(list(self.faces()))
            await self._store.set_face(scope, face)
        return face

    async def _log_failed_turn(self, message: IncomingMessage, status: str, timer: _Timer) -> None:
        """Admins see failed turns in the log; nothing the user had stored is touched."""
        try:
            await self._store.commit_turn(
                TurnRecord(
                    platform=message.platform,
                    user_key=message.user_key,
                    conversation_key=message.conversation_key,
                    prompt=message.text,
                    final_input="",
                    answer="",
                    status=status,
                    used_memory=None,
                    expression=None,
                    scores=None,
                    summary=None,
                    timings={**timer.timings, "total": sum(timer.timings.values())},
                    created_at=self._clock(),
                ),
                None,
            )
        except Exception:
            logger.exception("could not log the failed turn")


def _memory_cleaner() -> Callable[[Generation, int], prompts.MemoryResult | None]:
    limit = prompts.TASK_SETTINGS[Task.MEMORY].max_new_tokens
    return lambda generation, _: prompts.clean_memory(generation, limit)


def _summary_cleaner() -> Callable[[Generation, int], str | None]:
    limit = prompts.TASK_SETTINGS[Task.SUMMARY].max_new_tokens
    return lambda generation, _: prompts.clean_summary(generation, limit)


def _expression_parser(generation: Generation, _trial: int) -> Expression | None:
    return prompts.parse_eyes_mouth_pose(generation)
