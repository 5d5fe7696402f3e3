"""Dynamic int8 under the LoRA adapters, on the tiny trained stand-ins."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoTokenizer

from core.prompts import TASK_SETTINGS, build_request
from core.types import Task
from models import cpu_kernel
from models.cpu_kernel import CpuKernel
from models.layout import TASKS, ModelLayout
from models.llm import PeftTextGenerator, load_text_generator
from models.quantize import (
    DynamicInt8Linear,
    OneDnnInt8Linear,
    VnniInt8Linear,
    compare_logits,
    int8_linear,
    prompt_logits,
    quantize_base_linears,
)
from models.tiny import ensure_tiny_models, load_examples
from tests.conftest import REPO_ROOT

PROMPTS_PER_TASK = 6


@pytest.fixture(scope="module")
def layout() -> ModelLayout:
    return ensure_tiny_models(REPO_ROOT / "data" / "tiny_models")


@pytest.fixture(params=["onednn", "ours"])
def kernel(request: pytest.FixtureRequest) -> CpuKernel | None:
    """Both int8 kernels: oneDNN's (None) and ours, where this machine can build and run it."""
    if request.param == "onednn":
        return None
    return request.getfixturevalue("ours")


def load(layout: ModelLayout) -> tuple[PeftModel, Any]:
    """The base in float32 with the four adapters, as the product loads them."""
    model = load_text_generator(layout, device="cpu", dtype="float32").model
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(Task.OUTPUT_MESSAGE), local_files_only=True)
    return model, tokenizer


def tiny_prompts() -> list[tuple[Task, str]]:
    chosen: list[tuple[Task, str]] = []
    for task in TASKS:
        prompts = list(dict.fromkeys(example.prompt for example in load_examples() if example.task is task))
        chosen += [(task, prompt) for prompt in prompts[:PROMPTS_PER_TASK]]
    return chosen


def linears(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear | DynamicInt8Linear)}


def test_only_the_base_layers_become_int8(layout: ModelLayout, kernel: CpuKernel | None) -> None:
    model, _ = load(layout)
    before = linears(model)
    adapter_weights = {name: p.clone() for name, p in model.named_parameters() if ".lora_" in name}
    report = quantize_base_linears(model, kernel)

    after = linears(model)
    assert set(after) == set(before)
    int8 = {name for name, module in after.items() if isinstance(module, DynamicInt8Linear)}
    assert int8 == {name for name in before if ".lora_" not in name}
    assert report.layers == len(int8) > 0
    assert all(type(after[name]) is nn.Linear for name in set(after) - int8)
    assert report.int8_bytes < report.replaced_bytes / 3  # float32 → int8 plus scales
    adapters_now = dict(model.named_parameters())
    assert all(torch.equal(adapters_now[name], value) for name, value in adapter_weights.items())


def test_int8_logits_agree_with_the_original_on_tiny_prompts(layout: ModelLayout, kernel: CpuKernel | None) -> None:
    model, tokenizer = load(layout)
    batches = [(task.value, tokenizer(prompt, return_tensors="pt")["input_ids"]) for task, prompt in tiny_prompts()]
    reference = prompt_logits(model, batches)
    quantize_base_linears(model, kernel)
    agreement = compare_logits(reference, prompt_logits(model, batches))
    assert agreement.positions == sum(ids.shape[1] for _, ids in batches)
    assert agreement.top1 >= 0.95
    assert agreement.relative_error < 0.05


def test_quantized_model_answers_like_the_original(layout: ModelLayout, kernel: CpuKernel | None) -> None:
    """Greedy answers of all four adapters in one mixed batch, before and after int8."""
    model, tokenizer = load(layout)
    requests = [
        build_request(task, prompt) for task, prompt in tiny_prompts() if TASK_SETTINGS[task].max_total_tokens is None
    ]
    before = PeftTextGenerator(model, tokenizer, greedy=True).generate(requests)
    quantize_base_linears(model, kernel)
    after = PeftTextGenerator(model, tokenizer, greedy=True).generate(requests)
    same = sum(a[0].text == b[0].text for a, b in zip(before, after, strict=True))
    assert same >= 0.8 * len(requests)


def test_the_adapters_still_decide_after_quantisation(layout: ModelLayout, kernel: CpuKernel | None) -> None:
    """output_message and memory see the same prompt; only their adapters tell them apart."""
    model, tokenizer = load(layout)
    quantize_base_linears(model, kernel)
    ids = tokenizer("나 떡볶이 진짜 좋아해 (답변 시작)", return_tensors="pt")["input_ids"]
    answer, memory = prompt_logits(model, [(Task.OUTPUT_MESSAGE.value, ids), (Task.MEMORY.value, ids)])
    assert not torch.allclose(answer, memory, atol=1e-2)


def test_compare_logits() -> None:
    reference = [torch.tensor([[1.0, 3.0, 2.0], [0.0, -1.0, 5.0]])]
    assert compare_logits(reference, reference).top1 == 1.0
    assert compare_logits(reference, reference).relative_error == 0.0
    flipped = [torch.tensor([[3.0, 1.0, 2.0], [0.0, -1.0, 5.0]])]
    agreement = compare_logits(reference, flipped)
    assert agreement.positions == 2 and agreement.top1 == 0.5 and agreement.relative_error > 0
    with pytest.raises(ValueError):
        compare_logits(reference, [torch.zeros(2, 4)])
    with pytest.raises(ValueError):
        compare_logits([], [])


