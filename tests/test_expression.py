"""The expression rules of SPEC C.1-C.2: word → weight ranges, the pose fix, easing."""

from __future__ import annotations

import json
import math
import random
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from core.expression import ANSWER_EASING_FRAMES, easing_weights, interpolate, scores_for
from core.types import IDLE_SCORES, Expression, ExpressionScores

ALMOST_ONE = 1.0 - 2.0**-53
"""The largest value random.random() can return."""


class FixedRandom(random.Random):
    """A generator whose random() returns the given values in order, and counts the draws."""

    def __init__(self, *values: float) -> None:
        super().__init__(0)
        self._values = list(values)
        self.draws = 0

    def random(self) -> float:
        self.draws += 1
        return self._values.pop(0)


@pytest.fixture(scope="module")
def facts(reference: Path) -> dict[str, Any]:
    with open(reference / "vectorfind_v7" / "vectorfind_v7_facts.json", encoding="utf-8") as file:
        loaded: dict[str, Any] = json.load(file)
    return loaded


# "weight actually used" column of the SPEC C.1 table, with the pose rows as intended (the fix):
# each weight lies in (low, high], equals `high` at U = 0 and approaches `low` as U → 1.
EYES_ROWS = [
    ("작게", -0.1, 0.2),
    ("보통", -0.6, -0.3),
    ("크게", -1.1, -0.8),
    ("아주 크게", -1.2, -1.1),
    ("몰라요", -1.2, -1.1),
]
MOUTH_ROWS = [
    ("보통", -0.8, -0.4),
    ("크게", -1.4, -1.0),
    ("아주 크게", -1.6, -1.4),
    ("몰라요", -1.6, -1.4),
]
POSE_ROWS = [
    ("없음", -0.3, 0.6),
    ("보통", -1.5, -0.8),
    ("많이", -1.8, -1.5),
    ("몰라요", -1.8, -1.5),
]


def _component(scores: ExpressionScores, name: str) -> float:
    value: float = getattr(scores, name)
    return value


ROWS = (
    [("eyes", word, low, high) for word, low, high in EYES_ROWS]
    + [("mouth", word, low, high) for word, low, high in MOUTH_ROWS]
    + [("pose", word, low, high) for word, low, high in POSE_ROWS]
)


def _expression(name: str, word: str) -> Expression:
    words = {"eyes": "보통", "mouth": "보통", "pose": "없음"}
    words[name] = word
    return Expression(**words)


@pytest.mark.parametrize(("name", "word", "low", "high"), ROWS)
def test_score_at_the_extremes_of_u(name: str, word: str, low: float, high: float) -> None:
    expression = _expression(name, word)
    at_zero = _component(scores_for(expression, FixedRandom(0.0, 0.0, 0.0)), name)
    at_one = _component(scores_for(expression, FixedRandom(*[ALMOST_ONE] * 3)), name)
    halfway = _component(scores_for(expression, FixedRandom(0.5, 0.5, 0.5)), name)
    assert at_zero == pytest.approx(high, abs=1e-12)
    assert at_one == pytest.approx(low, abs=1e-12)
    assert halfway == pytest.approx((low + high) / 2, abs=1e-12)


@pytest.mark.parametrize(("name", "word", "low", "high"), ROWS)
def test_seeded_scores_stay_in_the_table_range(name: str, word: str, low: float, high: float) -> None:
    rng = random.Random(20250502)
    values = [_component(scores_for(_expression(name, word), rng), name) for _ in range(300)]
    assert all(low - 1e-12 < value <= high + 1e-12 for value in values)
    assert max(values) - min(values) > 0.8 * (high - low)


def test_draws_are_taken_in_the_order_eyes_mouth_pose() -> None:
    rng = FixedRandom(0.0, 0.5, ALMOST_ONE)
    scores = scores_for(Expression("크게", "크게", "보통"), rng)
    assert rng.draws == 3
    assert scores.eyes == pytest.approx(-0.8)
    assert scores.mouth == pytest.approx(-1.2)
    assert scores.pose == pytest.approx(-1.5)


def test_seeded_generator_gives_the_upstream_arithmetic() -> None:
    expected_rng = random.Random(42)
    u_eyes, u_mouth, u_pose = (expected_rng.random() for _ in range(3))
    scores = scores_for(Expression("작게", "아주 크게", "없음"), random.Random(42))
    assert scores == ExpressionScores(
        eyes=-1 * (-0.2 + 0.3 * u_eyes),
        mouth=-1 * (1.4 + 0.2 * u_mouth),
        pose=-1 * (-0.6 + 0.9 * u_pose),
    )


