"""Input safety: nothing a user types may act as a control marker the adapters were trained on.

The adapters read structure from plain text ("(답변 시작)" ends a prompt, "[key: value]" in front
of a question is a retrieved memory, "<|endoftext|>" is turned into the end-of-text token by the
tokenizer). A user who types those strings, or a look-alike the tokenizer or the model would read
the same way (full-width forms, letters pulled apart by spaces or invisible characters, odd
brackets), could steer the other tasks or poison the stored memories (SPEC F.8). So user text
goes through `neutralise` before any prompt is built, and the engine refuses text that is empty,
too long, or nothing but markers.

Ordinary text is left alone: Korean (including "ㅋㅋ"-style jamo), English, emoji with their
joiners and variation selectors, and everyday punctuation come out as they went in. Only
full-width and compatibility forms are folded to their plain spelling ("！" → "!", "…" → "..."),
so that no look-alike can hide a marker.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType

import regex

from core.prompts import CONTROL_MARKERS

# Characters that may sit between the letters of a marker without changing how a reader (or,
# after tokenisation, very nearly how the model) sees it: whitespace, invisible and combining
# characters, and the blank braille pattern that renders as a space.
_GAP = r"[\s\p{Default_Ignorable_Code_Point}\p{Mn}\p{Me}\u2800]*"
_OPEN = r"[\p{Ps}<]"
_CLOSE = r"[\p{Pe}>]"
_BRACKETS = r"\p{Ps}\p{Pe}<>"

# Invisible characters are dropped, except where an emoji needs them: the joiner inside a
# sequence such as 👱‍♀️, a variation selector after an emoji, and the tag characters of flags.
_EMOJI_GLUE = (
    r"(?<=\p{Extended_Pictographic}\p{Emoji_Modifier}?\uFE0F?)\u200D(?=\p{Extended_Pictographic})"
    r"|(?<=\p{Emoji})[\uFE0E\uFE0F]"
    r"|(?<=\p{Extended_Pictographic}[\U000E0020-\U000E007F]*)[\U000E0020-\U000E007F]"
)
_HIDDEN = regex.compile(rf"(?!{_EMOJI_GLUE})[\p{{Cc}}\p{{Cs}}\p{{Default_Ignorable_Code_Point}}]")
_WHITESPACE = regex.compile(r"\s")
_SPACES = regex.compile(r" {2,}")
# Compatibility jamo ("ㅋㅋ", "ㅠㅠ") and their half-width forms; U+3164, the Hangul filler, is
# left out on purpose so that NFKC turns it into an invisible character that is then dropped.
_HANGUL_JAMO = regex.compile(r"[\u3131-\u3163\u3165-\u318E\uFFA1-\uFFDC]+")


def _spelled(word: str) -> str:
    """A pattern for `word` with any gaps between its characters and brackets of any kind."""
    pieces = []
    for character in word:
        if character.isspace():
            continue
        if character == "(":
            pieces.append(_OPEN)
        elif character == ")":
            pieces.append(_CLOSE)
        else:
            pieces.append(regex.escape(character))
    return _GAP.join(pieces)


_ANSWER_PHRASE = rf"{_spelled('답변')}{_GAP}(?:{_spelled('시작')}|{_spelled('종료')})"
_REMOVE = " "
"""Removed markers leave a space, so the words on either side stay apart."""
# In priority order: the longest, most specific shapes first, so that "### 답변:" goes as a whole
# before "###" alone could leave "답변:" behind.
_RULES: list[tuple[regex.Pattern[str], str]] = [
    *(
        (regex.compile(_spelled(marker), regex.IGNORECASE), _REMOVE)
        for marker in sorted(CONTROL_MARKERS, key=len, reverse=True)
    ),
    # "답변 시작" / "답변 종료" touching a bracket on either side, e.g. "[답변종료]" or "답변 종료)".
    (
        regex.compile(rf"{_OPEN}{_GAP}{_ANSWER_PHRASE}(?:{_GAP}{_CLOSE})?|{_ANSWER_PHRASE}{_GAP}{_CLOSE}"),
        _REMOVE,
    ),
    # Anything shaped like a special token, "<|...|>".
    (regex.compile(rf"<{_GAP}\|[^<>|]*\|{_GAP}>"), _REMOVE),
    (regex.compile(rf"#(?:{_GAP}#){{2,}}"), _REMOVE),
    # Half markers the output filters reject ("(사용자", "요약)"): the bracket goes, the word stays.
    (regex.compile(rf"\({_GAP}({_spelled('사용자')})"), r"\1"),
    (regex.compile(rf"({_spelled('요약')}){_GAP}\)"), r"\1"),
    # A leading "[key: value]" reads as a retrieved memory; without its brackets it is just words.
    # A gap character that survives normalisation (the blank braille pattern) must not shield it.
    (regex.compile(rf"^{_GAP}{_OPEN}([^{_BRACKETS}:]*:[^{_BRACKETS}]*){_CLOSE}"), r"\1"),
]


def _hangul_compatibility_jamo(run: str) -> str:
    """Half-width jamo become their compatibility forms; NFKC would make conjoining jamo instead."""
    return "".join(
        chr(int(unicodedata.decomposition(character).split()[-1], 16))
        if "\uffa1" <= character <= "\uffdc" and unicodedata.decomposition(character)
        else character
        for character in run
    )


def _nfkc(text: str) -> str:
    """NFKC that leaves "ㅋㅋ" alone: plain NFKC rewrites it to conjoining jamo nobody types."""
    pieces = []
    position = 0
    for match in _HANGUL_JAMO.finditer(text):
        pieces.append(unicodedata.normalize("NFKC", text[position : match.start()]))
        pieces.append(_hangul_compatibility_jamo(match.group()))
        position = match.end()
    pieces.append(unicodedata.normalize("NFKC", text[position:]))
    return "".join(pieces)


def _normalise(text: str) -> str:
    """Full-width forms folded, invisible and control characters gone, whitespace single spaces."""
    text = _WHITESPACE.sub(" ", _nfkc(text))
    text = _HIDDEN.sub("", text)
    return _SPACES.sub(" ", text).strip()


def _disarm(text: str) -> str:
    """`text` with the most specific rule that applies applied everywhere (or unchanged)."""
    for pattern, replacement in _RULES:
        disarmed = pattern.sub(replacement, text)
        if disarmed != text:
            return disarmed
    return text


def neutralise(text: str) -> str:
    """`text` with every control marker and look-alike removed, ready to be put into a prompt.

    Removing one marker can bring the pieces of another together ("(답변 (답변 시작)시작)"), so
    the cleaning repeats, one rule at a time, until nothing changes. After the first round every
    change shortens the text, so this ends.
    """
    while True:
        cleaned = _disarm(_normalise(text))
        if cleaned == text:
            return cleaned
        text = cleaned


def contains_control_marker(text: str) -> bool:
    """True when user-supplied `text` holds a marker, in any spacing, width or invisible disguise.

    Meant for user text: a composed prompt legitimately holds markers (and a leading memory).
    """
    text = _normalise(text)
    return any(pattern.search(text) for pattern, _ in _RULES)


class InputProblem(str, Enum):
    """Why a user's text is refused instead of answered."""

    EMPTY = "empty"
    TOO_LONG = "too_long"
    ONLY_MARKERS = "only_markers"
    """The text held nothing but control markers, so nothing is left to answer."""


