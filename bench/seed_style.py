"""The original's approach, rebuilt for comparison (SPEC E.1, E.3.3, E.5, B.3).

Four separate full copies of the base model in bfloat16, one per adapter, each opened with its
adapter as the original opened its folders; one `generate` call per task, batch of one, in the
original's order, with its stopping rule on the last tokens; every stored memory re-encoded on
every turn, one text per encoder call; and the face through the generator's plain float32 path,
mapping included. It replays the exact prompts our side produced, with the same new-token counts.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from bench.config import NEW_TOKENS, Profile
from bench.measure import peak_rss_bytes, reset_peak_rss
from core.prompts import ANSWER_END
from core.types import Task
from models.layout import TASKS, ModelLayout
from models.sbert import load_embedder
from models.stylegan import load_generator, to_uint8
from models.vectorfind import FaceBank

logger = logging.getLogger(__name__)

STOP_WINDOW = 4
"""The original compared the last four token ids with those of "답변 종료)"."""
RETRIEVAL_THRESHOLD = 0.95


class LastTokensStop(StoppingCriteria):
    """Stop a sequence once its last tokens are the end marker's."""

    def __init__(self, stop_ids: Sequence[int]) -> None:
        self._stop = torch.tensor(list(stop_ids)[-STOP_WINDOW:])

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        width = len(self._stop)
        if input_ids.shape[1] < width:
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        else:
            done = (input_ids[:, -width:] == self._stop).all(dim=1)
        return cast(torch.BoolTensor, done)


class SeedStylePipeline:
    def __init__(self, layout: ModelLayout) -> None:
        self._copies: dict[Task, tuple[PeftModel, Any]] = {}
        for task in TASKS:
            base = AutoModelForCausalLM.from_pretrained(
                layout.base_model_dir, dtype=torch.bfloat16, local_files_only=True
            )
            model = PeftModel.from_pretrained(base, layout.adapter_dir(task)).eval()
            tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(task), local_files_only=True)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            self._copies[task] = (model, tokenizer)
        self._embedder = load_embedder(layout, device="cpu")
        self._generator = load_generator(layout.generator_path)
        bank = FaceBank.from_layout(layout)
        face = bank.face_numbers()[0]
        self._code = bank.code(face)
        vectors = bank.vectors(face)
        self._eyes, self._mouth = torch.tensor(vectors.eyes), torch.tensor(vectors.mouth)
        self.new_tokens = 0

    def warm_up(self) -> None:
        """First calls pay one-time costs (kernel selection, allocator growth); not a turn's."""
        self._embedder.encode(["안녕"])
        for task in TASKS:
            self._generate(task, "안녕 (답변 시작)", 1.0, new_tokens=2)
        self._face()

    def turn(self, user_text: str, memories: Sequence[str], requests: Sequence[dict[str, Any]]) -> None:
        self._retrieve(user_text, memories)
        for request in requests:
            self._generate(Task(request["task"]), request["prompt"], request["temperature"])
        self._face()

    def _retrieve(self, user_text: str, memories: Sequence[str]) -> str | None:
        query = self._embedder.encode([user_text])[0]
        best, best_score = None, RETRIEVAL_THRESHOLD
        for line in memories:
            vector = self._embedder.encode([line])[0]
            score = float(np.dot(vector, query) / (np.linalg.norm(vector) * np.linalg.norm(query)))
            if score >= best_score:
                best, best_score = line, score
        return best

    @torch.inference_mode()
    def _generate(self, task: Task, prompt: str, temperature: float, new_tokens: int | None = None) -> str:
        model, tokenizer = self._copies[task]
        inputs = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        stop = LastTokensStop(tokenizer.encode(" " + ANSWER_END, add_special_tokens=False))
        output = model.generate(
            **inputs,
            max_new_tokens=NEW_TOKENS[task] if new_tokens is None else new_tokens,
            do_sample=True,
            temperature=temperature,
            stopping_criteria=StoppingCriteriaList([stop]),
        )
        self.new_tokens += output.shape[1] - inputs["input_ids"].shape[1]
        return tokenizer.decode(output[0], skip_special_tokens=True)[len(prompt) :]

    @torch.inference_mode()
    def _face(self) -> np.ndarray:
        """One frame as the original drew each one: mapping, edit, float32 synthesis."""
        w = self._generator.mapping(torch.tensor(self._code.z)[None], torch.tensor(self._code.label)[None]).w
        edited = w.double() + 0.45 * self._eyes + 1.2 * self._mouth
        return to_uint8(self._generator.synthesis(self._generator.truncate(edited.float())))


def measure_seed_style(
    layout: ModelLayout, profile: Profile, memories: Sequence[str], replay: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """Load the four copies, warm them up, then time our first `profile.measured_turns` serial turns."""
    started = time.perf_counter()
    pipeline = SeedStylePipeline(layout)
    load_s = time.perf_counter() - started
    peaks: dict[str, int | None] = {"load": peak_rss_bytes()}
    logger.info("seed-style: loaded in %.1f s", load_s)
    separate_peaks = reset_peak_rss()

    pipeline.warm_up()
    pipeline.new_tokens = 0
    measured = replay[: profile.measured_turns]
    latencies = []
    for turn in measured:
        started = time.perf_counter()
        pipeline.turn(turn["user_text"], memories, turn["requests"])
        latencies.append(time.perf_counter() - started)
        logger.info("seed-style: turn in %.1f s", latencies[-1])
    return {
        "turn_s": statistics.mean(latencies),
        "turn_s_all": latencies,
        "load_s": load_s,
        "encoder_calls_per_turn": 1 + len(memories),
        "new_tokens_per_turn": pipeline.new_tokens / len(measured),
        "peak_rss_bytes": {**peaks, "serial": peak_rss_bytes() if separate_peaks else None},
        "torch_threads": torch.get_num_threads(),
    }
