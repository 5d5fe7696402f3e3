"""Fake models for logic tests: deterministic, instant, and scriptable to misbehave.

They implement the core protocols exactly, so the engine, the worker and the bots run their real
code paths against them.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from core.engine import Alarm, Engine, EngineOptions
from core.store import InMemoryStore, Store
from core.types import FaceRequest, Generation, GenerationRequest, RenderedFace, Task
from core.worker import InferenceWorker

END = " (답변 종료)"
FACES = (127, 931, 1277)

Script = Callable[[GenerationRequest], str]
"""Returns the raw continuation for one sample of a request (end marker included or not)."""


def _user_text(prompt: str) -> str:
    """The user's words inside a final input, whatever prefix the engine put before them."""
    text = prompt.split(" (답변 시작)")[0]
    text = text.split(" (오로라 답변)")[0]
    if "(사용자 질문) " in text:
        text = text.split("(사용자 질문) ", 1)[1]
    return re.sub(r"^\[[^\]]*\]\s*", "", text)


@dataclass
class FakeGenerator:
    """Answers like a well-trained Oh-LoRA: valid formats, memories from `memory_rules`.

    `scripts` replaces a task's behaviour (for malformed output); `fail` raises; `delay_s` blocks
    the worker thread as a slow model would.
    """

    memory_rules: Mapping[str, str] = field(default_factory=lambda: {"떡볶이": "[좋아하는 음식: 떡볶이]"})
    scripts: dict[Task, Script] = field(default_factory=dict)
    fail: Exception | None = None
    delay_s: float = 0.0
    calls: list[list[GenerationRequest]] = field(default_factory=list)
    release: threading.Event | None = None
    """When set, every call waits for this event first: lets a test hold the model busy."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        self.calls.append(list(requests))
        if self.release is not None:
            self.release.wait(timeout=30)
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if self.fail is not None:
            raise self.fail
        return [[self._sample(request) for _ in range(request.num_samples)] for request in requests]

    def count_tokens(self, text: str) -> int:
        return len(text.split())

    def requests_for(self, task: Task) -> list[GenerationRequest]:
        return [request for call in self.calls for request in call if request.task is task]

    def _sample(self, request: GenerationRequest) -> Generation:
        script = self.scripts.get(request.task, self._default)
        text = script(request)
        return Generation(
            text=text, prompt_tokens=self.count_tokens(request.prompt), new_tokens=max(1, len(text.split()))
        )

    def _default(self, request: GenerationRequest) -> str:
        user_text = _user_text(request.prompt)
        if request.task is Task.OUTPUT_MESSAGE:
            return f" 그렇구나! {user_text[:12]} 얘기 더 해 줘.{END}"
        if request.task is Task.MEMORY:
            for needle, memory in self.memory_rules.items():
                if needle in user_text:
                    return f" {memory}{END}"
            return f" {END}"
        if request.task is Task.SUMMARY:
            return f" {user_text[:10]} 이야기{END}"
        return f" (눈 보통, 입 크게, 고개 돌림 없음){END}"


class FakeEmbedder:
    """Texts sharing a topic word embed identically (cosine 1); others land on hashed axes."""

    def __init__(self, topics: Sequence[str] = ("음식", "이름", "취미", "날씨")) -> None:
        self._topics = tuple(topics)
        self._hash_dims = 64
        self.calls: list[list[str]] = []

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        rows = np.zeros((len(texts), len(self._topics) + self._hash_dims), dtype=np.float32)
        for row, text in zip(rows, texts, strict=True):
            hits = [i for i, topic in enumerate(self._topics) if topic in text]
            if hits:
                row[hits] = 1.0
            else:
                digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
                row[len(self._topics) + digest % self._hash_dims] = 1.0
        return rows / np.linalg.norm(rows, axis=1, keepdims=True)


class FakeRenderer:
    """A 4×4 PNG whose colour encodes the scores; records every request."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.requests: list[FaceRequest] = []
        self.fail = fail

    def faces(self) -> Sequence[int]:
        return FACES

    def render(self, request: FaceRequest) -> RenderedFace:
        self.requests.append(request)
        if self.fail is not None:
            raise self.fail
        face = request.face if request.face is not None else FACES[0]
        colour = tuple(
            int(128 + 60 * v) % 256 for v in (request.scores.eyes, request.scores.mouth, request.scores.pose)
        )
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), colour).save(buffer, format="PNG")
        return RenderedFace(data=buffer.getvalue(), mime_type="image/png", face=face)


@dataclass
class Harness:
    engine: Engine
    worker: InferenceWorker
    store: Store
    generator: FakeGenerator
    embedder: FakeEmbedder
    renderer: FakeRenderer


def make_harness(
    *,
    store: Store | None = None,
    generator: FakeGenerator | None = None,
    embedder: FakeEmbedder | None = None,
    renderer: FakeRenderer | None = None,
    options: EngineOptions | None = None,
    seed: int = 0,
    stall_after_s: float | None = None,
    alarm: Alarm | None = None,
) -> Harness:
    """A started worker and an engine over fakes; the caller stops the worker."""
    import random

    generator = generator or FakeGenerator()
    embedder = embedder or FakeEmbedder()
    renderer = renderer or FakeRenderer()
    store = store or InMemoryStore()
    worker = InferenceWorker(generator, embedder, renderer, stall_after_s=stall_after_s)
    worker.start()
    engine = Engine(worker, store, options or EngineOptions(), rng=random.Random(seed), alarm=alarm)
    return Harness(engine, worker, store, generator, embedder, renderer)
