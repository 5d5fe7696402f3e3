"""The PEFT text generator on the tiny stand-ins: batching, adapters, limits, stopping, loading."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from core.prompts import ANSWER_END
from core.types import Generation, GenerationRequest, Task
from models import llm, tiny
from models.device import cpu_has_fast_bfloat16, cpu_has_fast_int8, resolve_device, resolve_dtype, resolve_int8
from models.errors import CheckpointMismatch, ModelFilesMissing
from models.layout import TASKS, ModelLayout
from models.llm import PeftTextGenerator, load_text_generator
from models.quantize import DynamicInt8Linear

PROMPTS = {
    Task.OUTPUT_MESSAGE: "(오로라 답변 요약) 사용자가 부산에 산다고 말함 (사용자 질문) 응 광안리 근처야 (답변 시작)",
    Task.MEMORY: "나 고양이 키워 (답변 시작)",
    Task.SUMMARY: "심심해 (오로라 답변) 그럼 나랑 수다 떨자! 요즘 재밌는 일 있었어?  (답변 시작)",
    Task.EYES_MOUTH_POSE: " 오 부산 좋다! 바다 자주 보러 가?  (답변 시작)",
}


def greedy_request(task: Task, prompt: str | None = None, **changes: Any) -> GenerationRequest:
    request = GenerationRequest(task=task, prompt=prompt or PROMPTS[task], max_new_tokens=48, temperature=0.6)
    return dataclasses.replace(request, **changes)


@pytest.fixture(scope="session")
def greedy(tiny_layout: ModelLayout) -> PeftTextGenerator:  # noqa: F811
    return load_text_generator(tiny_layout, device="cpu", dtype="float32", greedy=True)


def solo(generator: PeftTextGenerator, request: GenerationRequest) -> list[Generation]:
    return generator.generate([request])[0]


@pytest.mark.parametrize(("call_rows", "prefills"), [(10**6, 1), (0, 2)], ids=["one-prefill", "two-prefills"])
def test_a_mixed_batch_gives_each_request_its_solo_result(
    greedy: PeftTextGenerator, monkeypatch: pytest.MonkeyPatch, call_rows: int, prefills: int
) -> None:
    """Prompts of different lengths for all four adapters: left padding and per-row adapters,
    prefilled in one batch or in two of different widths that decode together."""
    requests = [greedy_request(task) for task in TASKS]
    alone = [solo(greedy, request) for request in requests]
    monkeypatch.setattr(llm, "PREFILL_CALL_ROWS", call_rows)
    calls: list[int] = []
    prefill = greedy._prefill

    def counted(input_ids: torch.Tensor, *rest: Any) -> Any:
        calls.append(len(input_ids))
        return prefill(input_ids, *rest)

    monkeypatch.setattr(greedy, "_prefill", counted)
    assert greedy.generate(requests) == alone
    assert len(calls) == prefills and sum(calls) == len(requests)
    assert greedy.generate(requests[::-1]) == alone[::-1]
    assert all(samples[0].text.endswith(ANSWER_END) for samples in alone)


def test_one_prompt_under_two_adapters_in_one_batch(greedy: PeftTextGenerator) -> None:
    prompt = "나 떡볶이 진짜 좋아해 (답변 시작)"
    answer_alone = solo(greedy, greedy_request(Task.OUTPUT_MESSAGE, prompt))
    memory_alone = solo(greedy, greedy_request(Task.MEMORY, prompt))
    answer, memory = greedy.generate([greedy_request(Task.OUTPUT_MESSAGE, prompt), greedy_request(Task.MEMORY, prompt)])
    assert (answer, memory) == (answer_alone, memory_alone)
    assert memory[0].text == " [좋아하는 음식: 떡볶이] (답변 종료)"
    assert answer[0].text != memory[0].text
    assert solo(greedy, greedy_request(Task.OUTPUT_MESSAGE, prompt)) == answer_alone, "no adapter state left behind"


def test_generation_reports_tokens_and_stops_right_after_the_end_marker(
    greedy: PeftTextGenerator,
    tiny_layout: ModelLayout,  # noqa: F811
) -> None:
    """Same tokens as transformers' own greedy `generate` with the adapter, up to the marker."""
    task = Task.OUTPUT_MESSAGE
    (ours,) = solo(greedy, greedy_request(task))
    tokenizer = AutoTokenizer.from_pretrained(tiny_layout.adapter_dir(task))
    base = AutoModelForCausalLM.from_pretrained(tiny_layout.base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tiny_layout.adapter_dir(task)).eval()
    prompt_ids = tokenizer(PROMPTS[task], return_tensors="pt").input_ids
    with torch.inference_mode():
        reference = model.generate(
            input_ids=prompt_ids,
            attention_mask=torch.ones_like(prompt_ids),
            do_sample=False,
            max_new_tokens=ours.new_tokens + 5,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=None,
        )[0, prompt_ids.shape[1] :].tolist()

    assert ours.prompt_tokens == prompt_ids.shape[1] == greedy.count_tokens(PROMPTS[task])
    assert ours.text == tokenizer.decode(reference[: ours.new_tokens], skip_special_tokens=True)
    assert ours.text.endswith(ANSWER_END) and ANSWER_END not in ours.text[: -len(ANSWER_END)]
    assert ours.new_tokens < len(reference), "the reference went on past the marker; we stopped"


