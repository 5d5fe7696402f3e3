"""Prompt formats, generation settings and answer filters of the four Oh-LoRA v2 adapters.

The adapters only behave when they see exactly the strings they were fine-tuned on, so every
marker and separator here is copied character for character from SPEC section E (E.3-E.4).
Everything in this module is a pure function of its arguments: the engine decides when to call
the models and how many trials to draw; this module decides what a prompt looks like and whether
a sampled continuation is usable.

The filters receive `Generation.text`, the continuation alone (special tokens skipped, the end
marker kept when produced). Upstream instead decoded the whole sequence and cut the prompt off by
its character length; that difference is deliberate and removes two upstream faults (SPEC F.8, F.9).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from core.types import Expression, Generation, GenerationRequest, Task

# The markers the adapters were trained on (SPEC E.3). The leading spaces are part of the format.
ANSWER_START = " (답변 시작)"
"""Ends every prompt; the adapters learned to answer right after it."""
RESPONSE_MARKER = " ### 답변: "
"""Followed "(답변 시작)" in training only (the loss was masked up to it); never in a prompt."""
ANSWER_END = "(답변 종료)"
"""What the models write after their answer; the filters remove every occurrence of it."""
END_OF_TEXT = "<|endoftext|>"
SUMMARY_PREFIX = "(오로라 답변 요약) "
QUESTION_MARKER = " (사용자 질문) "
ANSWER_MARKER = " (오로라 답변)"
"""Separates the final input from Oh-LoRA's answer in the summary prompt (no space after it)."""

CONTROL_MARKERS: tuple[str, ...] = (
    ANSWER_START.strip(),
    ANSWER_END,
    SUMMARY_PREFIX.strip(),
    QUESTION_MARKER.strip(),
    ANSWER_MARKER.strip(),
    RESPONSE_MARKER.strip(),
    END_OF_TEXT,
)
"""Every marker string the adapters treat as structure; user text must never contain one."""

EYES_WORDS: tuple[str, ...] = ("작게", "보통", "크게", "아주 크게")
MOUTH_WORDS: tuple[str, ...] = ("보통", "크게", "아주 크게")
POSE_WORDS: tuple[str, ...] = ("없음", "보통", "많이")

_INVISIBLE = ("\u200b", "\u00a0")
"""Zero-width and no-break spaces, removed from every continuation before any rule (SPEC E.3.4)."""
_OUTPUT_MESSAGE_TOTAL_TOKEN_LIMIT = 91
_OUTPUT_MESSAGE_FORBIDDEN = ('"', "\u201d", "\u201c", "\u2019", "\ufffd", "     ", "http")
_OUTPUT_MESSAGE_DECORATIONS = "➤⊙➥⇨➯⑤⑥"
_SUMMARY_TOKEN_MARGIN = 4
_SUMMARY_MIN_CHARS = 2


@dataclass(frozen=True)
class TaskSettings:
    """How one adapter is sampled (SPEC E.3.3)."""

    task: Task
    max_new_tokens: int
    max_total_tokens: int | None
    """Bounds prompt + continuation together; only output_message was limited that way."""
    temperature: float
    attempts: int
    """Trials before the task's fallback is used."""


TASK_SETTINGS: Mapping[Task, TaskSettings] = MappingProxyType(
    {
        # Upstream limited output_message by max_length 96 including the prompt. The prompt is at
        # least one token, so 96 new tokens never binds before the total does: it is only a cap.
        Task.OUTPUT_MESSAGE: TaskSettings(Task.OUTPUT_MESSAGE, 96, 96, 0.6, 15),
        Task.MEMORY: TaskSettings(Task.MEMORY, 24, None, 0.6, 5),
        Task.SUMMARY: TaskSettings(Task.SUMMARY, 48, None, 0.6, 3),
        Task.EYES_MOUTH_POSE: TaskSettings(Task.EYES_MOUTH_POSE, 32, None, 1.5, 3),
    }
)


@dataclass(frozen=True)
class MemoryItem:
    """One remembered fact, `text` in the "[key: value]" form the adapters were trained on."""

    text: str
    key: str
    value: str


@dataclass(frozen=True)
class MemoryResult:
    """An accepted memory trial; `item` is None when the model validly found nothing to remember."""

    item: MemoryItem | None


