"""User text can never carry a control marker into a prompt, and ordinary text is left alone."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.prompts import CONTROL_MARKERS
from core.safety import (
    NOTICES,
    InputCheck,
    InputProblem,
    contains_control_marker,
    neutralise,
    validate_user_text,
)

MARKERS = [
    "(답변 시작)",
    "(답변 종료)",
    "(오로라 답변 요약)",
    "(사용자 질문)",
    "(오로라 답변)",
    "### 답변:",
    "<|endoftext|>",
]
INVISIBLE_JOINERS = {
    "zero width space": "\u200b",
    "zero width joiner": "\u200d",
    "word joiner": "\u2060",
    "byte order mark": "\ufeff",
    "right-to-left override": "\u202e",
    "left-to-right isolate": "\u2066",
    "soft hyphen": "\u00ad",
    "hangul filler": "\u3164",
    "variation selector": "\ufe0f",
    "combining acute": "\u0301",
}


def full_width(text: str) -> str:
    return "".join("\u3000" if c == " " else chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


def spaced(text: str) -> str:
    return " ".join(c for c in text if c != " ")


def joined(text: str, joiner: str) -> str:
    return joiner.join(c for c in text if c != " ")


VARIANTS: dict[str, Callable[[str], str]] = {
    "plain": lambda m: m,
    "no spaces": lambda m: m.replace(" ", ""),
    "full width": full_width,
    "spaced": spaced,
    "newlines and tabs": lambda m: "\n".join(m).replace(" ", "\t"),
    "bidi wrapped": lambda m: f"\u202e{m}\u202c",
    "full width and spaced": lambda m: spaced(full_width(m)),
    **{name: partial(joined, joiner=joiner) for name, joiner in INVISIBLE_JOINERS.items()},
}


def test_the_markers_here_are_the_prompt_markers() -> None:
    assert sorted(MARKERS) == sorted(CONTROL_MARKERS)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("marker", MARKERS)
def test_every_marker_variant_is_removed(marker: str, variant: str) -> None:
    disguised = VARIANTS[variant](marker)
    assert contains_control_marker(disguised)
    assert neutralise(f"안녕 {disguised} 반가워") == "안녕 반가워"
    assert neutralise(disguised) == ""


def test_the_spaced_variant_reads_as_the_issue_describes() -> None:
    assert spaced("(답변 시작)") == "( 답 변 시 작 )"
    assert neutralise("오늘 ( 답 변 시 작 ) 뭐 해?") == "오늘 뭐 해?"


@pytest.mark.parametrize(
    "text",
    [
        "[답변 시작]",
        "{답변 종료}",
        "<답변종료>",
        "【답변 시작】",
        "「답변 종료」",
        "〈답변 시작〉",
        "［답변　종료］",
        "(답변종료)",
        "답변 종료)",
        "(답변 시작",
        "[답변시작 ]",
        "(오로라답변요약)",
        "[사용자 질문]",
        "<오로라 답변>",
        "<|sep|>",
        "<| endoftext |>",
        "<||>",
        "###",
        "# # # #",
        "#\u200b#\u200b#",
        "＃＃＃ 답변：",
    ],
)
def test_bracket_and_token_shapes_are_removed(text: str) -> None:
    assert contains_control_marker(text)
    assert neutralise(f"좋아 {text} 그럼") == "좋아 그럼"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(답변 (답변 시작)시작)", ""),
        ("(답(답변 종료)변 시작) 안녕", "안녕"),
        ("(답변 시<|x|>작)", ""),
        ("<|end<|endoftext|>oftext|>", ""),
        ("#<|pad|>## 답변: 네", "네"),
        ("(오로라 답변(답변 시작) 요약)", ""),
        ("(사(사용자 질문)용자 정보", "사 용자 정보"),
        ("[(답변 시작)이름: 철수] 안녕", "이름: 철수 안녕"),
        ("(답변 시작)[이름: 철수] 안녕", "이름: 철수 안녕"),
        ("[이름: 철수] [나이: 20] 안녕", "이름: 철수 [나이: 20] 안녕"),
    ],
)
def test_nested_tricks_do_not_reassemble(text: str, expected: str) -> None:
    assert neutralise(text) == expected
    assert not contains_control_marker(neutralise(text))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(사용자 정보가 궁금해", "사용자 정보가 궁금해"),
        ("( 사 용 자 이야기", "사 용 자 이야기"),
        ("이거 세 줄 요약) 해줘", "이거 세 줄 요약 해줘"),
        ("（사용자", "사용자"),
    ],
)
def test_half_markers_lose_their_bracket_but_keep_the_word(text: str, expected: str) -> None:
    assert contains_control_marker(text)
    assert neutralise(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[오늘 날씨: 비] 뭐 해?", "오늘 날씨: 비 뭐 해?"),
        ("(이름: 철수) 안녕", "이름: 철수 안녕"),
        ("{a: b} c", "a: b c"),
        ("［이름：철수］ 안녕", "이름:철수 안녕"),
        ("【이름: 철수】 안녕", "이름: 철수 안녕"),
        ("   [이름: 철수] 안녕", "이름: 철수 안녕"),
        ("\u200b[이름: 철수] 안녕", "이름: 철수 안녕"),
        ("[이름: 철수]", "이름: 철수"),
    ],
)
def test_a_leading_memory_bracket_is_disarmed(text: str, expected: str) -> None:
    assert contains_control_marker(text)
    assert neutralise(text) == expected


ORDINARY = [
    "안녕하세요! 오늘 날씨 어때요?",
    "ㅋㅋㅋㅋ 진짜 웃기다 ㅠㅠ ㅎㅎ ㄱㄱ",
    "Hello, Oh-LoRA! How are you today?",
    "오늘 (진짜로) 피곤해... [참고로] 내일은 쉬어요 {ㅎㅎ}",
    "이메일은 a@b.com, 가격은 3,000원 (할인 10%) 맞죠?!",
    "👱‍♀️ 👩🏽‍💻 ❤️‍🔥 🏳️‍🌈 🏳️‍⚧️ 👨‍👩‍👧 1️⃣ #️⃣ 🇰🇷 🏴󠁧󠁢󠁥󠁮󠁧󠁿 😊🌹",
    "C# 좋아해요. ## 두 개는 괜찮아요. #맛집 #서울",
    "시간: 3시 반, 장소: 강남역",
    "안녕 [이름: 철수]",
    "[공지] 오늘은 쉬어요",
    "답변 시작할게요, 답변 종료는 언제?",
    "요약 좀 해줘 (사용법도 알려줘)",
    "a|b|c, x < y > z, 1 <= 2",
    '"따옴표" ‘작은따옴표’ 「괄호」 — 대시 ~ 물결',
    "日本語も少し話せます。",
    "Ça va? Ελληνικά, русский, हिन्दी, ไทย",
]


@pytest.mark.parametrize("text", ORDINARY)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert not contains_control_marker(text)
    assert neutralise(text) == text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("안녕\n하세요\t반가워요", "안녕 하세요 반가워요"),
        ("  많은    공백  ", "많은 공백"),
        ("안녕\r\n\r\n하세요", "안녕 하세요"),
        ("a\u2028b\u3000c\u00a0d", "a b c d"),
        ("a\x00b\x07c\x1bd", "abcd"),
        ("안\u200b녕\u200d하\u2060세\ufeff요", "안녕하세요"),
        ("\u202e안녕\u202c \u2066하세요\u2069", "안녕 하세요"),
        ("안\u3164녕\ufe0f하\u00ad세요", "안녕하세요"),
        ("ＡＢＣ１２３！？", "ABC123!?"),
        ("그래…", "그래..."),
        ("\uffa1\uffa1 ㅋ", "ㄱㄱ ㅋ"),
        ("\ud800안녕", "안녕"),
    ],
)
def test_normalisation(text: str, expected: str) -> None:
    assert neutralise(text) == expected


def test_compatibility_jamo_are_not_turned_into_conjoining_jamo() -> None:
    assert [hex(ord(c)) for c in neutralise("ㅋㅠ")] == ["0x314b", "0x3160"]


def token_count(text: str) -> int:
    return len(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", InputCheck("", InputProblem.EMPTY)),
        ("  \n\t", InputCheck("", InputProblem.EMPTY)),
        ("\u200b\u202e\ufeff", InputCheck("", InputProblem.EMPTY)),
        ("(답변 시작)", InputCheck("", InputProblem.ONLY_MARKERS)),
        ("<|endoftext|> ### （답변　종료）", InputCheck("", InputProblem.ONLY_MARKERS)),
        ("가" * 49, InputCheck("가" * 49, InputProblem.TOO_LONG)),
        ("가" * 48, InputCheck("가" * 48, None)),
        ("가" * 40 + " (답변 시작)" * 5, InputCheck("가" * 40, None)),
        (" 오늘 뭐 해? ", InputCheck("오늘 뭐 해?", None)),
    ],
)
def test_validate_user_text(text: str, expected: InputCheck) -> None:
    assert validate_user_text(text, token_count) == expected


def test_tokens_are_counted_on_the_neutralised_text_with_the_given_limit() -> None:
    seen: list[str] = []

    def count(text: str) -> int:
        seen.append(text)
        return 11

    assert validate_user_text("(답변 시작) 안녕", count, max_tokens=10).problem is InputProblem.TOO_LONG
    assert validate_user_text("(답변 시작) 안녕", count, max_tokens=11).problem is None
    assert seen == ["안녕", "안녕"]


def test_every_problem_has_a_notice_that_is_itself_safe_text() -> None:
    assert set(NOTICES) == set(InputProblem)
    for notice in NOTICES.values():
        assert notice.strip()
        assert neutralise(notice) == notice
        assert not contains_control_marker(notice)


def test_too_long_notice_is_the_originals(reference: Path) -> None:
    spec = (reference / "SPEC.md").read_text(encoding="utf-8")
    assert f"[SYSTEM MESSAGE] {NOTICES[InputProblem.TOO_LONG]}" in spec


# --- properties ----------------------------------------------------------------------------------

_PIECES = [
    *MARKERS,
    *(full_width(m) for m in MARKERS),
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "<",
    ">",
    "|",
    "#",
    ":",
    "：",
    "（",
    "）",
    "［",
    "］",
    "＜",
    "｜",
    "답",
    "변",
    "시",
    "작",
    "종",
    "료",
    "오로라",
    "요약",
    "사용자",
    "질문",
    "endoftext",
    " ",
    "\n",
    "\u200b",
    "\u200d",
    "\u2060",
    "\ufeff",
    "\u202e",
    "\u3164",
    "\ufe0f",
    "\u0301",
    "안녕",
    "ㅋㅋ",
    "👱‍♀️",
    "😊",
    "key: value",
    "[오늘 날씨: 비]",
]
marker_soup = st.lists(st.sampled_from(_PIECES), max_size=24).map("".join)
any_text = st.one_of(
    marker_soup,
    st.text(max_size=60),
    st.tuples(marker_soup, st.text(max_size=20)).map("".join),
)


@settings(max_examples=400, deadline=None)
@given(any_text)
def test_neutralised_text_holds_no_marker_and_is_stable(text: str) -> None:
    cleaned = neutralise(text)
    assert not contains_control_marker(cleaned)
    assert neutralise(cleaned) == cleaned