def test_a_quantised_layer_computes_what_its_weight_says(kernel: CpuKernel | None) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = int8_linear(linear, kernel)
    assert isinstance(layer, OneDnnInt8Linear if kernel is None else VnniInt8Linear)
    row_sums = 0 if kernel is None else 4 * 48
    assert layer.weight_bytes == 64 * 48 + 4 * 48 + 4 * 48 + row_sums
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 5, 64).to(dtype)
        out = layer(x)
        assert out.dtype == dtype and out.shape == (2, 5, 48)
        expected = linear(x.float())
        assert (out.float() - expected).norm() / expected.norm() < 0.02
    # No bias, and an all-zero input (its scale must not divide by zero).
    unbiased = int8_linear(nn.Linear(64, 8, bias=False), kernel)
    assert torch.equal(unbiased(torch.zeros(3, 64)), torch.zeros(3, 8))


@pytest.mark.parametrize("rows", [1, 2, 3, VnniInt8Linear.MAX_KERNEL_ROWS, VnniInt8Linear.MAX_KERNEL_ROWS + 1, 200])
@pytest.mark.parametrize(("out_features", "in_features"), [(48, 64), (7, 100), (301, 1000), (5, 1)])
def test_our_kernel_on_every_shape(ours: CpuKernel, rows: int, out_features: int, in_features: int) -> None:
    """Row counts on both sides of the GEMV/GEMM switch; sizes that are not multiples of the
    kernel's 16-row blocks or 64 input columns; float32, bfloat16 and float16 inputs."""
    torch.manual_seed(rows * out_features + in_features)
    linear = nn.Linear(in_features, out_features)
    layer = VnniInt8Linear(linear, ours)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(rows, in_features).to(dtype)
        out = layer(x)
        assert out.dtype == dtype and out.shape == (rows, out_features)
        expected = linear(x.float())
        assert (out.float() - expected).norm() / expected.norm() < 0.02, dtype


def test_a_layer_too_wide_for_our_kernel_goes_to_onednn(ours: CpuKernel) -> None:
    with torch.device("meta"):
        wide = nn.Linear(VnniInt8Linear.MAX_IN_FEATURES + 1, 2)
    wide.weight = nn.Parameter(torch.ones(2, VnniInt8Linear.MAX_IN_FEATURES + 1))
    wide.bias = nn.Parameter(torch.zeros(2))
    assert isinstance(int8_linear(wide, ours), OneDnnInt8Linear)
    assert isinstance(int8_linear(nn.Linear(64, 2), ours), VnniInt8Linear)


def test_our_kernel_rejects_what_it_cannot_multiply(ours: CpuKernel) -> None:
    weight, scales, sums, bias = (
        torch.zeros(4, 8, dtype=torch.int8),
        torch.ones(4),
        torch.zeros(4, dtype=torch.int32),
        torch.empty(0),
    )
    with pytest.raises(RuntimeError, match="features"):
        ours.int8_linear(torch.zeros(1, 9), weight, scales, sums, bias)
    with pytest.raises(RuntimeError, match="int8 matrix"):
        ours.int8_linear(torch.zeros(1, 8), weight.float(), scales, sums, bias)
    with pytest.raises(RuntimeError, match="scale"):
        ours.int8_linear(torch.zeros(1, 8), weight, torch.ones(3), sums, bias)
    too_wide = VnniInt8Linear.MAX_IN_FEATURES + 1
    with pytest.raises(RuntimeError, match="overflow"):
        ours.int8_linear(torch.zeros(1, too_wide), torch.zeros(4, too_wide, dtype=torch.int8), scales, sums, bias)


@pytest.fixture
def fresh_kernel_load() -> Iterator[None]:
    """`cpu_kernel.load` remembers its answer per process; these tests change the answer."""
    cpu_kernel.load.cache_clear()
    yield
    cpu_kernel.load.cache_clear()


def test_without_vnni_the_kernel_is_not_built(
    monkeypatch: pytest.MonkeyPatch, fresh_kernel_load: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: False)
    monkeypatch.setattr("torch.utils.cpp_extension.load", _must_not_build)
    with caplog.at_level(logging.INFO, logger="models.cpu_kernel"):
        assert cpu_kernel.load() is None
    assert "no AVX512-VNNI" in caplog.text


def test_a_failed_build_falls_back_with_one_line_that_says_why(
    monkeypatch: pytest.MonkeyPatch, fresh_kernel_load: None, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(torch.cpu, "_is_vnni_supported", lambda: True)

    def broken_build(**_: object) -> None:
        raise RuntimeError("Error building extension\nninja: build stopped\nc++: error: command not found: g++")

    monkeypatch.setattr("torch.utils.cpp_extension.load", broken_build)
    with caplog.at_level(logging.WARNING, logger="models.cpu_kernel"):
        assert cpu_kernel.load() is None
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "command not found: g++" in warnings[0] and "oneDNN" in warnings[0]
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_base_linears(model, cpu_kernel.load())
    assert isinstance(model[0], OneDnnInt8Linear)


def _must_not_build(**_: object) -> None:
    raise AssertionError("the kernel was built on a CPU without VNNI")