@dataclass(frozen=True)
class InputCheck:
    """The neutralised text, and why it cannot be answered (None when it can)."""

    text: str
    problem: InputProblem | None


NOTICES: Mapping[InputProblem, str] = MappingProxyType(
    {
        InputProblem.EMPTY: "오로라에게 하고 싶은 말을 적어 주세요! 기다리고 있을게요 😊",
        # The original's own words (SPEC E.4 step 2), without its terminal-only "[SYSTEM MESSAGE]".
        InputProblem.TOO_LONG: (
            "너무 긴 질문은 오로라👱‍♀️ 에게 부담 돼요! 그런 질문은 오로라의 절친 혜나 🌹 (LLM Hyena) 에게 해 주세요! 😢"
        ),
        InputProblem.ONLY_MARKERS: (
            "앗, 오로라는 그런 특수 기호만으로는 무슨 말인지 모르겠어요 🥺 평소처럼 말로 이야기해 주세요!"
        ),
    }
)
"""What Oh-LoRA says, in her own casual polite voice, instead of answering a refused input."""


def validate_user_text(text: str, count_tokens: Callable[[str], int], max_tokens: int = 48) -> InputCheck:
    """Neutralise `text` and say whether it can be answered.

    Tokens are counted on the neutralised text because that is what reaches the model; the limit
    of 48 is the original's (SPEC E.4 step 2).
    """
    cleaned = neutralise(text)
    if not _normalise(text):
        return InputCheck(cleaned, InputProblem.EMPTY)
    if not cleaned:
        return InputCheck(cleaned, InputProblem.ONLY_MARKERS)
    if count_tokens(cleaned) > max_tokens:
        return InputCheck(cleaned, InputProblem.TOO_LONG)
    return InputCheck(cleaned, None)
