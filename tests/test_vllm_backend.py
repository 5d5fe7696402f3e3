"""The vLLM backend against a local fake of the OpenAI-compatible API, and `export-merged`.

Nothing leaves 127.0.0.1. The layout holds a tokenizer trained here in a second (a byte-level BPE
on a few Korean sentences, the end markers as added tokens) and, for the merge tests, a tiny
GPT-NeoX base with four random rank-4 LoRA adapters on `query_key_value`.
"""

from __future__ import annotations

import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from core.engine import Engine, EngineOptions
from core.prompts import TASK_SETTINGS, build_request
from core.store import InMemoryStore
from core.types import GenerationRequest, IncomingMessage, ReplyKind, Task, TextGenerator
from core.worker import InferenceWorker
from models.errors import ModelFilesMissing
from models.hub import RetryPolicy
from models.layout import TASKS, ModelLayout
from models.merge import CheckpointMismatch, export_merged, merged_model_dir
from models.vllm_backend import (
    VllmBadResponse,
    VllmModelsMissing,
    VllmTextGenerator,
    VllmUnavailable,
    load_vllm_generator,
    lora_serve_command,
    merged_serve_commands,
    merged_url_setting,
    parse_endpoints,
)
from tests.fake_openai_api import END, FakeOpenAIServer, Sample, echo_responder
from tests.fakes import FakeEmbedder, FakeRenderer

pytestmark = pytest.mark.filterwarnings(
    # PEFT 0.21 reads transformers 5's deprecated `is_gradient_checkpointing` when it wraps a model.
    "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
)

NO_WAIT = RetryPolicy(attempts=3, first_wait_s=0.0, max_wait_s=0.0)
ALL_MODELS = [task.value for task in TASKS]
SENTENCES = [
    "안녕 오로라! 오늘 날씨가 정말 좋다.",
    "나는 떡볶이를 제일 좋아해. 너는 무슨 음식 좋아해?",
    "그렇구나! 나도 떡볶이 좋아해. 얘기 더 해 줘.",
    "(눈 보통, 입 크게, 고개 돌림 없음)",
    "[좋아하는 음식: 떡볶이] 오늘 저녁 뭐 먹을까?",
    "(오로라 답변 요약) 음식 이야기 (사용자 질문) 주말에 뭐 해?",
]
MARKERS = ["(답변 시작)", "(답변 종료)"]


def _train_tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(SENTENCES * 4, trainer)
    core.add_tokens(MARKERS)
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _tiny_base(vocab_size: int) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPTNeoXForCausalLM(config).eval()


def _write_adapter(base_dir: Path, folder: Path, seed: int) -> None:
    """A rank-4 LoRA on query_key_value with B made non-zero (a fresh B is zero: merging would be a no-op)."""
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["query_key_value"], init_lora_weights="gaussian")
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(str(folder))
    # The published configs point at a folder on the author's disk; the loaders must never look there.
    config_path = folder / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    adapter_config["base_model_name_or_path"] = "/home/author/llm/models/polyglot_original"
    config_path.write_text(json.dumps(adapter_config), encoding="utf-8")


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    layout = ModelLayout(tmp_path_factory.mktemp("models"))
    tokenizer = _train_tokenizer()
    base = _tiny_base(len(tokenizer))
    base.save_pretrained(layout.base_model_dir)
    for seed, task in enumerate(TASKS):
        _write_adapter(layout.base_model_dir, layout.adapter_dir(task), seed)
        tokenizer.save_pretrained(layout.adapter_dir(task))
    return layout


@pytest.fixture(scope="module")
def tokenizer(layout: ModelLayout) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast.from_pretrained(layout.adapter_dir(Task.OUTPUT_MESSAGE))


ServerFactory = Callable[..., FakeOpenAIServer]


@pytest.fixture(scope="module")
def fake_vllm(tokenizer: PreTrainedTokenizerFast) -> ServerFactory:
    """Makes fake servers that count prompt tokens as vLLM would, with the adapter's tokenizer."""

    def make(models: Sequence[str] = ALL_MODELS, **options: Any) -> FakeOpenAIServer:
        options.setdefault("prompt_tokens", lambda prompt: len(tokenizer(prompt)["input_ids"]))
        return FakeOpenAIServer(models, **options)

    return make


@pytest.fixture
def server(fake_vllm: ServerFactory) -> Iterator[FakeOpenAIServer]:
    with fake_vllm() as fake:
        yield fake