FALLBACK_OUTPUT_MESSAGE = "(읽씹)"
"""Oh-LoRA "leaves the message on read" when no output_message trial passes."""
FALLBACK_MEMORY = MemoryResult(item=None)
FALLBACK_SUMMARY = ""
"""A failed summary resets the running summary (upstream behaviour)."""
FALLBACK_EXPRESSION = Expression(eyes="보통", mouth="보통", pose="없음")

FALLBACKS: Mapping[Task, str | MemoryResult | Expression] = MappingProxyType(
    {
        Task.OUTPUT_MESSAGE: FALLBACK_OUTPUT_MESSAGE,
        Task.MEMORY: FALLBACK_MEMORY,
        Task.SUMMARY: FALLBACK_SUMMARY,
        Task.EYES_MOUTH_POSE: FALLBACK_EXPRESSION,
    }
)
"""What each task yields when every trial was rejected (SPEC E.3.3)."""


def compose_final_input(user_text: str, memory: str | None, summary: str) -> str:
    """The text the output_message, memory and summary adapters are conditioned on (SPEC E.4).

    A retrieved memory wins over the running summary: upstream never sent both. A summary that is
    only whitespace counts as no summary, since "(오로라 답변 요약)" followed by nothing is a format
    the adapters never saw.
    """
    if memory:
        return f"{memory} {user_text}"
    if not summary.strip():
        return user_text
    return f"{SUMMARY_PREFIX}{summary}{QUESTION_MARKER}{user_text}"


def task_prompt(task: Task, final_input: str, answer: str | None = None) -> str:
    """The exact prompt for one adapter (SPEC E.3.2).

    `answer` is the cleaned output_message answer; summary and eyes_mouth_pose need it, and
    eyes_mouth_pose sees nothing else (the final input is ignored there).
    """
    if task in (Task.OUTPUT_MESSAGE, Task.MEMORY):
        return final_input + ANSWER_START
    if answer is None:
        raise ValueError(f"the {task.value} prompt needs the cleaned answer")
    if task is Task.SUMMARY:
        return final_input + ANSWER_MARKER + answer + ANSWER_START
    return answer + ANSWER_START


def build_request(task: Task, prompt: str, *, num_samples: int = 1, seed: int | None = None) -> GenerationRequest:
    """A generation request carrying the task's published sampling settings."""
    settings = TASK_SETTINGS[task]
    return GenerationRequest(
        task=task,
        prompt=prompt,
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        max_total_tokens=settings.max_total_tokens,
        num_samples=num_samples,
        seed=seed,
    )


def _without_invisible(text: str) -> str:
    for character in _INVISIBLE:
        text = text.replace(character, "")
    return text


def _mentions_answer_end(text: str) -> bool:
    """True when an end-marker phrase is left over once the real markers are removed."""
    leftover = text.replace(ANSWER_END, "")
    return "답변 종료" in leftover or "답변종료" in leftover


def clean_output_message(gen: Generation, trial_index: int) -> str | None:
    """Oh-LoRA's answer from one output_message trial, or None to draw another (SPEC E.3.4).

    `trial_index` counts from 0; only the first trial must start with a space, as upstream.
    The accepted answer keeps its leading (and usual trailing) space: the summary and
    eyes_mouth_pose prompts are built from it exactly as upstream built them.
    """
    text = _without_invisible(gen.text)
    if "[" in text and "]" in text:
        text = text.split("]")[1]

    if not text.replace("\n", "").replace(ANSWER_END, "").replace(" ", ""):
        return None
    if _mentions_answer_end(text):
        return None
    spaceless = text.replace(" ", "")
    if "(사용자" in spaceless or "요약)" in spaceless:
        return None
    if trial_index == 0 and not text.startswith(" "):
        return None
    if gen.prompt_tokens + gen.new_tokens >= _OUTPUT_MESSAGE_TOTAL_TOKEN_LIMIT:
        return None
    if any(forbidden in text for forbidden in _OUTPUT_MESSAGE_FORBIDDEN):
        return None

    answer = text.replace(ANSWER_END, "")
    if answer.startswith((" - ", "- ")):
        answer = answer[2:]
    for decoration in _OUTPUT_MESSAGE_DECORATIONS:
        answer = answer.replace(decoration, "")
    return answer


