"""Every prompt format and answer filter of SPEC E.3-E.4, pinned case by case."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.prompts import (
    ANSWER_END,
    ANSWER_MARKER,
    ANSWER_START,
    CONTROL_MARKERS,
    END_OF_TEXT,
    EYES_WORDS,
    FALLBACK_EXPRESSION,
    FALLBACK_MEMORY,
    FALLBACK_OUTPUT_MESSAGE,
    FALLBACK_SUMMARY,
    FALLBACKS,
    MOUTH_WORDS,
    POSE_WORDS,
    QUESTION_MARKER,
    RESPONSE_MARKER,
    SUMMARY_PREFIX,
    TASK_SETTINGS,
    MemoryItem,
    MemoryResult,
    TaskSettings,
    build_request,
    clean_memory,
    clean_output_message,
    clean_summary,
    compose_final_input,
    parse_eyes_mouth_pose,
    parse_memory_line,
    task_prompt,
)
from core.types import Expression, Generation, GenerationRequest, Task

MEMORY_LIMIT = TASK_SETTINGS[Task.MEMORY].max_new_tokens
SUMMARY_LIMIT = TASK_SETTINGS[Task.SUMMARY].max_new_tokens


def gen(text: str, prompt_tokens: int = 20, new_tokens: int = 10) -> Generation:
    return Generation(text=text, prompt_tokens=prompt_tokens, new_tokens=new_tokens)


# --- markers and settings ------------------------------------------------------------------------


def test_markers_are_the_trained_strings() -> None:
    assert ANSWER_START == " (답변 시작)"
    assert RESPONSE_MARKER == " ### 답변: "
    assert ANSWER_END == "(답변 종료)"
    assert END_OF_TEXT == "<|endoftext|>"
    assert SUMMARY_PREFIX == "(오로라 답변 요약) "
    assert QUESTION_MARKER == " (사용자 질문) "
    assert ANSWER_MARKER == " (오로라 답변)"
    assert set(CONTROL_MARKERS) == {
        "(답변 시작)",
        "(답변 종료)",
        "(오로라 답변 요약)",
        "(사용자 질문)",
        "(오로라 답변)",
        "### 답변:",
        "<|endoftext|>",
    }


def test_markers_match_the_spec_text(reference: Path) -> None:
    spec = (reference / "SPEC.md").read_text(encoding="utf-8")
    for marker in (ANSWER_START, RESPONSE_MARKER, f" {ANSWER_END}", END_OF_TEXT):
        assert f'"{marker}"' in spec
    assert f'"{SUMMARY_PREFIX}" + summary + "{QUESTION_MARKER}" + user_text' in spec
    assert f'final_input + "{ANSWER_MARKER}" + cleaned_answer + "{ANSWER_START}"' in spec


@pytest.mark.parametrize(
    ("task", "max_new", "max_total", "temperature", "attempts"),
    [
        (Task.OUTPUT_MESSAGE, 96, 96, 0.6, 15),
        (Task.MEMORY, 24, None, 0.6, 5),
        (Task.SUMMARY, 48, None, 0.6, 3),
        (Task.EYES_MOUTH_POSE, 32, None, 1.5, 3),
    ],
)
def test_task_settings(task: Task, max_new: int, max_total: int | None, temperature: float, attempts: int) -> None:
    assert TASK_SETTINGS[task] == TaskSettings(task, max_new, max_total, temperature, attempts)


def test_every_task_has_settings_and_a_fallback() -> None:
    assert set(TASK_SETTINGS) == set(Task)
    assert set(FALLBACKS) == set(Task)


def test_fallbacks() -> None:
    assert FALLBACKS[Task.OUTPUT_MESSAGE] == FALLBACK_OUTPUT_MESSAGE == "(읽씹)"
    assert FALLBACKS[Task.MEMORY] == FALLBACK_MEMORY == MemoryResult(item=None)
    assert FALLBACKS[Task.SUMMARY] == FALLBACK_SUMMARY == ""
    assert FALLBACKS[Task.EYES_MOUTH_POSE] == FALLBACK_EXPRESSION == Expression("보통", "보통", "없음")


@pytest.mark.parametrize("task", list(Task))
def test_build_request_carries_the_task_settings(task: Task) -> None:
    settings = TASK_SETTINGS[task]
    assert build_request(task, "프롬프트", num_samples=4, seed=7) == GenerationRequest(
        task=task,
        prompt="프롬프트",
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        max_total_tokens=settings.max_total_tokens,
        num_samples=4,
        seed=7,
    )


def test_build_request_defaults_to_one_unseeded_sample() -> None:
    request = build_request(Task.MEMORY, "p")
    assert (request.num_samples, request.seed) == (1, None)


# --- composing prompts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("memory", "summary", "expected"),
    [
        ("[오늘 날씨: 비]", "날씨 이야기", "[오늘 날씨: 비] 오늘 뭐 해?"),
        (None, "", "오늘 뭐 해?"),
        (None, "날씨 이야기", "(오로라 답변 요약) 날씨 이야기 (사용자 질문) 오늘 뭐 해?"),
        (None, "날씨 이야기 ", "(오로라 답변 요약) 날씨 이야기  (사용자 질문) 오늘 뭐 해?"),
        (None, "  ", "오늘 뭐 해?"),
        ("", "날씨 이야기", "(오로라 답변 요약) 날씨 이야기 (사용자 질문) 오늘 뭐 해?"),
    ],
)
def test_compose_final_input(memory: str | None, summary: str, expected: str) -> None:
    assert compose_final_input("오늘 뭐 해?", memory, summary) == expected


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        (Task.OUTPUT_MESSAGE, "오늘 뭐 해? (답변 시작)"),
        (Task.MEMORY, "오늘 뭐 해? (답변 시작)"),
        (Task.SUMMARY, "오늘 뭐 해? (오로라 답변) 집에서 쉬어요!  (답변 시작)"),
        (Task.EYES_MOUTH_POSE, " 집에서 쉬어요!  (답변 시작)"),
    ],
)
def test_task_prompt(task: Task, expected: str) -> None:
    assert task_prompt(task, "오늘 뭐 해?", " 집에서 쉬어요! ") == expected


@pytest.mark.parametrize("task", [Task.OUTPUT_MESSAGE, Task.MEMORY])
def test_question_prompts_need_no_answer(task: Task) -> None:
    assert task_prompt(task, "안녕?") == "안녕? (답변 시작)"


@pytest.mark.parametrize("task", [Task.SUMMARY, Task.EYES_MOUTH_POSE])
def test_answer_prompts_need_the_answer(task: Task) -> None:
    with pytest.raises(ValueError, match="cleaned answer"):
        task_prompt(task, "안녕?")


# --- output_message ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "trial", "expected"),
    [
        (" 안녕하세요! (답변 종료)", 0, " 안녕하세요! "),
        (" 안녕하세요!", 0, " 안녕하세요!"),
        ("안녕하세요! (답변 종료)", 1, "안녕하세요! "),
        (" 네 (답변 종료) (답변 종료)", 0, " 네  "),
        (" 안\u200b녕\u00a0하세요 (답변 종료)", 0, " 안녕하세요 "),
        ("\u200b 안녕", 0, " 안녕"),
        (" 안녕\n하세요", 0, " 안녕\n하세요"),
        # brackets: only the part after the first "]" up to the next one survives
        (" [오늘 날씨: 비] 비 오는 날 좋아! (답변 종료)", 0, " 비 오는 날 좋아! "),
        (" 앞] 뒤 ] 끝 [", 0, " 뒤 "),
        (" [괄호만 열림 좋아요", 0, " [괄호만 열림 좋아요"),
        # cleaning of the accepted answer
        (" - 좋아요 (답변 종료)", 0, " 좋아요 "),
        ("- 좋아요", 1, "좋아요"),
        (" -좋아요", 0, " -좋아요"),
        (" ➤좋⊙아➥요⇨➯⑤⑥ (답변 종료)", 0, " 좋아요 "),
        # characters that look close to forbidden ones but are allowed
        (" it's '좋아' ‘요", 0, " it's '좋아' ‘요"),
        (" 네    좋아요", 0, " 네    좋아요"),
        (" HTTP 몰라요", 0, " HTTP 몰라요"),
        (" 답변 잘했어요", 0, " 답변 잘했어요"),
    ],
)
def test_output_message_accepts_and_cleans(text: str, trial: int, expected: str) -> None:
    assert clean_output_message(gen(text), trial) == expected


@pytest.mark.parametrize(
    ("text", "trial"),
    [
        # empty once newlines, end markers and spaces are gone
        ("", 1),
        ("   (답변 종료)\n", 1),
        (" [메모: 값] ", 0),
        # an end-marker phrase outside a proper end marker
        (" 네 답변 종료 (답변 종료)", 1),
        (" 네 답변종료", 1),
        (" 네 (답변 종료", 1),
        # the summary prompt's markers, with spaces removed
        (" (사 용자 질문) 뭐야", 1),
        (" 세 줄 요 약) 끝", 1),
        # the first trial must start with a space
        ("안녕하세요", 0),
        ("\u00a0안녕하세요", 0),
        # forbidden characters and strings
        (' 그는 "안녕"', 0),
        (" 그는 “안녕", 0),
        (" 그는 안녕”", 0),
        (" 그건 제 거’예요", 0),
        (" 깨진 \ufffd 글자", 0),
        (" 공백     다섯", 0),
        (" https://example.com 봐요", 0),
    ],
)
def test_output_message_rejects(text: str, trial: int) -> None:
    assert clean_output_message(gen(text), trial) is None


@pytest.mark.parametrize(
    ("prompt_tokens", "new_tokens", "accepted"),
    [(60, 30, True), (61, 30, False), (90, 0, True), (40, 56, False)],
)
def test_output_message_rejects_long_sequences(prompt_tokens: int, new_tokens: int, accepted: bool) -> None:
    result = clean_output_message(gen(" 좋아요!", prompt_tokens, new_tokens), 0)
    assert (result is not None) is accepted


# --- memory --------------------------------------------------------------------------------------

WEATHER = MemoryItem(text="[오늘 날씨: 비]", key="오늘 날씨", value="비")


@pytest.mark.parametrize(
    "text",
    [
        " [오늘 날씨: 비] (답변 종료)",
        "[오늘 날씨: 비](답변 종료)",
        " (오늘 날씨 : 비) (답변 종료)",
        " {오늘 날씨: 비}",
        " [오늘 날씨:비]",
        " [ 오늘 날씨 :비 ]",
        " [오늘 날씨     : 비]",
        " 오늘 날씨: 비 (답변 종료)",
        " 오늘 날씨:비",
        " 앞말 [오늘 날씨: 비] 뒷말 [기분: 좋음]",
        " [오늘\u200b 날씨:\u00a0비]",
    ],
)
def test_memory_normalises_to_key_value(text: str) -> None:
    assert clean_memory(gen(text), MEMORY_LIMIT) == MemoryResult(item=WEATHER)


@pytest.mark.parametrize("text", ["", " ", " (답변 종료)", "(답변 종료)", "\u200b\u00a0 (답변 종료)"])
def test_blank_memory_is_no_memory_not_a_blank_item(text: str) -> None:
    assert clean_memory(gen(text, new_tokens=1), MEMORY_LIMIT) == MemoryResult(item=None)


@pytest.mark.parametrize(
    "text",
    [
        " [오늘 날씨: 비: 많이]",
        " [시간:: 3시]",
        " [: 비]",
        " [오늘 날씨: ]",
        " [ : ]",
        " [오늘 날씨 비]",
        " 오늘 날씨 비",
        " [[오늘 날씨: 비]]",
        " [답변 종료: 비]",
        " [답변종료: 비]",
        " [오늘 날씨: 비\ufffd]",
        " [오늘 날씨:     비]",
        " [사이트: http]",
    ],
)
def test_memory_rejects(text: str) -> None:
    assert clean_memory(gen(text), MEMORY_LIMIT) is None


@pytest.mark.parametrize(("new_tokens", "accepted"), [(MEMORY_LIMIT - 1, True), (MEMORY_LIMIT, False)])
@pytest.mark.parametrize("text", [" [오늘 날씨: 비] (답변 종료)", " "])
def test_memory_rejects_a_trial_that_hit_the_token_limit(text: str, new_tokens: int, accepted: bool) -> None:
    result = clean_memory(gen(text, new_tokens=new_tokens), MEMORY_LIMIT)
    assert (result is not None) is accepted


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("[오늘 날씨: 비]", WEATHER),
        ("[오늘 날씨: 비]\n", WEATHER),
        ("[ 오늘 날씨 : 비 ]", WEATHER),
        ("[좋아하는 음식: 떡볶이, 라면]", MemoryItem("[좋아하는 음식: 떡볶이, 라면]", "좋아하는 음식", "떡볶이, 라면")),
        ("", None),
        ("  \n", None),
        ("오늘 날씨: 비", None),
        ("(오늘 날씨: 비)", None),
        ("[오늘 날씨: 비: 많이]", None),
        ("[오늘 날씨 비]", None),
    ],
)
def test_parse_memory_line(line: str, expected: MemoryItem | None) -> None:
    assert parse_memory_line(line) == expected


def test_stored_memories_parse_back_to_themselves() -> None:
    result = clean_memory(gen(" (좋아하는 색 : 파랑)"), MEMORY_LIMIT)
    assert result is not None and result.item is not None
    assert parse_memory_line(result.item.text) == result.item


# --- summary -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" 날씨 이야기 (답변 종료)", "날씨 이야기 "),
        (" 날씨 이야기", "날씨 이야기"),
        ("\n 날씨 이야기 \n", "날씨 이야기"),
        ("\u200b 날씨\u00a0이야기 (답변 종료)", "날씨이야기 "),
        (" 날씨 이야기 (답변 종료) (답변 종료)", "날씨 이야기  "),
        ("ab", "ab"),
        ("a (답변 종료)", "a "),
        (" 날씨     이야기", "날씨     이야기"),
    ],
)
def test_summary_accepts(text: str, expected: str) -> None:
    assert clean_summary(gen(text), SUMMARY_LIMIT) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " (답변 종료)",
        "a",
        "a(답변 종료)",
        " 날씨 이야기 답변 종료",
        " 날씨 이야기 답변종료 (답변 종료)",
        " 날씨 \ufffd 이야기",
        " http 이야기",
    ],
)
def test_summary_rejects(text: str) -> None:
    assert clean_summary(gen(text), SUMMARY_LIMIT) is None


@pytest.mark.parametrize(("new_tokens", "accepted"), [(43, True), (44, False), (48, False)])
def test_summary_rejects_44_or_more_new_tokens(new_tokens: int, accepted: bool) -> None:
    result = clean_summary(gen(" 날씨 이야기 (답변 종료)", new_tokens=new_tokens), SUMMARY_LIMIT)
    assert (result is not None) is accepted


# --- eyes_mouth_pose -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (" (눈 보통, 입 크게, 고개 돌림 없음) (답변 종료)", Expression("보통", "크게", "없음")),
        (" (눈 아주 크게, 입 아주 크게, 고개 돌림 많이) (답변 종료)", Expression("아주 크게", "아주 크게", "많이")),
        (" (눈 작게, 입 보통, 고개 돌림 보통)", Expression("작게", "보통", "보통")),
        (" (눈 보\u200b통, 입 크게, 고개 돌림 없음)", Expression("보통", "크게", "없음")),
        (" (고개 돌림 없음, 입 크게, 눈 보통)", Expression("보통", "크게", "없음")),
    ],
)
def test_eyes_mouth_pose_parses(text: str, expected: Expression) -> None:
    assert parse_eyes_mouth_pose(gen(text)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        " (답변 종료)",
        " (입 크게, 고개 돌림 없음) (답변 종료)",
        " (눈 보통, 고개 돌림 없음) (답변 종료)",
        " (눈 보통, 입 크게) (답변 종료)",
        " (눈 보통, 입 작게, 고개 돌림 없음)",
        " (눈 보통, 입 크게, 고개 돌림 크게)",
        " (눈 많이, 입 크게, 고개 돌림 없음)",
        " (눈  보통, 입 크게, 고개 돌림 없음)",
        " (눈\u00a0보통, 입 크게, 고개 돌림 없음)",
        " (눈 보통 , 입 크게, 고개 돌림 없음)",
    ],
)
def test_eyes_mouth_pose_rejects(text: str) -> None:
    assert parse_eyes_mouth_pose(gen(text)) is None


def test_allowed_expression_words() -> None:
    assert EYES_WORDS == ("작게", "보통", "크게", "아주 크게")
    assert MOUTH_WORDS == ("보통", "크게", "아주 크게")
    assert POSE_WORDS == ("없음", "보통", "많이")
