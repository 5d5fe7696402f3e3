"""Our side: the real engine, worker, LLM, encoder and renderer, timed turn by turn.

The models load exactly as the product loads them with its default settings
(`models.runtime.load_models`): on a CPU with int8 and bfloat16 in hardware that is int8 base
weights under the LoRA adapters (`models.quantize`) and the prepared bfloat16 face synthesis
(`models.stylegan.PreparedSynthesis`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from bench.config import Profile
from bench.measure import GemvProbe, interleaved, peak_rss_bytes, reset_peak_rss
from bench.workload import (
    CannedAnswers,
    CountingEmbedder,
    FixedLengthGenerator,
    GenerationRecord,
    memory_lines,
    user_messages,
)
from core.engine import Engine, EngineOptions
from core.prompts import parse_memory_line
from core.store import InMemoryStore, NewMemory, TurnRecord
from core.types import (
    IDLE_SCORES,
    ExpressionScores,
    FaceRequest,
    GenerationRequest,
    IncomingMessage,
    Models,
    ReplyKind,
    Task,
)
from core.worker import InferenceWorker
from models.face import StyleGanFaceRenderer
from models.layout import TASKS, ModelLayout
from models.llm import PeftTextGenerator
from models.quantize import DynamicInt8Linear, int8_report
from models.runtime import load_models
from models.stylegan import Generator, load_generator, to_uint8
from models.vectorfind import FaceBank

logger = logging.getLogger(__name__)

ANSWER_SCORES = ExpressionScores(eyes=-0.45, mouth=-1.2, pose=-0.2)
"""An answer's expression (eyes and mouth "보통" to "크게") for the face timings."""
DECODE_ROUNDS = 5


def decode_step_bytes(model: torch.nn.Module) -> int:
    """Parameter bytes one batch-1 decode step reads: int8 base layers, one adapter, norms.

    The input embedding is left out: a step reads one row of it.
    """
    total = 0
    adapter = TASKS[0].value
    for name, module in model.named_modules():
        if isinstance(module, DynamicInt8Linear):
            total += module.weight_bytes
        elif isinstance(module, torch.nn.LayerNorm) or name.endswith((f"lora_A.{adapter}", f"lora_B.{adapter}")):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


@dataclass(frozen=True)
class _Loaded:
    """The models as loaded, and the instruments the bench wraps around them."""

    models: Models
    generator: FixedLengthGenerator
    counter: CountingEmbedder


@dataclass
class _Service:
    """The engine over the real models, and the instruments around it."""

    engine: Engine
    store: InMemoryStore
    worker: InferenceWorker
    generator: FixedLengthGenerator
    counter: CountingEmbedder
    peaks: dict[str, int | None] = field(default_factory=dict)

    async def turn(self, user: str, text: str) -> tuple[float, dict[str, float]]:
        """Seconds of one answered turn and the engine's own stage timings."""
        started = time.perf_counter()
        reply = await self.engine.reply(IncomingMessage(platform="bench", user_id=user, chat_id=user, text=text))
        elapsed = time.perf_counter() - started
        if reply.kind is not ReplyKind.ANSWER or reply.image is None:
            raise RuntimeError(f"the bench turn of {user} did not complete: {reply.kind.value} {reply.text!r}")
        return elapsed, dict(reply.timings)