def _normalise_memory(text: str) -> str:
    """Bring the memory adapter's bracket and colon variants to "[key: value]" (SPEC E.3.4, 2)."""
    for before, after in (("(", "["), (")", "]"), ("{", "["), ("}", "]"), (" : ", ": ")):
        text = text.replace(before, after)
    if "[" in text and "]" in text:
        text = "[" + text.split("[")[1].split("]")[0] + "]"
    if ": " not in text:
        text = text.replace(":", ": ")
    if "[" not in text and "]" not in text and ": " in text:
        text = f"[{text}]"
    return text


def _memory_item(text: str) -> MemoryItem | None:
    """The "[key: value]" format check of SPEC E.3.4 for a non-blank text."""
    if not (text.startswith("[") and text.endswith("]") and ": " in text):
        return None
    if text.count("[") != 1 or text.count("]") != 1 or text.count(":") != 1:
        return None
    key, value = (part.strip() for part in text[1:-1].split(":"))
    if not key.replace(" ", "") or not value.replace(" ", ""):
        return None
    return MemoryItem(text=f"[{key}: {value}]", key=key, value=value)


def clean_memory(gen: Generation, max_new_tokens: int) -> MemoryResult | None:
    """The fact worth remembering from one memory trial, or None to draw another (SPEC E.3.4).

    Two upstream faults cannot occur here because the continuation arrives without the prompt:
    the end marker can no longer shift a character-based prompt cut (SPEC F.8), and an empty
    continuation is simply "no memory" instead of an index error (SPEC F.9). A blank answer is
    accepted as "no memory" but, unlike upstream (SPEC F.10), never becomes a stored blank line.
    The stored text is rebuilt as "[key: value]" from the stripped key and value, so stray spaces
    inside the brackets do not make two copies of one fact.
    """
    text = _normalise_memory(_without_invisible(gen.text.replace(ANSWER_END, "")))
    if "답변 종료" in text or "답변종료" in text:
        return None
    if gen.new_tokens >= max_new_tokens:
        return None
    if any(forbidden in text for forbidden in ("\ufffd", "     ", "http")):
        return None
    if not text.replace(" ", ""):
        return MemoryResult(item=None)
    item = _memory_item(text)
    return None if item is None else MemoryResult(item=item)


def parse_memory_line(text: str) -> MemoryItem | None:
    """A stored "[key: value]" line as an item, or None when it is blank or not in that form."""
    if not text.replace(" ", ""):
        return None
    return _memory_item(text.strip())


def clean_summary(gen: Generation, max_new_tokens: int) -> str | None:
    """The new running summary from one summary trial, or None to draw another (SPEC E.3.4).

    Upstream rejects a summary once 44 of its 48 new tokens were used; the rule is kept as the
    limit minus four so that it follows the configured limit. A trailing space left by removing
    the end marker is kept, as upstream fed it into the next turn's prompt.
    """
    text = _without_invisible(gen.text).strip()
    if _mentions_answer_end(text):
        return None
    if gen.new_tokens >= max_new_tokens - _SUMMARY_TOKEN_MARGIN:
        return None
    summary = text.replace(ANSWER_END, "")
    if len(summary) < _SUMMARY_MIN_CHARS:
        return None
    if "\ufffd" in text or "http" in text:
        return None
    return summary


def _word_after(text: str, label: str) -> str | None:
    if label not in text:
        return None
    return text.split(label, 1)[1].split(",")[0].split(")")[0]


def parse_eyes_mouth_pose(gen: Generation) -> Expression | None:
    """The three expression words of " (눈 E, 입 M, 고개 돌림 P) (답변 종료)", or None (SPEC E.3.4).

    Words are matched exactly, without trimming, as upstream did: "눈  보통" is not a valid answer.
    """
    text = _without_invisible(gen.text)
    eyes = _word_after(text, "눈 ")
    mouth = _word_after(text, "입 ")
    pose = _word_after(text, "고개 돌림 ")
    if eyes is None or mouth is None or pose is None:
        return None
    if eyes not in EYES_WORDS or mouth not in MOUTH_WORDS or pose not in POSE_WORDS:
        return None
    return Expression(eyes=eyes, mouth=mouth, pose=pose)
