"""The tiny stand-ins: built once per recipe, deterministic, and good enough to hold a chat.

The `tiny_layout` fixture (tests/conftest.py) builds the models once per recipe for the session.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable
from pathlib import Path

import pytest

from core.prompts import TASK_SETTINGS, clean_memory, clean_output_message, clean_summary, parse_eyes_mouth_pose
from core.types import Generation, GenerationRequest, Task
from models import tiny
from models.layout import TASKS, ModelLayout
from models.llm import PeftTextGenerator


def _file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_layout_holds_every_part(tiny_layout: ModelLayout) -> None:
    for task in TASKS:
        folder = tiny_layout.adapter_dir(task)
        assert (folder / "adapter_config.json").is_file()
        assert (folder / "adapter_model.safetensors").is_file()
        assert (folder / "tokenizer.json").is_file()
    assert (tiny_layout.base_model_dir / "config.json").is_file()
    assert (tiny_layout.sbert_dir / "config.json").is_file()
    assert tiny_layout.generator_path.is_file()
    assert tiny_layout.z_vectors_csv.is_file()


def test_dataset_rows_are_exact_training_texts() -> None:
    """SPEC E.3.1: every row is "<input> (답변 시작) ### 답변: <answer> (답변 종료) <|endoftext|>"."""
    for task in TASKS:
        texts = tiny.training_texts(task)
        assert len(texts) >= 30
        for text in texts:
            assert text.endswith(" (답변 종료) <|endoftext|>")
            assert text.count(" (답변 시작) ### 답변: ") == 1
            if task is Task.SUMMARY:
                assert " (오로라 답변) " in text.split(" (답변 시작)")[0]
    memory_texts = tiny.training_texts(Task.MEMORY)
    assert any(" ### 답변:  (답변 종료)" in text for text in memory_texts), "an empty memory leaves two spaces"
    assert any(text.startswith("[") for text in memory_texts), "inputs carrying a memory"
    assert any(text.startswith("(오로라 답변 요약) ") for text in memory_texts), "inputs carrying a summary"


def test_second_call_reuses_the_build(tiny_layout: ModelLayout, monkeypatch: pytest.MonkeyPatch) -> None:
    def must_not_build(layout: ModelLayout, *, seed: int = 0) -> None:
        raise AssertionError("rebuilt although the recipe did not change")

    monkeypatch.setattr(tiny, "build_tiny_models", must_not_build)
    assert tiny.ensure_tiny_models(tiny_layout.root) == tiny_layout


def _stub_build(calls: list[Path], content: str) -> Callable[..., None]:
    def build(layout: ModelLayout, *, seed: int = 0) -> None:
        calls.append(layout.root)
        (layout.root / "model.txt").write_text(content, encoding="utf-8")

    return build


def test_a_changed_recipe_rebuilds_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []
    root = tmp_path / "models"
    monkeypatch.setattr(tiny, "recipe_fingerprint", lambda seed: "recipe-1")
    monkeypatch.setattr(tiny, "build_tiny_models", _stub_build(calls, "first"))
    tiny.ensure_tiny_models(root)
    tiny.ensure_tiny_models(root)
    assert len(calls) == 1

    monkeypatch.setattr(tiny, "recipe_fingerprint", lambda seed: "recipe-2")
    monkeypatch.setattr(tiny, "build_tiny_models", _stub_build(calls, "second"))
    tiny.ensure_tiny_models(root)
    assert len(calls) == 2
    assert (root / "model.txt").read_text(encoding="utf-8") == "second"
    assert calls[1] != root, "built in a staging folder, then moved into place"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models"], "no staging or stale folder left"


def test_a_build_finished_by_another_process_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "models"
    monkeypatch.setattr(tiny, "recipe_fingerprint", lambda seed: "recipe-1")

    def racing_build(layout: ModelLayout, *, seed: int = 0) -> None:
        # Another process completes the same recipe while this one is still building.
        root.mkdir()
        (root / "model.txt").write_text("theirs", encoding="utf-8")
        (root / tiny.FINGERPRINT_FILE).write_text("recipe-1\n", encoding="utf-8")
        (layout.root / "model.txt").write_text("ours", encoding="utf-8")

    monkeypatch.setattr(tiny, "build_tiny_models", racing_build)
    tiny.ensure_tiny_models(root)
    assert (root / "model.txt").read_text(encoding="utf-8") == "theirs"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["models"]


def test_build_is_deterministic(tmp_path: Path) -> None:
    """The whole build twice, with a few training steps instead of the full recipe's."""
    llm = dataclasses.replace(tiny.LLM_RECIPE, steps=4)
    sbert = dataclasses.replace(tiny.SBERT_RECIPE, steps=4)
    first, second = ModelLayout(tmp_path / "first"), ModelLayout(tmp_path / "second")
    for layout in (first, second):
        tiny.build_tiny_models(layout, seed=3, llm_recipe=llm, sbert_recipe=sbert)
    digests = _file_digests(first.root)
    assert len(digests) > 20
    assert _file_digests(second.root) == digests


def _is_valid(task: Task, generation: Generation) -> bool:
    settings = TASK_SETTINGS[task]
    if task is Task.OUTPUT_MESSAGE:
        return clean_output_message(generation, trial_index=0) is not None
    if task is Task.MEMORY:
        return clean_memory(generation, settings.max_new_tokens) is not None
    if task is Task.SUMMARY:
        return clean_summary(generation, settings.max_new_tokens) is not None
    return parse_eyes_mouth_pose(generation) is not None


@pytest.mark.parametrize("task", TASKS, ids=[task.value for task in TASKS])
def test_sampled_answers_pass_the_task_filters(sampling_generator: PeftTextGenerator, task: Task) -> None:
    """The published sampling settings (eyes_mouth_pose at temperature 1.5) on the dataset's prompts."""
    settings = TASK_SETTINGS[task]
    prompts = sorted({example.prompt for example in tiny.load_examples() if example.task is task})
    requests = [
        GenerationRequest(
            task=task,
            prompt=prompt,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            max_total_tokens=settings.max_total_tokens,
            num_samples=2,
            seed=index,
        )
        for index, prompt in enumerate(prompts)
    ]
    generations = [g for samples in sampling_generator.generate(requests) for g in samples]
    valid = sum(_is_valid(task, generation) for generation in generations)
    assert valid >= 0.8 * len(generations), f"{valid} of {len(generations)} {task.value} samples were valid"


def test_the_memory_adapter_remembers_and_the_answer_adapter_answers(sampling_generator: PeftTextGenerator) -> None:
    prompt = "나 떡볶이 진짜 좋아해 (답변 시작)"
    settings = TASK_SETTINGS[Task.MEMORY]
    answer, memory = sampling_generator.generate(
        [
            GenerationRequest(Task.OUTPUT_MESSAGE, prompt, 96, 0.6, max_total_tokens=96, seed=1),
            GenerationRequest(Task.MEMORY, prompt, settings.max_new_tokens, settings.temperature, seed=1),
        ]
    )
    remembered = clean_memory(memory[0], settings.max_new_tokens)
    assert remembered is not None and remembered.item is not None
    assert remembered.item.text == "[좋아하는 음식: 떡볶이]"
    assert clean_output_message(answer[0], trial_index=0) is not None
    assert "[" not in answer[0].text
