"""Pick the stored memory a message is about (SPEC E.5), from embeddings kept in the store.

Stored memories carry their embedding, so a turn encodes only the user's text: one encoder call
however many memories a user has, where the original re-encoded every line on every turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from core.store import normalize

MIN_LINE_CHARS = 3
"""Upstream skipped lines shorter than 3 characters without spaces, counting the newline."""


@dataclass(frozen=True)
class Match:
    text: str
    score: float


def best_memory(
    query: np.ndarray, texts: Sequence[str], embeddings: Sequence[np.ndarray], threshold: float
) -> Match | None:
    """The highest-cosine memory at or above `threshold`; ties keep the stored order."""
    best: Match | None = None
    for text, embedding in zip(texts, embeddings, strict=True):
        if len(normalize(text)) + 1 < MIN_LINE_CHARS:
            continue
        score = _cosine(query, embedding)
        if score >= threshold and (best is None or score > best.score):
            best = Match(text=text, score=score)
    return best


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / norm) if norm else 0.0