def test_a_stop_text_split_over_several_tokens(tiny_layout: ModelLayout) -> None:  # noqa: F811
    """The real tokenizer spells "(답변 종료)" in five tokens; the stop rule must not rely on one."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_layout.adapter_dir(Task.OUTPUT_MESSAGE))
    base = AutoModelForCausalLM.from_pretrained(tiny_layout.base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tiny_layout.adapter_dir(TASKS[0]), adapter_name=TASKS[0].value)
    for task in TASKS[1:]:
        model.load_adapter(tiny_layout.adapter_dir(task), adapter_name=task.value)
    prompt = "오늘 점심 뭐 먹을까? (답변 시작)"
    (full,) = solo(PeftTextGenerator(model, tokenizer, greedy=True), greedy_request(Task.OUTPUT_MESSAGE, prompt))
    assert full.text == " 김치찌개 어때? 날씨 쌀쌀할 때 딱이야! (답변 종료)"

    stop_text = "쌀쌀할 때"
    assert len(tokenizer.encode(stop_text, add_special_tokens=False)) > 1
    stopped = PeftTextGenerator(model, tokenizer, greedy=True, stop_text=stop_text)
    (short,) = solo(stopped, greedy_request(Task.OUTPUT_MESSAGE, prompt))
    assert short.text == " 김치찌개 어때? 날씨 쌀쌀할 때"
    assert short.new_tokens == len(tokenizer.encode(short.text, add_special_tokens=False))


@pytest.mark.parametrize("task", TASKS, ids=[task.value for task in TASKS])
def test_the_adapters_carry_the_tasks(greedy: PeftTextGenerator, tiny_layout: ModelLayout, task: Task) -> None:  # noqa: F811
    """The base alone answers the dataset's prompts differently from the adapter, mostly.

    (Not always: the base answers with the likeliest answer of any task, and a common expression
    such as "(눈 크게, 입 크게, 고개 돌림 없음)" is sometimes also the right one.)
    """
    prompts = sorted({example.prompt for example in tiny.load_examples() if example.task is task})
    ours = [
        samples[0].text for samples in greedy.generate([greedy_request(task, p, max_new_tokens=16) for p in prompts])
    ]

    tokenizer = AutoTokenizer.from_pretrained(tiny_layout.adapter_dir(task), padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(tiny_layout.base_model_dir, dtype=torch.float32).eval()
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        plain = base.generate(**batch, do_sample=False, max_new_tokens=16, pad_token_id=tokenizer.pad_token_id)
    theirs = tokenizer.batch_decode(plain[:, batch.input_ids.shape[1] :], skip_special_tokens=True)

    def answer(text: str) -> str:
        return text.split(ANSWER_END)[0].strip()

    agreeing = sum(answer(a) == answer(b) for a, b in zip(ours, theirs, strict=True))
    assert agreeing < len(prompts) / 2, f"the base alone gives the {task.value} answer to {agreeing} of {len(prompts)}"


def test_length_limits(greedy: PeftTextGenerator) -> None:
    task = Task.SUMMARY
    (full,) = solo(greedy, greedy_request(task))
    assert full.new_tokens > 4

    (short,) = solo(greedy, greedy_request(task, max_new_tokens=3))
    assert short.new_tokens == 3
    assert full.text.startswith(short.text)

    (capped,) = solo(greedy, greedy_request(task, max_total_tokens=full.prompt_tokens + 4))
    assert capped.new_tokens == 4
    assert capped.prompt_tokens + capped.new_tokens == full.prompt_tokens + 4

    (nothing,) = solo(greedy, greedy_request(task, max_total_tokens=full.prompt_tokens - 1))
    assert nothing == Generation(text="", prompt_tokens=full.prompt_tokens, new_tokens=0)


class _TickingClock:
    """A monotonic clock that moves one second each time it is read."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_a_request_stops_at_its_deadline_and_its_neighbours_do_not(
    greedy: PeftTextGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = Task.SUMMARY
    (full,) = solo(greedy, greedy_request(task))
    clock = _TickingClock()
    monkeypatch.setattr("models.llm.time.monotonic", clock)

    (expired,) = solo(greedy, greedy_request(task, deadline=clock.now))
    assert expired == Generation(text="", prompt_tokens=full.prompt_tokens, new_tokens=0)

    # The clock is read once when the request is admitted and once per decoding step.
    hurried, patient = greedy.generate([greedy_request(task, deadline=clock.now + 4), greedy_request(task)])
    assert hurried[0].new_tokens == 3 < full.new_tokens
    assert full.text.startswith(hurried[0].text)
    assert patient == [full]