@pytest.fixture
def generator(layout: ModelLayout, server: FakeOpenAIServer) -> Iterator[VllmTextGenerator]:
    with load_vllm_generator(layout, server.base_url, retry=NO_WAIT) as backend:
        yield backend


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _by_model(server: FakeOpenAIServer) -> dict[str, dict]:
    return {body["model"]: body for body in server.completions()}


# ---------------------------------------------------------------------------------------------
# What goes over the wire
# ---------------------------------------------------------------------------------------------


def test_each_task_is_requested_from_its_model_with_upstream_sampling(
    generator: VllmTextGenerator, server: FakeOpenAIServer
) -> None:
    prompt = "나는 떡볶이를 제일 좋아해 (답변 시작)"
    requests = [build_request(task, prompt, num_samples=2, seed=7) for task in TASKS]

    generator.generate(requests)

    sent = _by_model(server)
    assert sorted(sent) == sorted(ALL_MODELS)
    for task in TASKS:
        body = sent[task.value]
        settings = TASK_SETTINGS[task]
        assert body["prompt"] == prompt
        assert body["n"] == 2
        assert body["seed"] == 7
        assert body["temperature"] == settings.temperature
        assert (body["top_k"], body["top_p"]) == (50, 1.0)
        assert body["stop"] == ["(답변 종료)"]
        assert body["include_stop_str_in_output"] is True
        assert body["skip_special_tokens"] is True
        assert body["return_token_ids"] is True
    prompt_tokens = generator.count_tokens(prompt)
    assert sent["output_message"]["max_tokens"] == 96 - prompt_tokens
    assert (sent["memory"]["max_tokens"], sent["summary"]["max_tokens"], sent["eyes_mouth_pose"]["max_tokens"]) == (
        24,
        48,
        32,
    )


def test_max_tokens_is_the_smaller_of_the_new_and_the_total_budget(
    generator: VllmTextGenerator, server: FakeOpenAIServer
) -> None:
    prompt = "안녕 오로라 (답변 시작)"
    total_bound = GenerationRequest(
        Task.OUTPUT_MESSAGE, prompt, max_new_tokens=50, temperature=0.6, max_total_tokens=40
    )
    new_bound = GenerationRequest(Task.OUTPUT_MESSAGE, prompt, max_new_tokens=5, temperature=0.6, max_total_tokens=40)

    generator.generate([total_bound])
    generator.generate([new_bound])

    first, second = server.completions()
    assert first["max_tokens"] == 40 - generator.count_tokens(prompt)
    assert second["max_tokens"] == 5


def test_a_prompt_that_fills_the_total_budget_is_not_sent(
    generator: VllmTextGenerator, server: FakeOpenAIServer
) -> None:
    prompt = " ".join(SENTENCES)
    request = GenerationRequest(
        Task.OUTPUT_MESSAGE, prompt, max_new_tokens=96, temperature=0.6, max_total_tokens=10, num_samples=2
    )

    [generations] = generator.generate([request])

    assert server.completions() == []
    assert [(g.text, g.new_tokens) for g in generations] == [("", 0), ("", 0)]
    assert generations[0].prompt_tokens == generator.count_tokens(prompt)


def test_a_request_for_no_samples_is_not_sent(generator: VllmTextGenerator, server: FakeOpenAIServer) -> None:
    results = generator.generate([build_request(Task.MEMORY, "안녕 (답변 시작)", num_samples=0)])

    assert results == [[]]
    assert server.completions() == []


def test_the_api_key_is_sent_as_a_bearer_token(layout: ModelLayout, fake_vllm: ServerFactory) -> None:
    with fake_vllm(api_key="s3cret") as server:
        with load_vllm_generator(layout, server.base_url, "s3cret", retry=NO_WAIT) as backend:
            backend.generate([build_request(Task.MEMORY, "안녕 (답변 시작)")])
        assert {r.headers["authorization"] for r in server.requests} == {"Bearer s3cret"}

        with pytest.raises(VllmBadResponse, match="401"):
            load_vllm_generator(layout, server.base_url, None, retry=NO_WAIT)


# ---------------------------------------------------------------------------------------------
# What comes back
# ---------------------------------------------------------------------------------------------