@pytest.mark.parametrize(
    ("mouth", "pose", "low", "high"),
    [
        ("보통", "많이", -1.8, -1.5),  # upstream gave the 보통 range here
        ("크게", "보통", -1.5, -0.8),  # upstream gave the 많이 range here
        ("아주 크게", "보통", -1.5, -0.8),
        ("보통", "보통", -1.5, -0.8),
        ("크게", "많이", -1.8, -1.5),
    ],
)
def test_pose_range_follows_the_pose_word_not_the_mouth(mouth: str, pose: str, low: float, high: float) -> None:
    for u in (0.0, 0.3, ALMOST_ONE):
        value = scores_for(Expression("보통", mouth, pose), FixedRandom(0.5, 0.5, u)).pose
        assert low - 1e-12 < value <= high + 1e-12


def test_idle_scores_are_the_original_base_weights(facts: dict[str, Any]) -> None:
    base = facts["base_scores"]
    assert IDLE_SCORES == ExpressionScores(
        eyes=base["EYES_BASE_SCORE"], mouth=base["MOUTH_BASE_SCORE"], pose=base["POSE_BASE_SCORE"]
    )


def test_easing_reproduces_the_original_rise(facts: dict[str, Any]) -> None:
    easing = facts["easing"]
    assert ANSWER_EASING_FRAMES == easing["frames_up"]
    queue = easing["c_values_in_queue_order"]
    # The original popped its queue from the end, so the rise it showed is the reversed tail.
    shown_rise = list(reversed(queue))[:ANSWER_EASING_FRAMES]
    assert easing_weights(ANSWER_EASING_FRAMES) == pytest.approx(shown_rise, abs=1e-12)
    assert easing_weights(ANSWER_EASING_FRAMES)[:-1] == queue[1:ANSWER_EASING_FRAMES]


@pytest.mark.parametrize("frames", [1, 2, 3, 7, 10, 30, 70, 101])
def test_easing_rises_smoothly_to_exactly_one(frames: int) -> None:
    weights = easing_weights(frames)
    assert len(weights) == frames
    assert weights[-1] == 1.0
    assert 0.0 < weights[0]
    assert all(earlier < later for earlier, later in pairwise(weights))
    for k in range(1, frames):  # the cosine ease is symmetric: c(t) + c(1 - t) = 1
        assert weights[k - 1] + weights[frames - k - 1] == pytest.approx(1.0, abs=1e-12)


def test_easing_is_the_cosine_schedule() -> None:
    assert easing_weights(4) == pytest.approx(
        [(math.cos(theta) + 1) / 2 for theta in (1.25 * math.pi, 1.5 * math.pi, 1.75 * math.pi)] + [1.0]
    )
    assert easing_weights(2)[0] == pytest.approx(0.5)


@pytest.mark.parametrize("frames", [0, -3])
def test_easing_needs_a_frame(frames: int) -> None:
    with pytest.raises(ValueError, match="at least one frame"):
        easing_weights(frames)


START = ExpressionScores(eyes=0.2, mouth=1.0, pose=0.0)
TARGET = ExpressionScores(eyes=-0.45, mouth=-0.7, pose=0.3)


def test_interpolate_hits_both_ends_exactly() -> None:
    assert interpolate(START, TARGET, 0.0) == START
    assert interpolate(START, TARGET, 1.0) == TARGET
    assert interpolate(ExpressionScores(0.1, 0.1, 0.1), ExpressionScores(0.7, 0.7, 0.7), 1.0) == (
        ExpressionScores(0.7, 0.7, 0.7)
    )


def test_interpolate_in_between() -> None:
    middle = interpolate(START, TARGET, 0.25)
    assert middle.eyes == pytest.approx(0.2 + 0.25 * (-0.65))
    assert middle.mouth == pytest.approx(1.0 + 0.25 * (-1.7))
    assert middle.pose == pytest.approx(0.075)


@pytest.mark.parametrize("t", [-0.01, 1.01, math.nan])
def test_interpolate_rejects_t_outside_the_unit_interval(t: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate(START, TARGET, t)


def test_an_eased_animation_ends_on_the_target() -> None:
    frames = [interpolate(START, TARGET, weight) for weight in easing_weights(12)]
    assert frames[-1] == TARGET
    assert frames[0] != START
    eyes = [frame.eyes for frame in frames]
    assert all(earlier > later for earlier, later in pairwise(eyes))