def measure_ours(layout: ModelLayout, profile: Profile) -> dict[str, Any]:
    """Load; serve a warm-up turn, the serial turns and every user at once; time the parts.

    Peak resident memory is read per phase: loading, serial serving (the seed-style side's
    workload), and all users at once. The component timings come last: their probe matrices
    are not part of the service.
    """
    bank = FaceBank.from_layout(layout)
    face = bank.face_numbers()[0]
    loaded: list[_Loaded] = []

    def load() -> Models:
        models = load_models(layout, device="cpu", default_face=face, verify=False)
        generator = FixedLengthGenerator(models.generator, CannedAnswers(models.generator.count_tokens))
        loaded.append(_Loaded(models, generator, CountingEmbedder(models.embedder)))
        return Models(generator, loaded[0].counter, models.renderer)

    started = time.perf_counter()
    worker = InferenceWorker.loading(load)
    load_s = time.perf_counter() - started
    text_generator, renderer = loaded[0].models.generator, loaded[0].models.renderer
    if not isinstance(text_generator, PeftTextGenerator) or not isinstance(renderer, StyleGanFaceRenderer):
        raise TypeError("the bench measures the local PEFT generator and the StyleGAN renderer")
    logger.info("ours: loaded in %.1f s", load_s)

    options = EngineOptions(parallel_samples=1, max_pending_turns=4 * profile.users, turn_timeout_s=3600.0)
    store = InMemoryStore()
    engine = Engine(worker, store, options, rng=random.Random(0))
    service = _Service(engine, store, worker, loaded[0].generator, loaded[0].counter)
    service.peaks["load"] = peak_rss_bytes()
    messages = user_messages(1 + max(profile.users, profile.serial_turns), text_generator.count_tokens)

    async def session() -> dict[str, Any]:
        """Everything that runs torch runs on the worker's thread, where the models were loaded."""
        worker.start()
        try:
            await _remember(service, profile)
            served = await _serve(service, messages[0], messages[1:], profile)
            prompt = served["replay"][0]["requests"][0]["prompt"]
            components = await worker.call(lambda: _components(text_generator, renderer, layout, bank, prompt, profile))
            return {**served, **components}
        finally:
            await worker.stop()

    session_result = asyncio.run(session())
    return {
        **session_result,
        "load_s": load_s,
        "peak_rss_bytes": service.peaks,
        "quantization": asdict(int8_report(text_generator.model)),
        "torch_threads": torch.get_num_threads(),
    }


async def _remember(service: _Service, profile: Profile) -> None:
    """Give every user the stored memories, as earlier turns would have left them."""
    users = [
        "warmup",
        *(f"serial{i}" for i in range(profile.serial_turns)),
        *(f"crowd{i}" for i in range(profile.users)),
    ]
    memories = memory_lines(profile.memories)
    embeddings = await service.worker.encode(memories)
    for user in users:
        for line, embedding in zip(memories, embeddings, strict=True):
            item = parse_memory_line(line)
            assert item is not None, line
            record = TurnRecord(
                platform="bench",
                user_key=f"bench:{user}",
                conversation_key=f"bench:{user}:{user}",
                prompt="",
                final_input="",
                answer="",
                status="ok",
                used_memory=None,
                expression=None,
                scores=None,
                summary=None,
                timings={},
                created_at=0.0,
            )
            memory = NewMemory(key=item.key, value=item.value, text=item.text, embedding=embedding)
            await service.store.commit_turn(record, memory)


async def _serve(service: _Service, warmup: str, texts: Sequence[str], profile: Profile) -> dict[str, Any]:
    """A warm-up turn, each user's turn one after another, then every user's turn at once."""
    separate_peaks = reset_peak_rss()
    await service.turn("warmup", warmup)
    service.generator.take_records()

    calls, texts_encoded = service.counter.calls, service.counter.texts
    latencies, stages, replay = [], [], []
    serial_started = time.perf_counter()
    for i, text in enumerate(texts[: profile.serial_turns]):
        latency, timings = await service.turn(f"serial{i}", text)
        latencies.append(latency)
        stages.append(timings)
        replay.append(_turn_record(text, service.generator.take_records()))
    serial_s = time.perf_counter() - serial_started
    service.peaks["serial"] = peak_rss_bytes() if separate_peaks else None
    encoder_calls = (service.counter.calls - calls) / len(latencies)
    encoder_texts = (service.counter.texts - texts_encoded) / len(latencies)

    reset_peak_rss()
    calls = service.generator.calls
    crowd_started = time.perf_counter()
    crowd = texts[: profile.users]
    await asyncio.gather(*(service.turn(f"crowd{i}", text) for i, text in enumerate(crowd)))
    crowd_s = time.perf_counter() - crowd_started
    service.peaks["crowd"] = peak_rss_bytes() if separate_peaks else None
    crowd_calls = service.generator.calls - calls
    crowd_records = service.generator.take_records()

    compared = profile.measured_turns
    requests = [request for turn in replay for request in turn["requests"]]
    requests += [_record_dict(record) for record in crowd_records]
    return {
        "turn_s": statistics.mean(latencies[:compared]),
        "turn_s_all_serial": latencies,
        "stage_s": {stage: statistics.mean(t.get(stage, 0.0) for t in stages[:compared]) for stage in stages[0]},
        "replay": replay,
        "encoder_calls_per_turn": encoder_calls,
        "encoder_texts_per_turn": encoder_texts,
        "serial_turns_per_s": len(latencies) / serial_s,
        "concurrent_turns_per_s": profile.users / crowd_s,
        "concurrent_generate_calls": crowd_calls,
        "attempts_per_task": _attempts_per_task(replay),
        "prompt_tokens": {
            "min": min(r["prompt_tokens"] for r in requests),
            "max": max(r["prompt_tokens"] for r in requests),
        },
        "new_tokens_per_turn": statistics.mean(sum(sum(r["new_tokens"]) for r in t["requests"]) for t in replay),
    }


