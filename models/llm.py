"""One Polyglot-Ko base model with the four Oh-LoRA adapters, as a batched `TextGenerator`.

Upstream kept four full copies of the 1.3B base, one per task. Here the base is loaded once and
the four LoRA adapters are attached to it as named PEFT adapters; every row of a batch names its
own adapter (PEFT's mixed-adapter batches), so one forward pass serves, say, the output_message
and memory prompts of a turn, or the turns of several users at once.

Decoding is a small loop of our own rather than `model.generate`, because one batch here mixes
what `generate` fixes per call: each request brings its own adapter, temperature, length limits,
number of samples and seed. The loop keeps what matters from `generate`: left padding with
position ids from the attention mask, a KV cache, and the published sampling (SPEC E.3.3:
temperature, then top-k 50, top-p 1.0 unless the base model's generation config says otherwise).
Each prompt is prefilled once, through the HF forward, and its cache repeated for its samples,
since prefill is the compute-bound part and retry candidates share their prompt; the steps
after it, one token per row, go through `models.neox_step`, which does the same arithmetic with
a fraction of the bookkeeping. A request past its deadline stops
at the next token: nobody waits for it any more, and the model is free sooner for those who do.

Measured in CPU seconds (one thread, min of 3, on a shared 2-core AVX512-BF16/AMX Xeon), with a
model of Polyglot-Ko-1.3B's shapes (hidden 2048, 16 heads, FFN 8192, vocab 30080) cut to 4
layers and four random r=128 adapters, one request per adapter, 16-token prompts, 16 new tokens:

| bfloat16 (float32)           | 4 adapters  | 2 adapters  | 1 adapter   |
|------------------------------|-------------|-------------|-------------|
| mixed batch, `adapter_names` | 1.28 (2.90) | 1.18 (1.57) | 1.00 (1.57) |
| grouped, `set_adapter` each  | 4.75 (5.98) | 1.96 (2.92) | 1.05 (1.54) |

Decoding small batches is bound by reading the weights, so one pass for all adapters beats one
pass per adapter, and the mixed path costs nothing when a batch holds a single adapter; hence
every forward names its adapters per row.

The output projection needs care. Slicing the last position of the hidden states with
`[:, -1:, :]` gives a view whose batch stride is not that of a (B, 1, H) tensor; with the base
weights frozen (as PEFT leaves them, `requires_grad=False`) ATen's matmul then declines to fold the
batch into one GEMM and runs a broadcast batched matmul instead. For (B=4, T=40, H=2048) against
the (30080, 2048) bfloat16 head that took 1.76 s instead of 23 ms (7.2 s instead of 9 ms at B=16,
T=60; wall time, two threads). Asking the model for the last position by index (`logits_to_keep`
as a tensor) yields a compact copy, which folds; that is why `_last_position` exists. It is also
why setting `requires_grad` on the head "helped": ATen always folds when an operand needs grad.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from core.prompts import ANSWER_END
from core.types import Generation, GenerationRequest, Task
from models import cpu_kernel
from models.cpu_kernel import CpuKernel
from models.device import resolve_device, resolve_dtype
from models.errors import CheckpointMismatch, ModelFilesMissing
from models.hub import ADAPTER_FILES, BASE_MODEL_FILES, fix_command, missing_files
from models.layout import TASKS, ModelLayout
from models.neox_step import NeoXStep, Prefilled, StepCache
from models.quantize import quantize_base_linears

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 50
DEFAULT_TOP_P = 1.0


@dataclass
class _Row:
    """One sampled sequence; a request has `num_samples` of them."""

    job: _Job
    tokens: list[int] = field(default_factory=list)
    done: bool = False


@dataclass
class _Job:
    """One request on its way through the decoding loop."""

    request: GenerationRequest
    prompt_ids: list[int]
    limit: int
    """New tokens this request may produce: max_new_tokens, cut by max_total_tokens."""
    generator: torch.Generator | None
    """This request's own random stream (None: greedy), so a seeded request ignores its batch."""
    rows: list[_Row] = field(default_factory=list)