def test_a_mixed_batch_comes_back_in_request_order_with_every_sample(
    generator: VllmTextGenerator, server: FakeOpenAIServer
) -> None:
    tasks = [Task.SUMMARY, Task.OUTPUT_MESSAGE, Task.EYES_MOUTH_POSE, Task.MEMORY, Task.OUTPUT_MESSAGE, Task.SUMMARY]
    requests = [build_request(task, f"질문 {k} (답변 시작)", num_samples=1 + k % 3) for k, task in enumerate(tasks)]

    results = generator.generate(requests)

    assert len(server.completions()) == len(requests)
    for request, generations in zip(requests, results, strict=True):
        assert [g.text for g in generations] == [
            f" {request.task.value}|{request.prompt}|{j}{END}" for j in range(request.num_samples)
        ]
        assert [g.new_tokens for g in generations] == [3 + j for j in range(request.num_samples)]
        assert {g.prompt_tokens for g in generations} == {generator.count_tokens(request.prompt)}


def test_samples_of_one_request_are_one_call_and_keep_their_index_order(
    generator: VllmTextGenerator, server: FakeOpenAIServer
) -> None:
    [generations] = generator.generate([build_request(Task.OUTPUT_MESSAGE, "안녕 (답변 시작)", num_samples=5)])

    assert len(server.completions()) == 1
    assert [g.text.split("|")[2] for g in generations] == [f"{j}{END}" for j in range(5)]


def test_the_requests_of_one_call_are_in_flight_together(layout: ModelLayout, fake_vllm: ServerFactory) -> None:
    """Each completion waits at a barrier for all four: a client that sent them one by one would break it."""
    gate = threading.Barrier(4, timeout=20)
    with fake_vllm(gate=gate) as server:
        with load_vllm_generator(layout, server.base_url, retry=RetryPolicy(attempts=1)) as backend:
            results = backend.generate([build_request(task, "안녕 (답변 시작)") for task in TASKS])
    assert [len(samples) for samples in results] == [1, 1, 1, 1]


def test_past_its_deadline_a_request_comes_back_empty_and_the_others_are_answered(
    layout: ModelLayout, fake_vllm: ServerFactory
) -> None:
    """A server that has not answered by the turn's deadline does not hold up the worker."""
    answer_late = threading.Event()

    def responder(body: dict, index: int) -> Sample:
        if body["prompt"].startswith("늦게"):
            answer_late.wait(timeout=30)
        return echo_responder(body, index)

    expired = replace(build_request(Task.MEMORY, "늦게 (답변 시작)", num_samples=2), deadline=time.monotonic())
    in_time = replace(build_request(Task.SUMMARY, "안녕 (답변 시작)"), deadline=time.monotonic() + 600)
    no_deadline = build_request(Task.OUTPUT_MESSAGE, "안녕 (답변 시작)")
    with fake_vllm(responder=responder) as server:
        with load_vllm_generator(layout, server.base_url, retry=NO_WAIT) as backend:
            try:
                late, summary, answer = backend.generate([expired, in_time, no_deadline])
            finally:
                answer_late.set()

    assert [(g.text, g.new_tokens) for g in late] == [("", 0), ("", 0)]
    assert [g.text for g in summary] == [f" summary|안녕 (답변 시작)|0{END}"]
    assert [g.text for g in answer] == [f" output_message|안녕 (답변 시작)|0{END}"]


def test_new_tokens_without_token_ids_use_usage_then_the_limit_then_the_tokenizer(
    layout: ModelLayout, tokenizer: PreTrainedTokenizerFast, fake_vllm: ServerFactory
) -> None:
    """Older vLLM releases give no per-choice token ids; the memory filter still needs exact counts."""
    stop_text = " 주말에 뭐 해?" + END

    def responder(body: dict, index: int) -> Sample:
        if body["prompt"].startswith("limit"):
            return Sample(text=" 떡볶이" * 30, tokens=body["max_tokens"], finish_reason="length")
        return Sample(text=stop_text, tokens=11 + index)

    with fake_vllm(responder=responder, return_token_ids=False) as server:
        with load_vllm_generator(layout, server.base_url, retry=NO_WAIT) as backend:
            [single], [limited_a, limited_b], [stopped_a, stopped_b] = backend.generate(
                [
                    build_request(Task.SUMMARY, "one (답변 시작)"),
                    build_request(Task.MEMORY, "limit (답변 시작)", num_samples=2),
                    build_request(Task.SUMMARY, "two (답변 시작)", num_samples=2),
                ]
            )

    assert single.new_tokens == 11  # usage.completion_tokens of a one-sample request
    assert limited_a.new_tokens == limited_b.new_tokens == 24  # finish_reason "length": the limit
    local_count = len(tokenizer(stop_text, add_special_tokens=False)["input_ids"])
    assert stopped_a.new_tokens == stopped_b.new_tokens == local_count