def _components(
    generator: PeftTextGenerator,
    renderer: StyleGanFaceRenderer,
    layout: ModelLayout,
    bank: FaceBank,
    prompt: str,
    profile: Profile,
) -> dict[str, Any]:
    """Batch-1 decoding against the bandwidth probe, and the face paths against plain float32."""
    decode_bytes = decode_step_bytes(generator.model)
    decode = _decode_speed(generator, prompt, profile.decode_tokens, GemvProbe(decode_bytes))
    reference = load_generator(layout.generator_path)
    face = bank.face_numbers()[0]
    return {
        "decode": {**decode, "weight_bytes": decode_bytes},
        "face": {
            **_face_speed(renderer, reference, bank, face, profile.face_frames),
            **_pixel_difference(renderer, StyleGanFaceRenderer(reference, bank), face),
            "precision": renderer.precision,
        },
    }


def _record_dict(record: GenerationRecord) -> dict[str, Any]:
    return {
        "task": record.task.value,
        "prompt": record.prompt,
        "temperature": record.temperature,
        "prompt_tokens": record.prompt_tokens,
        "new_tokens": list(record.new_tokens),
    }


def _turn_record(text: str, records: Sequence[GenerationRecord]) -> dict[str, Any]:
    return {"user_text": text, "requests": [_record_dict(record) for record in records]}


def _attempts_per_task(turns: Sequence[dict[str, Any]]) -> float:
    """Generation requests per task per turn: 1.0 when every task took a single attempt."""
    counts = Counter(request["task"] for turn in turns for request in turn["requests"])
    return max(counts.values()) / len(turns)


def _decode_speed(generator: PeftTextGenerator, prompt: str, steps: int, probe: GemvProbe) -> dict[str, Any]:
    """Batch-1 decode against the GEMV probe, interleaved so that both see the same machine.

    A step is (time for 1 + steps new tokens − time for 1) / steps; both sides of the
    comparison take their best round, the one a busy machine disturbed least.
    """

    def run(new_tokens: int) -> None:
        request = GenerationRequest(
            task=Task.OUTPUT_MESSAGE, prompt=prompt, max_new_tokens=new_tokens, temperature=0.6, seed=0
        )
        generator.generate([request])

    actions = {"short": lambda: run(1), "long": lambda: run(1 + steps), **probe.actions()}
    best = {name: min(samples) for name, samples in interleaved(actions, DECODE_ROUNDS).items()}
    step_s = max(best["long"] - best["short"], 1e-9) / steps
    return {"step_s": step_s, "tok_s": 1.0 / step_s, "prefill_s": best["short"], "gemv_gb_s": probe.gb_per_s(best)}


def _face_speed(
    renderer: StyleGanFaceRenderer, generator: Generator, bank: FaceBank, face: int, frames: int
) -> dict[str, float]:
    """Our rendered PNG against the plain float32 single-image path of the same generator."""
    code = bank.code(face)
    with torch.inference_mode():
        w = generator.mapping(torch.tensor(code.z)[None], torch.tensor(code.label)[None]).w

    def plain() -> None:
        with torch.inference_mode():
            to_uint8(generator.synthesis(generator.truncate(w)))

    def ours() -> None:
        renderer.render(FaceRequest(face=face, scores=ANSWER_SCORES))

    samples = interleaved({"ours": ours, "plain": plain}, rounds=frames)
    return {
        "ms_per_frame": 1e3 * statistics.median(samples["ours"]),
        "ms_per_frame_fp32_reference": 1e3 * statistics.median(samples["plain"]),
    }


def _pixel_difference(fast: StyleGanFaceRenderer, exact: StyleGanFaceRenderer, face: int) -> dict[str, float]:
    """How far the fast path's pixels are from the exact path's, on the idle and an answer face."""
    frames = [IDLE_SCORES, ANSWER_SCORES]
    difference = np.abs(
        fast.render_pixels(face, frames).astype(np.int16) - exact.render_pixels(face, frames).astype(np.int16)
    )
    return {"uint8_mean_abs_diff": float(difference.mean()), "uint8_max_abs_diff": int(difference.max())}
