"""`ohlora bench`: the workload it drives and a smoke run on toy widths (never the real bench)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest

from bench.build import bench_llm_tokenizer
from bench.config import NEW_TOKENS, QUICK, TINY
from bench.workload import (
    ANSWER_TOTAL_TOKENS,
    MESSAGE_TOKENS,
    CannedAnswers,
    CountingEmbedder,
    FixedLengthGenerator,
    memory_lines,
    user_messages,
)
from core import prompts
from core.engine import EngineOptions
from core.prompts import ANSWER_END, CONTROL_MARKERS, END_OF_TEXT, parse_memory_line
from core.types import Generation, GenerationRequest, IncomingMessage, ReplyKind, Task
from tests.conftest import REPO_ROOT
from tests.fakes import FakeEmbedder, make_harness

REQUIRED_KEYS = (
    "turn_s.ours",
    "turn_s.seed_style",
    "rss_gb.ours",
    "rss_gb.seed_style",
    "ratios.turn_speedup",
    "ratios.rss",
    "decode.tok_s",
    "decode.bandwidth_limit_tok_s",
    "retrieval.encoder_calls_per_turn",
    "face.ms_per_frame",
    "face.ms_per_frame_fp32_reference",
    "concurrency.users",
    "concurrency.turns_per_s",
    "concurrency.serial_turns_per_s",
)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return bench_llm_tokenizer(QUICK.llm)


def count(tokenizer: Any) -> Any:
    return lambda text: len(tokenizer.encode(text))


def test_the_tokenizer_has_the_real_vocabulary_size_and_whole_markers(tokenizer: Any) -> None:
    assert len(tokenizer) == 30080
    for marker in CONTROL_MARKERS:
        if marker != END_OF_TEXT:
            assert len(tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    text = "안녕 오로라! 오늘 비 와서 우울해 (답변 시작)"
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_memories_are_distinct_stored_lines() -> None:
    lines = memory_lines(100)
    items = [parse_memory_line(line) for line in lines]
    assert all(item is not None for item in items)
    assert len({item.key for item in items if item}) == 100
    with pytest.raises(ValueError):
        memory_lines(101)


def test_user_messages_fit_the_prompt_limit(tokenizer: Any) -> None:
    messages = user_messages(9, count(tokenizer))
    assert len(set(messages)) == 9
    low, high = MESSAGE_TOKENS
    assert all(low <= count(tokenizer)(message) <= high for message in messages)
    assert high <= EngineOptions().max_prompt_tokens


@pytest.mark.parametrize("prompt_tokens", [40, 60, 75])
def test_canned_answers_pass_every_filter_at_once(tokenizer: Any, prompt_tokens: int) -> None:
    canned = CannedAnswers(count(tokenizer))
    text, tokens = canned.answer(Task.OUTPUT_MESSAGE, prompt_tokens)
    assert tokens == count(tokenizer)(text)
    assert tokens <= min(NEW_TOKENS[Task.OUTPUT_MESSAGE], ANSWER_TOTAL_TOKENS - prompt_tokens)
    assert prompts.clean_output_message(Generation(text, prompt_tokens, tokens), 0)
    memory, memory_tokens = canned.answer(Task.MEMORY, prompt_tokens)
    assert prompts.clean_memory(Generation(memory, prompt_tokens, memory_tokens), NEW_TOKENS[Task.MEMORY]) == (
        prompts.MemoryResult(item=None)
    )
    summary, summary_tokens = canned.answer(Task.SUMMARY, prompt_tokens)
    assert prompts.clean_summary(Generation(summary, prompt_tokens, summary_tokens), NEW_TOKENS[Task.SUMMARY])
    face, face_tokens = canned.answer(Task.EYES_MOUTH_POSE, prompt_tokens)
    assert prompts.parse_eyes_mouth_pose(Generation(face, prompt_tokens, face_tokens))


class RecordingGenerator:
    """Generates nothing sensible, exactly as many tokens as asked: a random-weight model."""

    def __init__(self) -> None:
        self.requests: list[GenerationRequest] = []

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        self.requests += requests
        return [
            [Generation("쓰레기 " * request.max_new_tokens, len(request.prompt.split()), request.max_new_tokens)]
            * request.num_samples
            for request in requests
        ]


async def test_the_engine_takes_one_attempt_per_task_at_the_fixed_lengths() -> None:
    inner = RecordingGenerator()
    generator = FixedLengthGenerator(inner, CannedAnswers(inner.count_tokens))
    counter = CountingEmbedder(FakeEmbedder())
    harness = make_harness(generator=generator, embedder=counter, options=EngineOptions(parallel_samples=1))  # type: ignore[arg-type]
    try:
        reply = await harness.engine.reply(IncomingMessage("bench", "u", "u", "오늘 날씨 너무 좋다 " * 6))
    finally:
        await harness.worker.stop()
    assert reply.kind is ReplyKind.ANSWER and ANSWER_END not in reply.text
    assert [request.task for request in inner.requests] == list(Task)
    assert all(request.max_new_tokens == NEW_TOKENS[request.task] for request in inner.requests)
    assert all(request.max_total_tokens is None for request in inner.requests)
    records = generator.take_records()
    assert [record.new_tokens for record in records] == [(NEW_TOKENS[task],) for task in Task]
    assert generator.take_records() == []
    assert counter.calls == 0  # no stored memories: nothing to compare against


def test_profiles_state_what_they_cut() -> None:
    assert QUICK.cuts() == ""
    assert "hidden 64 (real 2048)" in TINY.cuts()
    assert QUICK.measured_turns <= QUICK.serial_turns


def test_bench_tiny_prints_every_key() -> None:
    """The smoke run: the real code paths on toy widths, in about a minute."""
    completed = subprocess.run(
        [sys.executable, "-m", "bench", "--tiny", "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout)
    for key in REQUIRED_KEYS:
        value: Any = result
        for part in key.split("."):
            value = value[part]
        assert isinstance(value, int | float) and value >= 0, key
    assert result["ratios"]["turn_speedup"] == pytest.approx(result["turn_s"]["seed_style"] / result["turn_s"]["ours"])
    assert result["ratios"]["rss"] == pytest.approx(result["rss_gb"]["ours"] / result["rss_gb"]["seed_style"])
    assert result["retrieval"]["encoder_calls_per_turn"] == 1
    assert result["retrieval"]["seed_style_encoder_calls_per_turn"] == 1 + TINY.memories
    assert result["concurrency"]["users"] == TINY.users
    assert result["workload"]["attempts_per_task"] == 1
    assert result["workload"]["new_tokens_per_turn"] == {
        "ours": sum(NEW_TOKENS.values()),
        "seed_style": sum(NEW_TOKENS.values()),
    }
    assert len(result["targets"]) == 6 and all(isinstance(target["pass"], bool) for target in result["targets"])
    assert result["profile"]["profile"] == "tiny"
