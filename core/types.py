"""The values and protocols that cross the boundaries between bot/, core/ and models/.

Everything here is a frozen dataclass or a Protocol so that each layer can be tested with fakes:
the engine never sees torch, the adapters never see a model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

import numpy as np


class Task(str, Enum):
    """The four LoRA adapters of Oh-LoRA v2, named as their published folders are."""

    OUTPUT_MESSAGE = "output_message"
    MEMORY = "memory"
    SUMMARY = "summary"
    EYES_MOUTH_POSE = "eyes_mouth_pose"


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt for one adapter.

    `max_total_tokens` bounds prompt + generation together (the output_message task was limited
    that way upstream); the generator stops a sequence at whichever limit comes first, or right
    after the "(답변 종료)" end marker. `num_samples` independent sampled sequences come back, so
    that retry candidates can be drawn in one batched call instead of one after another.

    `deadline` is a `time.monotonic()` instant after which nobody waits for the answer (the
    turn's own deadline). A generator may stop early there and return what it has so far, even
    empty samples: whatever it returns after the deadline is thrown away, and stopping frees the
    model for the turns still waiting.
    """

    task: Task
    prompt: str
    max_new_tokens: int
    temperature: float
    max_total_tokens: int | None = None
    num_samples: int = 1
    seed: int | None = None
    deadline: float | None = None


@dataclass(frozen=True)
class Generation:
    """One sampled continuation: only the new tokens, decoded with special tokens skipped.

    The end marker stays in `text` when the model produced it; the task filters remove it.
    Token counts let the filters apply the SPEC's length rules without a tokenizer.
    """

    text: str
    prompt_tokens: int
    new_tokens: int


class TextGenerator(Protocol):
    """One base LLM with the four task adapters."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        """Return, for each request in order, its `num_samples` generations."""
        ...

    def count_tokens(self, text: str) -> int:
        """Tokens of `text` under the LLM tokenizer's default encode settings."""
        ...


class Embedder(Protocol):
    """The S-BERT memory encoder."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Return a float32 array (len(texts), dim) of unit-norm rows."""
        ...


@dataclass(frozen=True)
class Expression:
    """The three words of the eyes_mouth_pose answer, e.g. ("보통", "크게", "없음")."""

    eyes: str
    mouth: str
    pose: str


@dataclass(frozen=True)
class ExpressionScores:
    """Generator weights for the eyes/mouth/pose change vectors, signs as the generator wants them.

    Positive values close the eyes, close the mouth and turn the head less (SPEC B.4), so the
    scores derived from an answer are already negated here.
    """

    eyes: float
    mouth: float
    pose: float


IDLE_SCORES = ExpressionScores(eyes=0.2, mouth=1.0, pose=0.0)
"""The original's idle base weights (SPEC C.3), the face a user sees before any answer."""


@dataclass(frozen=True)
class FaceRequest:
    """What to draw: a face number (None = random), the expression, and where to ease from."""

    face: int | None
    scores: ExpressionScores
    previous: ExpressionScores | None = None
    animate: bool = False


@dataclass(frozen=True)
class RenderedFace:
    """Encoded image bytes, ready to attach."""

    data: bytes
    mime_type: str
    face: int

    @property
    def filename(self) -> str:
        extension = {"image/png": "png", "image/gif": "gif"}.get(self.mime_type, "bin")
        return f"ohlora_{self.face}.{extension}"


class FaceRenderer(Protocol):
    """StyleGAN-VectorFind-v7 behind a narrow door."""

    def faces(self) -> Sequence[int]:
        """The face numbers that can be requested."""
        ...

    def render(self, request: FaceRequest) -> RenderedFace: ...


@dataclass(frozen=True)
class Models:
    """The three model-side parts of a turn, as the composition root hands them to the worker."""

    generator: TextGenerator
    embedder: Embedder
    renderer: FaceRenderer


class ReplyKind(str, Enum):
    ANSWER = "answer"
    NOTICE = "notice"
    """Input refused (empty, too long, blocked, rate limited): nothing was changed."""
    BUSY = "busy"
    ERROR = "error"
    """A model failed or ran out of time; the user still gets a polite answer."""


def user_key(platform: str, user_id: str) -> str:
    """Whose memories: one account on one platform."""
    return f"{platform}:{user_id}"


def conversation_key(platform: str, chat_id: str, user_id: str) -> str:
    """Whose summary: one user in one chat (a group's members each have their own)."""
    return f"{platform}:{chat_id}:{user_id}"


@dataclass(frozen=True)
class IncomingMessage:
    """A user's text, stripped of everything platform specific."""

    platform: str
    user_id: str
    chat_id: str
    text: str
    event_id: str | None = None
    """The platform event it came in (inbox id): the turn keeps its reply with that event until delivered."""
    forwarded: bool = False
    """Someone else's words passed on: answered, but never stored as the sender's own memory."""

    @property
    def user_key(self) -> str:
        return user_key(self.platform, self.user_id)

    @property
    def conversation_key(self) -> str:
        return conversation_key(self.platform, self.chat_id, self.user_id)


@dataclass(frozen=True)
class Reply:
    text: str
    kind: ReplyKind = ReplyKind.ANSWER
    image: RenderedFace | None = None
    expression: Expression | None = None
    scores: ExpressionScores | None = None
    used_memory: str | None = None
    summary: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