def test_samples_and_empty_requests(greedy: PeftTextGenerator) -> None:
    results = greedy.generate([greedy_request(Task.MEMORY, num_samples=3), greedy_request(Task.SUMMARY, num_samples=0)])
    assert [len(samples) for samples in results] == [3, 0]
    assert results[0][0] == results[0][1] == results[0][2] == solo(greedy, greedy_request(Task.MEMORY))[0]
    assert greedy.generate([]) == []


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(
    sampling_generator: PeftTextGenerator,  # noqa: F811
) -> None:
    # Summaries at a high temperature: enough randomness for seeds to matter.
    request = greedy_request(Task.SUMMARY, temperature=3.0, num_samples=6, seed=7)
    first = solo(sampling_generator, request)
    assert solo(sampling_generator, request) == first
    neighbours = [greedy_request(Task.OUTPUT_MESSAGE, temperature=3.0, seed=1), greedy_request(Task.MEMORY, seed=2)]
    assert sampling_generator.generate([neighbours[0], request, neighbours[1]])[1] == first
    assert len({sample.text for sample in first}) > 1, "the samples of one request differ"
    other_seed = solo(sampling_generator, greedy_request(Task.SUMMARY, temperature=3.0, num_samples=6, seed=8))
    assert other_seed != first


def test_count_tokens(greedy: PeftTextGenerator) -> None:
    assert greedy.count_tokens("") == 0
    assert greedy.count_tokens(ANSWER_END) == 1, "the tiny tokenizer keeps markers whole"
    assert (
        greedy.count_tokens("안녕 오로라!")
        == solo(greedy, greedy_request(Task.MEMORY, "안녕 오로라!"))[0].prompt_tokens
    )


def test_bfloat16_generates_in_format(tiny_layout: ModelLayout) -> None:  # noqa: F811
    generator = load_text_generator(tiny_layout, device="cpu", dtype="bfloat16", greedy=True)
    assert generator.dtype == torch.bfloat16
    (memory,) = solo(generator, greedy_request(Task.MEMORY, "나 떡볶이 진짜 좋아해 (답변 시작)"))
    assert memory.text == " [좋아하는 음식: 떡볶이] (답변 종료)"


def test_int8_base_weights_keep_the_adapters_and_the_format(tiny_layout: ModelLayout) -> None:  # noqa: F811
    generator = load_text_generator(tiny_layout, device="cpu", dtype="bfloat16", greedy=True, int8=True)
    modules = dict(generator.model.named_modules())
    assert any(isinstance(module, DynamicInt8Linear) for module in modules.values())
    float_linears = [name for name, module in modules.items() if type(module) is torch.nn.Linear]
    assert float_linears and all(".lora_" in name for name in float_linears), "only the adapters stay float"
    (memory,) = solo(generator, greedy_request(Task.MEMORY, "나 떡볶이 진짜 좋아해 (답변 시작)"))
    assert memory.text == " [좋아하는 음식: 떡볶이] (답변 종료)"


def test_int8_is_a_cpu_setting() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_int8("auto", cpu) is cpu_has_fast_int8()
    assert resolve_int8("auto", cuda) is False
    assert resolve_int8("on", cpu) is True
    assert resolve_int8("off", cpu) is False
    with pytest.raises(ValueError, match="CPU only"):
        resolve_int8("on", cuda)
    with pytest.raises(ValueError, match="unknown int8 setting"):
        resolve_int8("yes", cpu)


def _linked_layout(source: ModelLayout, target: Path, *, without: Task) -> ModelLayout:
    layout = ModelLayout(target)
    layout.llm_dir.mkdir(parents=True)
    (layout.base_model_dir).symlink_to(source.base_model_dir, target_is_directory=True)
    for task in TASKS:
        if task is not without:
            layout.adapter_dir(task).symlink_to(source.adapter_dir(task), target_is_directory=True)
    return layout


def test_a_missing_adapter_names_its_files_and_the_fix(tiny_layout: ModelLayout, tmp_path: Path) -> None:  # noqa: F811
    layout = _linked_layout(tiny_layout, tmp_path / "models", without=Task.SUMMARY)
    with pytest.raises(ModelFilesMissing) as caught:
        load_text_generator(layout, device="cpu")
    message = str(caught.value)
    assert str(layout.adapter_dir(Task.SUMMARY) / "adapter_config.json") in message
    assert "ohlora download" in message
    assert all(path.parent == layout.adapter_dir(Task.SUMMARY) for path in caught.value.missing)


def test_an_adapter_that_does_not_fit_is_an_error(tiny_layout: ModelLayout, tmp_path: Path) -> None:  # noqa: F811
    layout = _linked_layout(tiny_layout, tmp_path / "models", without=Task.MEMORY)
    folder = layout.adapter_dir(Task.MEMORY)
    shutil.copytree(tiny_layout.adapter_dir(Task.MEMORY), folder)
    weights = load_file(folder / "adapter_model.safetensors")
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, folder / "adapter_model.safetensors")
    with pytest.raises(CheckpointMismatch, match="does not match the model"):
        load_text_generator(layout, device="cpu")


def test_device_and_dtype_settings() -> None:
    cpu = torch.device("cpu")
    assert resolve_device("cpu") == cpu
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("float16", cpu) is torch.float16
    assert resolve_dtype("auto", cpu) is (torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32)
    with pytest.raises(ValueError, match="unknown dtype"):
        resolve_dtype("float8", cpu)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