class PeftTextGenerator:
    """The four Oh-LoRA adapters over one shared base model.

    Not thread-safe: one inference worker owns it. `greedy` replaces sampling by argmax, which
    makes outputs comparable across batch layouts in tests; a request at temperature 0 is also
    decoded greedily. `stop_text` ends a sequence right after it appears in the new text.
    `kernel` (`models.cpu_kernel`) speeds up the decoding steps' LoRA products on the CPU.
    """

    def __init__(
        self,
        model: PeftModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        greedy: bool = False,
        stop_text: str = ANSWER_END,
        kernel: CpuKernel | None = None,
    ) -> None:
        absent = [task.value for task in TASKS if task.value not in model.peft_config]
        if absent:
            raise ValueError(f"the model lacks the adapters {absent}")
        if not stop_text:
            raise ValueError("stop_text must not be empty")
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._greedy = greedy
        self._stop_text = stop_text
        # However the tokenizer splits the stop text in context, it spans at most one token more
        # than its own encoding (the preceding space may merge or split off).
        self._stop_window = len(tokenizer.encode(" " + stop_text, add_special_tokens=False)) + 1

        config = cast(PreTrainedModel, model.get_base_model()).generation_config or GenerationConfig()
        self._top_k: int = config.top_k if config.top_k is not None else DEFAULT_TOP_K
        self._top_p: float = config.top_p if config.top_p is not None else DEFAULT_TOP_P
        self._eos_ids = _token_ids(config.eos_token_id) | _token_ids(tokenizer.eos_token_id)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._pad_id = pad if pad is not None else 0
        self._device = next(model.parameters()).device
        self._step = NeoXStep(self._model, kernel)

    @property
    def model(self) -> PeftModel:
        """The base with its adapters, for measuring (the benchmark counts the bytes a step reads)."""
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return next(self._model.parameters()).dtype

    def count_tokens(self, text: str) -> int:
        return len(self._tokenizer.encode(text))

    @torch.inference_mode()
    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Generation]]:
        jobs = [self._job(request) for request in requests]
        busy = [job for job in jobs if job.rows and job.limit > 0]
        if busy:
            self._decode(busy)
        return [
            [
                Generation(
                    text=self._text(row.tokens),
                    prompt_tokens=len(job.prompt_ids),
                    new_tokens=len(row.tokens),
                )
                for row in job.rows
            ]
            for job in jobs
        ]

    def _job(self, request: GenerationRequest) -> _Job:
        if request.num_samples < 0 or request.max_new_tokens < 0:
            raise ValueError(f"negative num_samples or max_new_tokens in {request!r}")
        prompt_ids = self._tokenizer.encode(request.prompt)
        if not prompt_ids:
            raise ValueError("an empty prompt cannot be continued")
        limit = request.max_new_tokens
        if request.max_total_tokens is not None:
            limit = min(limit, request.max_total_tokens - len(prompt_ids))
        if request.deadline is not None and time.monotonic() >= request.deadline:
            limit = 0
        generator = None
        if not self._greedy and request.temperature > 0:
            generator = torch.Generator(device=self._device)
            if request.seed is None:
                generator.seed()
            else:
                generator.manual_seed(request.seed)
        job = _Job(request=request, prompt_ids=prompt_ids, limit=max(limit, 0), generator=generator)
        job.rows = [_Row(job) for _ in range(request.num_samples)]
        return job

    def _decode(self, jobs: list[_Job]) -> None:
        """Prefill each prompt once, repeat its cache for its samples, then decode every row."""
        parts: list[Prefilled] = []
        first_logits: list[torch.Tensor] = []
        next_positions: list[torch.Tensor] = []
        rows: list[_Row] = []
        for group in _prefill_groups(jobs):
            input_ids, attention_mask = self._left_pad([job.prompt_ids for job in group])
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            output = self._prefill(input_ids, attention_mask, positions, [job.request.task for job in group])
            owner = torch.tensor([j for j, job in enumerate(group) for _ in job.rows], device=self._device)
            parts.append(Prefilled(cache=_cache_of(output), rows=owner, attends=attention_mask[owner]))
            first_logits.append(_last_logits(output)[owner])
            next_positions.append(positions[owner, -1] + 1)
            rows += [row for job in group for row in job.rows]
        logits, next_position = torch.cat(first_logits), torch.cat(next_positions)
        cache: StepCache | None = None

        while True:
            tokens = self._next_tokens(logits, rows)
            now = time.monotonic()
            for row, token in zip(rows, tokens.tolist(), strict=True):
                if not row.done:
                    self._append(row, token, now)
            finished = sum(row.done for row in rows)
            if finished == len(rows):
                return
            if cache is None:
                room = max(job.limit for job in jobs)
                cache = self._step.cache_from(parts, room)
                parts.clear()  # the prompts' own caches can go
            # Finished rows keep their place (fed padding, their output ignored) until they are
            # half the batch; then the batch and its cache shrink. That bounds the copying to a
            # few times per call while a long tail of short answers stops costing compute.
            if 2 * finished >= len(rows):
                keep = torch.tensor([i for i, row in enumerate(rows) if not row.done], device=self._device)
                cache = cache.select(keep)
                rows = [row for row in rows if not row.done]
                tokens, next_position = tokens[keep], next_position[keep]
            logits = self._step(tokens, next_position, cache, [row.job.request.task.value for row in rows])
            next_position = next_position + 1

    def _prefill(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, tasks: list[Task]
    ) -> CausalLMOutputWithPast:
        """The prompts through the HF forward, each row through its adapter; the steps go through `NeoXStep`."""
        output: CausalLMOutputWithPast = self._model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=_last_position(input_ids),
            adapter_names=[task.value for task in tasks],
        )
        return output

    def _next_tokens(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """One token per row (padding for finished rows), sampled per SPEC E.3.3."""
        tokens = torch.full((len(rows),), self._pad_id, dtype=torch.long, device=self._device)
        greedy_rows = [i for i, row in enumerate(rows) if not row.done and row.job.generator is None]
        if greedy_rows:
            index = torch.tensor(greedy_rows, device=self._device)
            tokens[index] = logits[index].argmax(dim=-1)

        by_job: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if not row.done and row.job.generator is not None:
                by_job.setdefault(id(row.job), []).append(i)
        top_k = self._top_k if 0 < self._top_k < logits.shape[-1] else logits.shape[-1]
        for indices in by_job.values():
            job = rows[indices[0]].job
            index = torch.tensor(indices, device=self._device)
            top_logits, top_ids = logits[index].topk(top_k, dim=-1)
            probs = torch.softmax(top_logits / job.request.temperature, dim=-1)
            if self._top_p < 1.0:
                # Keep the smallest run of the sorted candidates whose mass reaches top_p.
                outside = probs.cumsum(dim=-1) - probs > self._top_p
                probs = probs.masked_fill(outside, 0.0)
            choice = torch.multinomial(probs, 1, generator=job.generator)
            tokens[index] = top_ids.gather(-1, choice).squeeze(-1)
        return tokens

    def _append(self, row: _Row, token: int, now: float) -> None:
        row.tokens.append(token)
        deadline = row.job.request.deadline
        if token in self._eos_ids or len(row.tokens) >= row.job.limit or (deadline is not None and now >= deadline):
            row.done = True
            return
        row.done = self._text(row.tokens[-self._stop_window :]).endswith(self._stop_text)

    def _text(self, token_ids: list[int]) -> str:
        return cast(str, self._tokenizer.decode(token_ids, skip_special_tokens=True))

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids in sequences)
        input_ids = torch.full((len(sequences), width), self._pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, ids in enumerate(sequences):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
        return input_ids.to(self._device), attention_mask.to(self._device)


PREFILL_CALL_ROWS = 64
"""What one more prefill call costs, in prompt tokens: about its Python and dispatch overhead on
two cores (a 56-token prompt alone took 0.25 s, 3.2 ms a token in a batch of 16)."""


def _prefill_groups(jobs: list[_Job]) -> list[list[_Job]]:
    """The jobs in one left-padded prefill batch, or in two when that saves more padding than a
    call costs: a round's prompts come in two lengths (an answer's with its context, a short
    memory or expression prompt), and eight users' padded to the longest were about 28 %
    padding. The cut is the one, in order of length, that saves the most padded tokens."""
    ordered = sorted(jobs, key=lambda job: len(job.prompt_ids), reverse=True)
    lengths = [len(job.prompt_ids) for job in ordered]
    one = len(ordered) * lengths[0]
    best, cut = one, 0
    for i in range(1, len(ordered)):
        two = i * lengths[0] + (len(ordered) - i) * lengths[i] + PREFILL_CALL_ROWS
        if two < best:
            best, cut = two, i
    return [ordered[:cut], ordered[cut:]] if cut else [ordered]


def _last_position(input_ids: torch.Tensor) -> torch.Tensor:
    """The last position as an index tensor: see the module docstring for why not a slice."""
    return torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)


