"""What the benchmark's users say and remember, and the bench-only generation setting.

Random weights produce token soup, which the SPEC filters (E.3.4) reject, so a real engine would
retry every task up to its trial budget. `FixedLengthGenerator` makes the comparison about speed
instead: it runs the real generation with the fixed token counts of `bench.config.NEW_TOKENS`,
then hands the engine a well-formed answer in place of the soup, so every task takes exactly
one attempt. The output says so.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from bench.config import NEW_TOKENS
from core.prompts import ANSWER_END, ANSWER_START
from core.types import Embedder, Generation, GenerationRequest, Task, TextGenerator
from models.tiny import training_texts

MESSAGE_TOKENS = (38, 42)
"""Bounds of a user message in LLM tokens: under the 48-token limit, so prompts run about 40-90."""
ANSWER_TOKENS = NEW_TOKENS[Task.OUTPUT_MESSAGE]
ANSWER_TOTAL_TOKENS = 90
"""An output_message trial whose prompt and answer reach 91 tokens is rejected (SPEC E.3.4)."""

_PEOPLE = ("나", "엄마", "아빠", "동생", "언니", "친구 민지", "친구 준호", "강아지 초코", "고양이 나비", "팀장님")
_TOPICS = (
    "좋아하는 음식",
    "취미",
    "생일",
    "사는 곳",
    "좋아하는 색",
    "좋아하는 노래",
    "싫어하는 음식",
    "요즘 고민",
    "주말 계획",
    "좋아하는 계절",
)
_VALUES = ("떡볶이", "등산", "5월 3일", "부산", "하늘색", "봄날", "가지", "이사", "캠핑", "가을", "피아노", "제주도")


def memory_lines(count: int) -> list[str]:
    """`count` distinct "[key: value]" memories with distinct keys (a repeated key would replace)."""
    keys = [f"{person}의 {topic}" for person in _PEOPLE for topic in _TOPICS]
    if count > len(keys):
        raise ValueError(f"at most {len(keys)} distinct memories, not {count}")
    return [f"[{key}: {_VALUES[i % len(_VALUES)]}]" for i, key in enumerate(keys[:count])]


def _inputs_and_answers() -> tuple[list[str], list[str]]:
    inputs, answers = [], []
    for text in training_texts(Task.OUTPUT_MESSAGE):
        prompt, answer = text.split(ANSWER_START, 1)
        inputs.append(prompt.strip())
        answers.append(answer.split(ANSWER_END)[0].replace("### 답변:", "").strip())
    return inputs, answers


def _joined(pieces: Sequence[str], start: int, count_tokens: Callable[[str], int], low: int, high: int) -> str:
    """Consecutive pieces from `start` (cyclically) joined until the text has low..high tokens."""
    text = ""
    for offset in range(len(pieces)):
        candidate = f"{text} {pieces[(start + offset) % len(pieces)]}".strip()
        tokens = count_tokens(candidate)
        if tokens > high:
            continue
        text = candidate
        if tokens >= low:
            return text
    raise ValueError(f"cannot build a text of {low}-{high} tokens from the dataset")


def user_messages(count: int, count_tokens: Callable[[str], int]) -> list[str]:
    """`count` different user messages of MESSAGE_TOKENS tokens, from the shipped dataset."""
    inputs, _ = _inputs_and_answers()
    low, high = MESSAGE_TOKENS
    return [_joined(inputs, 5 * i, count_tokens, low, high) for i in range(count)]


class CannedAnswers:
    """Well-formed continuations, as the trained adapters would write them.

    The answer is as long as the output_message generation (40 tokens) where the SPEC's cap of
    90 tokens for prompt plus answer allows, and shorter after a long prompt, as a trained model
    under that cap writes; nothing to remember; a one-line summary; one face.
    """

    def __init__(self, count_tokens: Callable[[str], int]) -> None:
        self._count_tokens = count_tokens
        _, answers = _inputs_and_answers()
        self._words = " ".join(answers).split()
        self._answers: dict[int, tuple[str, int]] = {}
        self._fixed = {
            Task.MEMORY: f" {ANSWER_END}",
            Task.SUMMARY: f" 오로라와 요즘 일상 이야기를 나눔 {ANSWER_END}",
            Task.EYES_MOUTH_POSE: f" (눈 보통, 입 크게, 고개 돌림 없음) {ANSWER_END}",
        }
        self._fixed_tokens = {task: count_tokens(text) for task, text in self._fixed.items()}

    def answer(self, task: Task, prompt_tokens: int) -> tuple[str, int]:
        """(text, tokens) of the continuation for a prompt of `prompt_tokens` tokens."""
        if task is not Task.OUTPUT_MESSAGE:
            return self._fixed[task], self._fixed_tokens[task]
        limit = min(ANSWER_TOKENS, ANSWER_TOTAL_TOKENS - prompt_tokens)
        if limit not in self._answers:
            self._answers[limit] = self._longest_answer(limit)
        return self._answers[limit]

    def _longest_answer(self, limit: int) -> tuple[str, int]:
        best = (f" {self._words[0]} {ANSWER_END}", self._count_tokens(f" {self._words[0]} {ANSWER_END}"))
        for length in range(2, len(self._words) + 1):
            text = f" {' '.join(self._words[:length])} {ANSWER_END}"
            tokens = self._count_tokens(text)
            if tokens > limit:
                break
            best = (text, tokens)
        return best


@dataclass(frozen=True)
class GenerationRecord:
    """One request as the model ran it."""

    task: Task
    prompt: str
    temperature: float
    prompt_tokens: int
    new_tokens: tuple[int, ...]
    """Tokens actually generated, per sample."""


class FixedLengthGenerator:
    """A `TextGenerator` that runs the real generation at fixed lengths, then answers well-formed.

    Each request is generated with the task's NEW_TOKENS (the SPEC's prompt-plus-answer cap of
    output_message is lifted so that every prompt gets the same 40 tokens); what the engine
    receives is `canned` text with its own token count, which passes the filters at once.
    """

    def __init__(self, inner: TextGenerator, canned: CannedAnswers) -> None:
        self._inner = inner
        self._canned = canned
        self._lock = threading.Lock()
        self.records: list[GenerationRecord] = []
        self.calls = 0

    def count_tokens(self, text: str) -> int:
        return self._inner.count_tokens(text)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        fixed = [replace(r, max_new_tokens=NEW_TOKENS[r.task], max_total_tokens=None) for r in requests]
        results = self._inner.generate(fixed)
        with self._lock:
            self.calls += 1
            for request, samples in zip(requests, results, strict=True):
                self.records.append(
                    GenerationRecord(
                        task=request.task,
                        prompt=request.prompt,
                        temperature=request.temperature,
                        prompt_tokens=samples[0].prompt_tokens if samples else 0,
                        new_tokens=tuple(sample.new_tokens for sample in samples),
                    )
                )
        return [
            [self._canned_generation(request.task, sample.prompt_tokens) for sample in samples]
            for request, samples in zip(requests, results, strict=True)
        ]

    def _canned_generation(self, task: Task, prompt_tokens: int) -> Generation:
        text, tokens = self._canned.answer(task, prompt_tokens)
        return Generation(text=text, prompt_tokens=prompt_tokens, new_tokens=tokens)

    def take_records(self) -> list[GenerationRecord]:
        with self._lock:
            records, self.records = self.records, []
            return records


class CountingEmbedder:
    """Counts encoder calls and texts: the retrieval claim is one call per turn."""

    def __init__(self, inner: Embedder) -> None:
        self._inner = inner
        self.calls = 0
        self.texts = 0

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls += 1
        self.texts += len(texts)
        return self._inner.encode(texts)
