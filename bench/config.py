"""What a benchmark run builds and measures: the model shapes, the workload and the targets.

The shapes are the published ones (SPEC E.1, E.5, A.2): Polyglot-Ko 1.3B (GPT-NeoX, hidden 2048,
24 layers, 16 heads, FFN 8192, vocabulary 30080) with four rank-128 LoRA adapters on
query_key_value, klue/roberta-base (hidden 768, 12 layers, vocabulary 32000) for S-BERT, and the
256 px StyleGAN generator. A profile may only cut depth (and, for the smoke test, width); the
output states what it cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from types import MappingProxyType

from core.types import Task
from models.stylegan import GeneratorConfig
from models.tiny_face import TINY_GENERATOR_CONFIG

NEW_TOKENS: Mapping[Task, int] = MappingProxyType(
    {
        Task.OUTPUT_MESSAGE: 40,
        Task.MEMORY: 24,
        Task.SUMMARY: 48,
        Task.EYES_MOUTH_POSE: 32,
    }
)
"""New tokens generated per task, on both sides. Random weights never write the end marker, so
every generation runs to this bench-only limit instead of the SPEC's (E.3.3)."""


@dataclass(frozen=True)
class LlmShape:
    hidden: int = 2048
    layers: int = 24
    heads: int = 16
    intermediate: int = 8192
    vocab: int = 30080
    max_positions: int = 2048
    lora_rank: int = 128
    lora_alpha: int = 16


@dataclass(frozen=True)
class SbertShape:
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    intermediate: int = 3072
    vocab: int = 32000


@dataclass(frozen=True)
class Profile:
    """One way to run the bench: the shapes it builds and how much it measures."""

    name: str
    llm: LlmShape
    sbert: SbertShape
    face: GeneratorConfig
    measured_turns: int
    """Turns timed on both sides (ours: the first of its serial turns), after a warm-up."""
    serial_turns: int
    """Our turns one after another, different users; their rate is the serial turns/s."""
    users: int = 8
    """Users who send a message at the same moment in the concurrency phase."""
    memories: int = 100
    """Stored memories of every user."""
    face_frames: int = 6
    """Frames timed on each face path, interleaved so that machine noise hits both alike."""
    decode_tokens: int = 32
    """Batch-1 decode steps timed for the bandwidth comparison."""

    def describe(self) -> dict[str, object]:
        return {
            "profile": self.name,
            "llm": asdict(self.llm),
            "sbert": asdict(self.sbert),
            "face": {
                "resolution": self.face.resolution,
                "fmaps_base": self.face.fmaps_base,
                "fmaps_max": self.face.fmaps_max,
            },
            "measured_turns": self.measured_turns,
            "serial_turns": self.serial_turns,
            "users": self.users,
            "memories": self.memories,
            "new_tokens": {task.value: count for task, count in NEW_TOKENS.items()},
        }

    def cuts(self) -> str:
        """What this profile changed from the real shapes, in words ("" for none)."""
        real_llm, real_sbert, real_face = LlmShape(), SbertShape(), GeneratorConfig()
        notes = []
        if self.llm != real_llm:
            notes.append(_shape_note("LLM", asdict(self.llm), asdict(real_llm)))
        if self.sbert != real_sbert:
            notes.append(_shape_note("S-BERT", asdict(self.sbert), asdict(real_sbert)))
        if self.face != real_face:
            notes.append(
                f"face generator fmaps_base {self.face.fmaps_base}, fmaps_max {self.face.fmaps_max} (real 16384, 512)"
            )
        return "; ".join(notes)


def _shape_note(label: str, shape: dict[str, int], real: dict[str, int]) -> str:
    changed = [f"{key} {value} (real {real[key]})" for key, value in shape.items() if value != real[key]]
    return f"{label} " + ", ".join(changed)


FULL = Profile(
    name="full",
    llm=LlmShape(),
    sbert=SbertShape(),
    face=GeneratorConfig(),
    measured_turns=3,
    serial_turns=8,
    face_frames=10,
)

QUICK = Profile(
    name="quick",
    llm=LlmShape(),
    sbert=SbertShape(),
    face=GeneratorConfig(),
    measured_turns=2,
    serial_turns=4,
)
"""The real shapes with fewer turns timed. Cutting depth was tried and rejected: it shrinks every
model but not the fixed costs (the Python runtime, the face generator, the per-step overhead of
the decoding loop), so memory and latency ratios drift away from the real system's."""

TINY = Profile(
    name="tiny",
    llm=LlmShape(hidden=64, layers=2, heads=4, intermediate=256, max_positions=256, lora_rank=8),
    sbert=SbertShape(hidden=32, layers=1, heads=2, intermediate=64, vocab=2048),
    face=TINY_GENERATOR_CONFIG,
    measured_turns=1,
    serial_turns=2,
    users=2,
    memories=10,
    face_frames=2,
    decode_tokens=4,
)
"""Seconds-long smoke run: same code paths, toy widths; its numbers mean nothing."""

PROFILES: Mapping[str, Profile] = MappingProxyType({p.name: p for p in (QUICK, FULL, TINY)})
