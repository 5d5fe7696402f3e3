"""`/mydata`'s document: its whole shape from a hand-built `UserData`, so a user (or a lawyer) can read it.

The store decides what belongs to the user (tests/test_memory_store.py); this checks only how it is
written down: every field, UTC timestamps, expressions as words and numbers, nothing derived.
"""

from __future__ import annotations

import json

import numpy as np

from core.export import FORMAT_VERSION, user_data_json
from core.store import StoredMemory, TurnRow, UserData
from core.types import Expression, ExpressionScores

ALICE = "telegram:1001"
DM = "telegram:1001:1001"
GROUP = "telegram:-100:1001"


def memory(key: str, value: str, created_at: float, updated_at: float) -> StoredMemory:
    return StoredMemory(
        key=key,
        value=value,
        text=f"[{key}: {value}]",
        embedding=np.full(4, 0.125, dtype=np.float32),
        created_at=created_at,
        updated_at=updated_at,
    )


def turn_row(row_id: int, at: float, conversation: str, prompt: str, **changes: object) -> TurnRow:
    fields: dict[str, object] = {
        "id": row_id,
        "created_at": at,
        "platform": "telegram",
        "user_key": ALICE,
        "conversation_key": conversation,
        "prompt": prompt,
        "final_input": f"{prompt} (답변 시작)",
        "answer": f" {prompt}? 좋아!",
        "status": "ok",
        "used_memory": None,
        "expression": None,
        "timings": {"llm": 1.0, "total": 1.23456},
        "total_s": 1.23456,
    }
    fields.update(changes)
    return TurnRow(**fields)  # type: ignore[arg-type]


def alices_data() -> UserData:
    return UserData(
        user_key=ALICE,
        memories=(
            memory("좋아하는 음식", "떡볶이", 0.0, 86_400.5),
            memory("반려동물", "고양이 나비", 3_600.0, 3_600.0),
        ),
        summaries={DM: "떡볶이 이야기", GROUP: "고양이 이야기"},
        last_scores=ExpressionScores(eyes=-0.5, mouth=0.25, pose=1.0),
        turns=(
            turn_row(7, 1_700_000_000.0, DM, "나 떡볶이 좋아해", used_memory="[좋아하는 음식: 떡볶이]"),
            turn_row(9, 1_700_000_060.9, GROUP, "나 고양이 키워", expression=Expression("보통", "크게", "없음")),
            turn_row(12, 1_700_000_120.0, GROUP, "", final_input="", answer="", status="timeout", total_s=30.0),
        ),
        settings={"blocked": {ALICE: "1"}, ALICE: {"block_notified": "1"}},
        pending_messages=('{"text": "아직 답 못 받은 말", "message_id": 5}',),
    )


def test_the_document_holds_everything_in_a_readable_shape() -> None:
    """Every part of `UserData` appears, field by field; times are ISO 8601 in UTC; nothing else is added."""
    document = json.loads(user_data_json(alices_data(), exported_at=1_700_000_200.0))

    assert document == {
        "format": f"ohlora-user-data/{FORMAT_VERSION}",
        "exported_at": "2023-11-14T22:16:40+00:00",
        "user": ALICE,
        "memories": [
            {
                "key": "좋아하는 음식",
                "value": "떡볶이",
                "text": "[좋아하는 음식: 떡볶이]",
                "created_at": "1970-01-01T00:00:00+00:00",
                "updated_at": "1970-01-02T00:00:00+00:00",
            },
            {
                "key": "반려동물",
                "value": "고양이 나비",
                "text": "[반려동물: 고양이 나비]",
                "created_at": "1970-01-01T01:00:00+00:00",
                "updated_at": "1970-01-01T01:00:00+00:00",
            },
        ],
        "summaries": {DM: "떡볶이 이야기", GROUP: "고양이 이야기"},
        "last_expression": {"eyes": -0.5, "mouth": 0.25, "pose": 1.0},
        "turns": [
            {
                "at": "2023-11-14T22:13:20+00:00",
                "conversation": DM,
                "message": "나 떡볶이 좋아해",
                "model_input": "나 떡볶이 좋아해 (답변 시작)",
                "answer": " 나 떡볶이 좋아해? 좋아!",
                "memory_used": "[좋아하는 음식: 떡볶이]",
                "expression": None,
                "status": "ok",
                "seconds": 1.235,
            },
            {
                "at": "2023-11-14T22:14:20+00:00",
                "conversation": GROUP,
                "message": "나 고양이 키워",
                "model_input": "나 고양이 키워 (답변 시작)",
                "answer": " 나 고양이 키워? 좋아!",
                "memory_used": None,
                "expression": {"eyes": "보통", "mouth": "크게", "pose": "없음"},
                "status": "ok",
                "seconds": 1.235,
            },
            {
                "at": "2023-11-14T22:15:20+00:00",
                "conversation": GROUP,
                "message": "",
                "model_input": "",
                "answer": "",
                "memory_used": None,
                "expression": None,
                "status": "timeout",
                "seconds": 30.0,
            },
        ],
        "settings": {"blocked": {ALICE: "1"}, ALICE: {"block_notified": "1"}},
        "messages_not_yet_answered": [{"text": "아직 답 못 받은 말", "message_id": 5}],
    }


def test_korean_is_written_as_utf8_and_embeddings_are_left_out() -> None:
    """A user opening the file reads Korean, not `\\uXXXX`; embeddings are numbers derived from her
    texts, meaningless to her and not needed to see what is stored."""
    raw = user_data_json(alices_data(), exported_at=0.0)

    raw.decode("utf-8")  # strict: the bytes are valid UTF-8
    assert "떡볶이".encode() in raw and b"\\u" not in raw
    assert b"embedding" not in raw and b"0.125" not in raw


def test_an_empty_export_is_still_a_complete_document() -> None:
    """Someone never seen gets every section, empty, rather than a file missing keys."""
    nobody = UserData(
        user_key="discord:3",
        memories=(),
        summaries={},
        last_scores=None,
        turns=(),
        settings={},
        pending_messages=(),
    )

    document = json.loads(user_data_json(nobody, exported_at=0.0))

    assert document == {
        "format": "ohlora-user-data/1",
        "exported_at": "1970-01-01T00:00:00+00:00",
        "user": "discord:3",
        "memories": [],
        "summaries": {},
        "last_expression": None,
        "turns": [],
        "settings": {},
        "messages_not_yet_answered": [],
    }