def test_a_server_with_another_tokenizer_is_reported(
    layout: ModelLayout, fake_vllm: ServerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    with fake_vllm(prompt_tokens=lambda prompt: 1000) as server:
        with load_vllm_generator(layout, server.base_url, retry=NO_WAIT) as backend:
            with caplog.at_level(logging.WARNING, logger="models.vllm_backend"):
                [[generation]] = backend.generate([build_request(Task.MEMORY, "안녕 (답변 시작)")])
    assert generation.prompt_tokens == 1000
    assert "counted 1000 prompt tokens" in caplog.text


# ---------------------------------------------------------------------------------------------
# Start-up checks and failures
# ---------------------------------------------------------------------------------------------


def test_a_task_the_server_does_not_serve_fails_at_start_up_naming_it(
    layout: ModelLayout, fake_vllm: ServerFactory
) -> None:
    with fake_vllm(["output_message", "summary"]) as server:
        with pytest.raises(VllmModelsMissing) as caught:
            load_vllm_generator(layout, server.base_url, retry=NO_WAIT)
        assert [r.path for r in server.requests] == ["/v1/models"]
    message = str(caught.value)
    assert "does not serve memory, eyes_mouth_pose" in message
    assert "--served-model-name" in message and "--lora-modules" in message


def test_an_unreachable_server_is_a_clear_error_after_the_retries(
    layout: ModelLayout, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING, logger="models.vllm_backend"):
        with pytest.raises(VllmUnavailable) as caught:
            load_vllm_generator(layout, url, retry=NO_WAIT)
    assert url in str(caught.value) and "vllm serve" in str(caught.value)
    assert caplog.text.count("attempt") == NO_WAIT.attempts - 1


def test_a_server_error_is_retried_until_it_passes(generator: VllmTextGenerator, server: FakeOpenAIServer) -> None:
    server.fail_next(2, status=503)

    [[generation]] = generator.generate([build_request(Task.SUMMARY, "요약해 줘 (답변 시작)")])

    bodies = server.completions()
    assert len(bodies) == 3 and bodies[0] == bodies[1] == bodies[2]
    assert generation.text == f" summary|요약해 줘 (답변 시작)|0{END}"


def test_a_server_error_that_persists_gives_up_after_the_attempts(
    generator: VllmTextGenerator, server: FakeOpenAIServer
) -> None:
    server.fail_next(10, status=500)

    with pytest.raises(VllmUnavailable, match="kept failing \\(500: scripted failure 500\\)"):
        generator.generate([build_request(Task.SUMMARY, "요약해 줘 (답변 시작)")])

    assert len(server.completions()) == NO_WAIT.attempts


def test_no_retry_starts_after_the_deadline(tokenizer: PreTrainedTokenizerFast, fake_vllm: ServerFactory) -> None:
    """A failing server is not retried for a turn that has already been given up on."""
    patient = RetryPolicy(attempts=10, first_wait_s=0.2, max_wait_s=0.2)
    with fake_vllm(["summary"]) as server:
        server.fail_next(100, status=503)
        with VllmTextGenerator(dict.fromkeys(TASKS, server.base_url), tokenizer, retry=patient) as backend:
            request = replace(build_request(Task.SUMMARY, "요약해 줘 (답변 시작)"), deadline=time.monotonic() + 0.5)
            with pytest.raises(VllmUnavailable, match="kept failing"):
                backend.generate([request])
        # Leaving the block waited for the request thread, so every attempt it made is counted.
        attempts = len(server.completions())
    assert 1 <= attempts <= 4, f"{attempts} attempts for a 0.5 s deadline with 0.2 s between them"


def test_a_refused_request_is_not_retried(tokenizer: PreTrainedTokenizerFast, fake_vllm: ServerFactory) -> None:
    with fake_vllm(["output_message"]) as server:
        endpoints = dict.fromkeys(TASKS, server.base_url)
        with VllmTextGenerator(endpoints, tokenizer, retry=NO_WAIT) as backend:
            with pytest.raises(VllmBadResponse, match="404.*The model `memory` does not exist"):
                backend.generate([build_request(Task.MEMORY, "안녕 (답변 시작)")])
        assert len(server.completions()) == 1


# ---------------------------------------------------------------------------------------------
# Configuration: one server, or one per task
# ---------------------------------------------------------------------------------------------


def test_one_url_serves_every_task_in_any_spelling() -> None:
    for spelling in ("http://gpu:8000", "http://gpu:8000/", "http://gpu:8000/v1", " http://gpu:8000/v1/ "):
        assert parse_endpoints(spelling) == dict.fromkeys(TASKS, "http://gpu:8000")


def test_one_server_per_task_must_name_all_four() -> None:
    setting = (
        "output_message=http://a:8001, memory=http://a:8002/v1,summary=http://a:8003,eyes_mouth_pose=http://a:8004"
    )
    assert parse_endpoints(setting) == {
        Task.OUTPUT_MESSAGE: "http://a:8001",
        Task.MEMORY: "http://a:8002",
        Task.SUMMARY: "http://a:8003",
        Task.EYES_MOUTH_POSE: "http://a:8004",
    }
    with pytest.raises(ValueError, match="no server for summary, eyes_mouth_pose"):
        parse_endpoints("output_message=http://a:8001,memory=http://a:8002")
    with pytest.raises(ValueError, match="unknown task 'chat'"):
        parse_endpoints(setting + ",chat=http://a:9000")


def test_tasks_go_to_their_own_servers(layout: ModelLayout, fake_vllm: ServerFactory) -> None:
    """The merged deployment: each server is checked for, and sent, only its own tasks."""
    conversation = [Task.OUTPUT_MESSAGE, Task.MEMORY]
    with fake_vllm(["output_message", "memory"]) as first, fake_vllm(["summary", "eyes_mouth_pose"]) as second:
        endpoints = {task: (first if task in conversation else second).base_url for task in TASKS}
        with load_vllm_generator(layout, endpoints, retry=NO_WAIT) as backend:
            backend.generate([build_request(task, "안녕 (답변 시작)") for task in TASKS])
        assert sorted(body["model"] for body in first.completions()) == ["memory", "output_message"]
        assert sorted(body["model"] for body in second.completions()) == ["eyes_mouth_pose", "summary"]


def test_the_printed_serve_commands_match_the_url_setting(layout: ModelLayout, tmp_path: Path) -> None:
    merged = {task: merged_model_dir(tmp_path, task) for task in TASKS}
    commands = merged_serve_commands(merged, first_port=9001)
    endpoints = parse_endpoints(merged_url_setting("gpu-host", first_port=9001))
    for task in TASKS:
        words = commands[task].split()
        assert words[:3] == ["vllm", "serve", str(merged[task])]
        assert words[words.index("--served-model-name") + 1] == task.value
        assert endpoints[task] == f"http://gpu-host:{words[words.index('--port') + 1]}"

    lora = lora_serve_command(layout).split()
    assert lora[2] == str(layout.base_model_dir)
    assert lora[lora.index("--max-lora-rank") + 1] == "128"
    assert lora[lora.index("--model-impl") + 1] == "transformers"  # vLLM's own GPT-NeoX has no LoRA
    modules = lora[lora.index("--lora-modules") + 1 :]
    assert modules == [f"{task.value}={layout.adapter_dir(task)}" for task in TASKS]


# ---------------------------------------------------------------------------------------------
# The engine over the wire
# ---------------------------------------------------------------------------------------------


def _well_trained(body: dict, index: int) -> Sample:
    """What a well-behaved Oh-LoRA server answers for each task."""
    texts = {
        "output_message": " 그렇구나! 나도 떡볶이 좋아해.",
        "memory": " [좋아하는 음식: 떡볶이]",
        "summary": " 떡볶이 이야기",
        "eyes_mouth_pose": " (눈 보통, 입 크게, 고개 돌림 없음)",
    }
    return Sample(text=texts[body["model"]] + END, tokens=8)


async def test_the_engine_answers_a_turn_through_vllm(layout: ModelLayout, fake_vllm: ServerFactory) -> None:
    with fake_vllm(responder=_well_trained) as server:
        with load_vllm_generator(layout, server.base_url, retry=NO_WAIT) as backend:
            generator: TextGenerator = backend
            worker = InferenceWorker(generator, FakeEmbedder(), FakeRenderer())
            worker.start()
            try:
                engine = Engine(worker, InMemoryStore(), EngineOptions(), rng=random.Random(0))
                reply = await engine.reply(IncomingMessage("telegram", "7", "7", "나는 떡볶이를 제일 좋아해"))
            finally:
                await worker.stop()

    assert reply.kind is ReplyKind.ANSWER
    assert reply.text.strip() == "그렇구나! 나도 떡볶이 좋아해."
    assert reply.summary is not None and reply.summary.strip() == "떡볶이 이야기"
    assert {body["model"] for body in server.completions()} == set(ALL_MODELS)


# ---------------------------------------------------------------------------------------------
# export-merged: the four models vLLM can serve
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def merged_fp32(layout: ModelLayout, tmp_path_factory: pytest.TempPathFactory) -> dict[Task, Path]:
    return export_merged(layout, tmp_path_factory.mktemp("merged"), dtype=torch.float32)


@torch.inference_mode()
def test_each_merged_model_computes_what_base_plus_its_adapter_computes(
    layout: ModelLayout, merged_fp32: dict[Task, Path]
) -> None:
    from peft import PeftModel

    input_ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    base_logits = AutoModelForCausalLM.from_pretrained(layout.base_model_dir).eval()(input_ids).logits
    for task in TASKS:
        with_adapter = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(layout.base_model_dir), layout.adapter_dir(task)
        ).eval()
        merged = AutoModelForCausalLM.from_pretrained(merged_fp32[task]).eval()
        expected = with_adapter(input_ids).logits
        assert torch.allclose(merged(input_ids).logits, expected, atol=1e-5)
        assert (expected - base_logits).abs().max() > 1e-2, "the adapter must change the model"