def _cache_of(output: CausalLMOutputWithPast) -> Cache:
    if output.cache is None:
        raise RuntimeError("the model returned no KV cache although use_cache was set")
    return output.cache


def _last_logits(output: CausalLMOutputWithPast) -> torch.Tensor:
    """(B, V) float32 logits of the last position, the only one computed."""
    if output.logits is None:
        raise RuntimeError("the model returned no logits")
    return output.logits[:, -1].float()


def _token_ids(value: int | list[int] | None) -> set[int]:
    if value is None:
        return set()
    return {value} if isinstance(value, int) else set(value)


def load_text_generator(
    layout: ModelLayout,
    *,
    base_model: str | Path | None = None,
    device: str = "auto",
    dtype: str = "auto",
    greedy: bool = False,
    int8: bool = False,
) -> PeftTextGenerator:
    """Load the base model once and attach the four adapters of `layout` to it, strictly.

    `base_model` is a local folder holding the base checkpoint (default: the layout's). Each
    adapter's recorded `base_model_name_or_path` (a folder on the author's machine) is never
    consulted. The first adapter's config wraps the base and then every adapter, the first
    included, goes through `load_adapter`, whose result names missing and unexpected tensors
    (`PeftModel.from_pretrained` would only warn about the missing ones). The tokenizer comes from
    the output_message adapter folder, the one upstream counted prompt tokens with.

    `int8` then stores the base model's linear layers in int8 (`models.quantize`), CPU only.
    """
    base_dir = Path(base_model) if base_model is not None else layout.base_model_dir
    missing = missing_files(base_dir, BASE_MODEL_FILES)
    for task in TASKS:
        missing += missing_files(layout.adapter_dir(task), ADAPTER_FILES)
    if missing:
        raise ModelFilesMissing(missing, fix_command(layout.root, ["llm"]))

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    logger.info("loading the base model from %s (%s, %s)", base_dir, torch_device, torch_dtype)
    # A single-device map loads the weights straight onto that device (no CPU copy first).
    loaded = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch_dtype, device_map=torch_device, local_files_only=True, output_loading_info=True
    )
    base, info = cast(tuple[PreTrainedModel, dict[str, Collection[str]]], loaded)
    _require_exact(base_dir, info)

    config = LoraConfig.from_pretrained(str(layout.adapter_dir(TASKS[0])))
    config.inference_mode = True
    model = PeftModelForCausalLM(base, config, adapter_name=TASKS[0].value, low_cpu_mem_usage=True)
    for task in TASKS:
        folder = layout.adapter_dir(task)
        result = model.load_adapter(
            str(folder), adapter_name=task.value, torch_device=str(torch_device), low_cpu_mem_usage=True
        )
        _require_exact(folder, {"missing_keys": result.missing_keys, "unexpected_keys": result.unexpected_keys})
    if int8 and torch_device.type != "cpu":
        raise ValueError(f"int8 base weights run on the CPU only, not on {torch_device}")
    kernel = cpu_kernel.load() if torch_device.type == "cpu" else None
    if int8:
        quantize_base_linears(model, kernel)
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(Task.OUTPUT_MESSAGE), local_files_only=True)
    return PeftTextGenerator(model, tokenizer, greedy=greedy, kernel=kernel)


def _require_exact(folder: Path, info: Mapping[str, Collection[str]]) -> None:
    problems = {name: sorted(keys) for name, keys in info.items() if name.endswith("_keys") and keys}
    if problems:
        raise CheckpointMismatch(f"the checkpoint in {folder} does not match the model: {problems}")
