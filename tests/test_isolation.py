"""Isolation under load: 1,000 interleaved turns of 50 users, and nobody ever sees anyone else.

Every user's text carries a secret token of that user, and the fake adapters echo every token
they are shown: the answer and the summary repeat the tokens of their prompt, the memory adapter
stores the user's own token. So a memory, summary or expression that crossed from one user to
another would show up as a foreign token in a prompt, a reply or a stored row, and a foreign
expression as a face eased from the wrong "previous" scores.

Users are the same numeric ids on Telegram and Discord (so only the platform tells them apart),
they share group chats, and they all talk at once, so the inference worker merges requests of
different users into one batch. The checks are also run against deliberately leaky stores, to
show that each kind of leak would be caught.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.engine import EngineOptions
from core.store import InMemoryStore, NewMemory, SqliteStore, Store, StoredMemory, TurnRecord
from core.types import IDLE_SCORES, ExpressionScores, GenerationRequest, IncomingMessage, Reply, ReplyKind, Task
from tests.fakes import END, FakeEmbedder, FakeGenerator, Harness, make_harness

PLATFORMS = ("telegram", "discord")
TOKEN = re.compile(r"SECRET[TD]\d{2}X")
ANSWER_START = " (답변 시작)"
QUESTION = "(사용자 질문) "


def token_of(platform: str, user_id: str) -> str:
    """The user's secret; telegram:7 and discord:7 are different people with different secrets."""
    return f"SECRET{platform[0].upper()}{int(user_id):02d}X"


def tokens_in(*texts: str | None) -> set[str]:
    return {token for text in texts if text for token in TOKEN.findall(text)}


def _ordered_tokens(text: str) -> str:
    return " ".join(dict.fromkeys(TOKEN.findall(text)))


def _user_segment(prompt: str) -> str:
    """The user's words in a question prompt: after any memory or summary, before the end marker."""
    text = prompt.removesuffix(ANSWER_START)
    if QUESTION in text:
        text = text.split(QUESTION, 1)[1]
    return re.sub(r"^\[[^\]]*\]\s*", "", text)


def _answer(request: GenerationRequest) -> str:
    return f" 알겠어 {_ordered_tokens(request.prompt)} 기억할게{END}"


def _memory(request: GenerationRequest) -> str:
    said = _user_segment(request.prompt)
    own = _ordered_tokens(said)
    if "비밀은" in said:
        return f" [비밀: {own}]{END}"
    if "취미는" in said:
        return f" [취미: {own} 수집]{END}"
    return f" {END}"


def _summary(request: GenerationRequest) -> str:
    return f" {_ordered_tokens(request.prompt)} 이야기{END}"


def echoing_generator() -> FakeGenerator:
    return FakeGenerator(scripts={Task.OUTPUT_MESSAGE: _answer, Task.MEMORY: _memory, Task.SUMMARY: _summary})


SAYINGS = (
    "내 비밀은 {token}야",
    "{token} 오늘 좀 피곤했어",
    "내 비밀 기억나? {token}",
    "내 취미는 {token} 수집이야",
    "취미 얘기 하자 {token}",
    "{token} 그냥 심심해서 말 걸어 봤어",
)
"""Store a memory, lean on the summary, retrieve the memory (topics 비밀 and 취미 embed alike)."""


def conversation_plan(
    users_per_platform: int, turns_per_user: int, groups: int, seed: int
) -> dict[str, list[IncomingMessage]]:
    """Each user's messages in order: DMs and shared group chats, both platforms, same ids."""
    rng = random.Random(seed)
    plan: dict[str, list[IncomingMessage]] = {}
    for platform in PLATFORMS:
        for number in range(users_per_platform):
            user_id = str(number)
            token = token_of(platform, user_id)
            group = f"group-{number % groups}"
            plan[f"{platform}:{user_id}"] = [
                IncomingMessage(
                    platform=platform,
                    user_id=user_id,
                    chat_id=group if rng.random() < 0.5 else user_id,
                    text=SAYINGS[(turn + number) % len(SAYINGS)].format(token=token),
                )
                for turn in range(turns_per_user)
            ]
    return plan


@dataclass(frozen=True)
class Turn:
    message: IncomingMessage
    reply: Reply


async def talk_at_once(harness: Harness, plan: dict[str, list[IncomingMessage]], seed: int) -> dict[str, list[Turn]]:
    """Every user at the same time, each user's own turns one after another."""
    rng = random.Random(seed)
    pauses = {user: [rng.random() < 0.3 for _ in messages] for user, messages in plan.items()}

    async def user_session(user: str) -> list[Turn]:
        turns = []
        for message, pause in zip(plan[user], pauses[user], strict=True):
            turns.append(Turn(message, await harness.engine.reply(message)))
            if pause:  # vary the interleaving beyond what the worker's timing gives
                await asyncio.sleep(0)
        return turns

    sessions = await asyncio.gather(*(user_session(user) for user in plan))
    return dict(zip(plan, sessions, strict=True))


