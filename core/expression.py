"""From the eyes_mouth_pose words to the generator weights that draw them (SPEC C.1, C.2, B.4).

Each word picks a range and one uniform draw picks a point in it, so two answers with the same
words still look a little different, as in the original. The change vectors point toward a
smaller property (SPEC B.4), hence every weight is negated: a bigger expression is a more
negative weight.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from core.types import Expression, ExpressionScores

ANSWER_EASING_FRAMES = 30
"""Frames the original took to ease from the idle face to an answer's expression (SPEC C.2)."""


@dataclass(frozen=True)
class ScoreRange:
    """A property value before negation: `start + span * U` for U uniform in [0, 1)."""

    start: float
    span: float

    def at(self, u: float) -> float:
        return self.start + self.span * u


EYES_RANGES: Mapping[str, ScoreRange] = MappingProxyType(
    {
        "작게": ScoreRange(-0.2, 0.3),
        "보통": ScoreRange(0.3, 0.3),
        "크게": ScoreRange(0.8, 0.3),
        "아주 크게": ScoreRange(1.1, 0.1),
    }
)
MOUTH_RANGES: Mapping[str, ScoreRange] = MappingProxyType(
    {
        "보통": ScoreRange(0.4, 0.4),
        "크게": ScoreRange(1.0, 0.4),
        "아주 크게": ScoreRange(1.4, 0.2),
    }
)
POSE_RANGES: Mapping[str, ScoreRange] = MappingProxyType(
    {
        "없음": ScoreRange(-0.6, 0.9),
        "보통": ScoreRange(0.8, 0.7),
        "많이": ScoreRange(1.5, 0.3),
    }
)
# Words outside the table get the largest range, as upstream's final "else" branches did.
_EYES_OTHERWISE = EYES_RANGES["아주 크게"]
_MOUTH_OTHERWISE = MOUTH_RANGES["아주 크게"]
_POSE_OTHERWISE = POSE_RANGES["많이"]


def scores_for(expression: Expression, rng: random.Random) -> ExpressionScores:
    """Negated weights for an answer's expression, drawing U for eyes, mouth, pose in that order.

    Upstream chose the middle pose range by testing the MOUTH word (SPEC C.1, F.1), so a head
    turn of 보통 often got the largest range and 많이 the middle one. Here the pose word decides:
    보통 → 0.8 + 0.7U, 많이 → 1.5 + 0.3U, as the original clearly intended. The draw order is
    kept, so a seeded generator gives upstream's numbers wherever the bug did not apply.
    """
    u_eyes, u_mouth, u_pose = rng.random(), rng.random(), rng.random()
    eyes = EYES_RANGES.get(expression.eyes, _EYES_OTHERWISE).at(u_eyes)
    mouth = MOUTH_RANGES.get(expression.mouth, _MOUTH_OTHERWISE).at(u_mouth)
    pose = POSE_RANGES.get(expression.pose, _POSE_OTHERWISE).at(u_pose)
    return ExpressionScores(eyes=-eyes, mouth=-mouth, pose=-pose)


def easing_weights(frames: int) -> list[float]:
    """How far along each of `frames` animation frames is, rising smoothly to exactly 1.0.

    This is the original's cosine ease c = (cos θ + 1) / 2 with θ from π to 2π, sampled at
    k / frames for k = 1..frames: the first frame has already moved a little, the last one is
    the target itself. With 30 frames it is exactly the rise the original showed (SPEC C.2).
    """
    if frames < 1:
        raise ValueError(f"an animation needs at least one frame, not {frames}")
    return [(math.cos((1 + k / frames) * math.pi) + 1) / 2 for k in range(1, frames + 1)]


def interpolate(a: ExpressionScores, b: ExpressionScores, t: float) -> ExpressionScores:
    """The expression a fraction `t` of the way from `a` to `b`.

    Written as a(1 - t) + bt so that t = 0 and t = 1 give `a` and `b` exactly: the last frame of
    an animation is then the very image a still reply would show.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must lie in [0, 1], not {t}")
    return ExpressionScores(
        eyes=a.eyes * (1 - t) + b.eyes * t,
        mouth=a.mouth * (1 - t) + b.mouth * t,
        pose=a.pose * (1 - t) + b.pose * t,
    )