def test_a_merged_folder_is_a_plain_servable_model(merged_fp32: dict[Task, Path]) -> None:
    for task, folder in merged_fp32.items():
        assert folder == merged_model_dir(folder.parent, task)
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        assert config["architectures"] == ["GPTNeoXForCausalLM"]
        weights = load_file(folder / "model.safetensors")
        assert not [name for name in weights if "lora" in name]
        assert (folder / "tokenizer.json").is_file()
        assert not folder.with_name(folder.name + ".partial").exists()


def test_export_stores_bfloat16_by_default(layout: ModelLayout, tmp_path: Path) -> None:
    [folder] = export_merged(layout, tmp_path, tasks=[Task.MEMORY]).values()
    assert {tensor.dtype for tensor in load_file(folder / "model.safetensors").values()} == {torch.bfloat16}


def test_an_adapter_missing_a_tensor_is_refused(layout: ModelLayout, tmp_path: Path) -> None:
    broken = ModelLayout(tmp_path / "models")
    _copy_llm(layout, broken)
    weights_path = broken.adapter_dir(Task.SUMMARY) / "adapter_model.safetensors"
    weights = load_file(weights_path)
    dropped = sorted(name for name in weights if "lora_B" in name)[0]
    del weights[dropped]
    save_file(weights, weights_path)

    with pytest.raises(CheckpointMismatch, match="missing"):
        export_merged(broken, tmp_path / "merged", tasks=[Task.SUMMARY])
    assert not any((tmp_path / "merged").iterdir())


def test_an_adapter_with_a_foreign_tensor_is_refused(layout: ModelLayout, tmp_path: Path) -> None:
    broken = ModelLayout(tmp_path / "models")
    _copy_llm(layout, broken)
    weights_path = broken.adapter_dir(Task.MEMORY) / "adapter_model.safetensors"
    weights = load_file(weights_path)
    weights["base_model.model.gpt_neox.layers.0.mlp.dense_h_to_4h.lora_A.weight"] = torch.zeros(4, 32)
    save_file(weights, weights_path)

    with pytest.raises(CheckpointMismatch, match="unexpected"):
        export_merged(broken, tmp_path / "merged", tasks=[Task.MEMORY])


def test_export_without_the_llm_files_names_the_download_command(tmp_path: Path) -> None:
    with pytest.raises(ModelFilesMissing, match="ohlora download") as caught:
        export_merged(ModelLayout(tmp_path), tmp_path / "merged")
    assert ModelLayout(tmp_path).adapter_dir(Task.MEMORY) / "adapter_config.json" in caught.value.missing


def _copy_llm(source: ModelLayout, target: ModelLayout) -> None:
    import shutil

    shutil.copytree(source.llm_dir, target.llm_dir)
