"""A user's data as one JSON document, for `/mydata`: readable, complete, and nothing of anyone else."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from core.store import UserData

FORMAT_VERSION = 1


def _when(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, tz=dt.timezone.utc).isoformat(timespec="seconds")


def user_data_json(data: UserData, exported_at: float) -> bytes:
    """UTF-8 JSON, Korean left readable; embeddings are left out (numbers derived from the texts)."""
    document: dict[str, Any] = {
        "format": f"ohlora-user-data/{FORMAT_VERSION}",
        "exported_at": _when(exported_at),
        "user": data.user_key,
        "memories": [
            {
                "key": memory.key,
                "value": memory.value,
                "text": memory.text,
                "created_at": _when(memory.created_at),
                "updated_at": _when(memory.updated_at),
            }
            for memory in data.memories
        ],
        "summaries": dict(data.summaries),
        "last_expression": None if data.last_scores is None else dataclasses.asdict(data.last_scores),
        "turns": [
            {
                "at": _when(turn.created_at),
                "conversation": turn.conversation_key,
                "message": turn.prompt,
                "model_input": turn.final_input,
                "answer": turn.answer,
                "memory_used": turn.used_memory,
                "expression": None if turn.expression is None else dataclasses.asdict(turn.expression),
                "status": turn.status,
                "seconds": round(turn.total_s, 3),
            }
            for turn in data.turns
        ],
        "settings": {scope: dict(values) for scope, values in data.settings.items()},
        "messages_not_yet_answered": [json.loads(payload) for payload in data.pending_messages],
    }
    return json.dumps(document, ensure_ascii=False, indent=2).encode()