async def isolation_violations(harness: Harness, turns: dict[str, list[Turn]]) -> list[str]:
    """Every place one user's data reached another: prompts, replies, faces, stored rows."""
    owner = {user: token_of(*user.split(":")) for user in turns}
    problems: list[str] = []

    for call in harness.generator.calls:
        for request in call:
            found = tokens_in(request.prompt)
            if len(found) != 1:
                problems.append(f"{request.task.value} prompt with tokens {sorted(found)}: {request.prompt!r}")

    requests_by_scores = {request.scores: request for request in harness.renderer.requests}
    for user, session in turns.items():
        previous = IDLE_SCORES
        for turn in session:
            reply = turn.reply
            foreign = tokens_in(reply.text, reply.used_memory, reply.summary) - {owner[user]}
            if foreign:
                problems.append(f"{user} was told {sorted(foreign)}: {reply}")
            if reply.scores is None:
                continue
            rendered = requests_by_scores[reply.scores]
            if rendered.previous != previous:
                problems.append(f"{user}'s face eased from {rendered.previous}, not from {previous}")
            previous = reply.scores

    store = harness.store
    for user, session in turns.items():
        stored: list[str | None] = [memory.text for memory in await store.memories(user)]
        stored += [await store.summary(turn.message.conversation_key) for turn in session]
        stored += [
            text
            for row in await store.recent_turns(user, len(session) + 1)
            for text in (row.prompt, row.final_input, row.answer, row.used_memory)
        ]
        foreign = tokens_in(*stored) - {owner[user]}
        if foreign:
            problems.append(f"{user}'s stored data holds {sorted(foreign)}")
    return problems


def coverage(harness: Harness, turns: dict[str, list[Turn]]) -> tuple[int, int, int]:
    """(turns that used a memory, prompts built on a summary, batches that mixed users)."""
    used_memory = sum(1 for session in turns.values() for turn in session if turn.reply.used_memory)
    on_summary = sum(1 for request in harness.generator.requests_for(Task.OUTPUT_MESSAGE) if QUESTION in request.prompt)
    mixed = sum(1 for call in harness.generator.calls if len(tokens_in(*(r.prompt for r in call))) > 1)
    return used_memory, on_summary, mixed


@pytest.mark.slow
async def test_a_thousand_interleaved_turns_of_fifty_users_never_cross(tmp_path: Path) -> None:
    plan = conversation_plan(users_per_platform=25, turns_per_user=20, groups=5, seed=1)
    assert len(plan) == 50 and sum(len(messages) for messages in plan.values()) == 1000
    store = await SqliteStore.open(tmp_path / "ohlora.sqlite3")
    harness = make_harness(
        store=store,
        generator=echoing_generator(),
        embedder=FakeEmbedder(topics=("비밀", "취미")),
        options=EngineOptions(max_pending_turns=len(plan)),
    )
    try:
        turns = await talk_at_once(harness, plan, seed=2)

        assert all(turn.reply.kind is ReplyKind.ANSWER for session in turns.values() for turn in session)
        assert await isolation_violations(harness, turns) == []
        used_memory, on_summary, mixed = coverage(harness, turns)
        assert used_memory >= 300, "retrieval should have fired on most turns about a secret or a hobby"
        assert on_summary >= 100, "prompts should have been built on running summaries"
        assert mixed >= 10, "the worker should have merged different users' requests into one batch"
        for user, session in turns.items():
            logged = [row.prompt for row in reversed(await store.recent_turns(user, 100))]
            assert logged == [turn.message.text for turn in session], f"{user}'s turns ran out of order"
            secret = token_of(*user.split(":"))
            assert sorted(m.text for m in await store.memories(user)) == [f"[비밀: {secret}]", f"[취미: {secret} 수집]"]
    finally:
        await harness.worker.stop()
        await store.close()


# --------------------------------------------------------------------------------------------
# The checks catch each kind of leak


class LeakyMemories(InMemoryStore):
    """Retrieval candidates from everyone, as a query without its WHERE user_key would give."""

    async def memories(self, user_key: str) -> list[StoredMemory]:
        return [memory for memories in self._memories.values() for memory in memories]


class LeakySummaries(InMemoryStore):
    """The summary of whoever last spoke in the same chat, as a key without the user would give."""

    async def summary(self, conversation_key: str) -> str:
        chat = conversation_key.rsplit(":", 1)[0]
        texts = [stored.text for key, stored in self._summaries.items() if key.rsplit(":", 1)[0] == chat]
        return texts[-1] if texts else ""


class LeakyExpressions(InMemoryStore):
    """The last expression stored for anyone."""

    def __init__(self) -> None:
        super().__init__()
        self._latest: ExpressionScores | None = None

    async def commit_turn(self, turn: TurnRecord, new_memory: NewMemory | None) -> None:
        await super().commit_turn(turn, new_memory)
        if turn.scores is not None:
            self._latest = turn.scores

    async def last_scores(self, user_key: str) -> ExpressionScores | None:
        return self._latest


@pytest.mark.parametrize("store_type", [LeakyMemories, LeakySummaries, LeakyExpressions])
async def test_the_checks_catch_a_leaking_store(store_type: type[Store]) -> None:
    plan = conversation_plan(users_per_platform=3, turns_per_user=6, groups=1, seed=3)
    harness = make_harness(
        store=store_type(),
        generator=echoing_generator(),
        embedder=FakeEmbedder(topics=("비밀", "취미")),
        options=EngineOptions(max_pending_turns=len(plan)),
    )
    try:
        turns = await talk_at_once(harness, plan, seed=4)
    finally:
        await harness.worker.stop()

    assert await isolation_violations(harness, turns) != []


def test_tokens_are_told_apart() -> None:
    tokens = sorted({token_of(platform, str(number)) for platform in PLATFORMS for number in range(25)})
    assert len(tokens) == 50
    assert all(tokens_in(f"x{token}y") == {token} for token in tokens)
    assert not any(a in b for a in tokens for b in tokens if a != b)


def test_the_plan_shares_groups_across_users_and_platforms() -> None:
    plan = conversation_plan(users_per_platform=25, turns_per_user=20, groups=5, seed=1)
    members: dict[str, set[str]] = defaultdict(set)
    for messages in plan.values():
        for message in messages:
            members[message.chat_id].add(message.user_key)
    group_members = [users for chat, users in members.items() if chat.startswith("group-")]
    assert len(group_members) == 5
    assert all(len(users) == 10 and {user.split(":")[0] for user in users} == set(PLATFORMS) for users in group_members)
