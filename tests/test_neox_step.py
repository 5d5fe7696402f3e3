"""The single-token decoding step against the HF forward it replaces, on the tiny stand-ins.

Both paths of the step are checked: the HF operators (`kernel=None`) and our kernel's attention
and LoRA products. A step that drifts from the HF forward would change what the real
checkpoints say, so every step's logits are compared, not just the text at the end.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, GPTNeoXConfig, GPTNeoXForCausalLM
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from core.types import Task
from models.cpu_kernel import CpuKernel
from models.layout import ModelLayout
from models.llm import load_text_generator
from models.neox_step import NeoXStep, Prefilled
from models.quantize import VnniInt8Linear, compare_logits, quantize_base_linears

PROMPTS = [
    (Task.OUTPUT_MESSAGE, "(오로라 답변 요약) 사용자가 부산에 산다고 말함 (사용자 질문) 응 광안리 근처야 (답변 시작)"),
    (Task.MEMORY, "나 고양이 키워 (답변 시작)"),
    (Task.SUMMARY, "심심해 (오로라 답변) 그럼 나랑 수다 떨자!  (답변 시작)"),
]
STEPS = 6
INT8_TOLERANCE = 2e-3
"""Float32 paths agree to 1e-4, but an int8 layer quantises its input: where our layer norm or GELU
differs from ATen's by an ulp, a value on a rounding edge lands one int8 level away, and that row's
logits move by ~1e-2 (seen on an AMD EPYC: 2.1e-4 over 18 rows, against 0 on a Xeon). A wrong
kernel is off by far more than this."""


@pytest.fixture(params=["torch", "ours"])
def kernel(request: pytest.FixtureRequest) -> CpuKernel | None:
    """The step on the HF operators (None) and on our kernel, where this machine can build it."""
    if request.param == "torch":
        return None
    return cast(CpuKernel, request.getfixturevalue("ours"))


def _prefill(
    model: PeftModel, layout: ModelLayout, adapters: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Cache]:
    """The prompts left-padded into one batch: (last logits, mask, positions, cache)."""
    tokenizer = AutoTokenizer.from_pretrained(layout.adapter_dir(Task.OUTPUT_MESSAGE), local_files_only=True)
    encoded = [tokenizer.encode(prompt) for _, prompt in PROMPTS]
    width = max(map(len, encoded))
    ids = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, tokens in enumerate(encoded):
        ids[row, width - len(tokens) :] = torch.tensor(tokens)
        mask[row, width - len(tokens) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        output = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, adapter_names=adapters
        )
    return output.logits[:, -1].float(), mask, positions, output.cache


def _adapters(one: bool, rows: list[int] | None = None) -> list[str]:
    """Each prompt's own adapter, or the first prompt's for all (the whole batch takes one path then)."""
    names = [PROMPTS[0][0].value if one else task.value for task, _ in PROMPTS]
    return names if rows is None else [names[row] for row in rows]


def _hf_step(
    model: PeftModel,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: Cache,
    adapters: list[str],
) -> torch.Tensor:
    with torch.inference_mode():
        output = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            cache=cache,
            use_cache=True,
            adapter_names=adapters,
        )
    return output.logits[:, -1].float()


@pytest.mark.parametrize(
    ("dtype", "int8", "tolerance"),
    [("float32", False, 1e-4), ("bfloat16", False, 3e-2), ("float32", True, INT8_TOLERANCE), ("bfloat16", True, 3e-2)],
    ids=["float32", "bfloat16", "int8", "int8-bfloat16"],
)
@pytest.mark.parametrize("one_adapter", [False, True], ids=["mixed", "one-adapter"])
def test_every_step_gives_the_hf_forward_logits(
    tiny_layout: ModelLayout, kernel: CpuKernel | None, dtype: str, int8: bool, tolerance: float, one_adapter: bool
) -> None:
    """A left-padded batch decoded for several steps, then its rows repeated into a batch wider
    than our int8 kernel takes (`_int_mm` then), as retry samples do. Rows of mixed adapters take
    each adapter's rows apart; rows of one adapter take the whole batch at once."""
    model = load_text_generator(tiny_layout, device="cpu", dtype=dtype, int8=int8).model
    counting = None if kernel is None else _CountingKernel(kernel)
    step = NeoXStep(model, cast(CpuKernel | None, counting))
    logits, mask, positions, hf_cache = _prefill(model, tiny_layout, _adapters(one_adapter))
    cache = step.cache_from([Prefilled(hf_cache, torch.arange(len(PROMPTS)), mask)], room=2 * STEPS)
    tokens, next_position, adapters = logits.argmax(-1), positions[:, -1] + 1, _adapters(one_adapter)
    ours_all, reference_all = [], []
    for number in range(2 * STEPS):
        if number == STEPS:
            rows = [2, 0, 2, 1, 1, 0, 2, 0, 1, 2, 0, 0, 1, 2, 1, 1, 2, 0]
            assert len(rows) > VnniInt8Linear.MAX_KERNEL_ROWS
            index = torch.tensor(rows)
            cache, adapters = cache.select(index), _adapters(one_adapter, rows)
            hf_cache.batch_select_indices(index)
            tokens, mask, next_position = tokens[index], mask[index], next_position[index]
        ours = step(tokens, next_position, cache, adapters)
        mask = torch.cat([mask, mask.new_ones((len(tokens), 1))], dim=1)
        reference = _hf_step(model, tokens, mask, next_position, hf_cache, adapters)
        ours_all.append(ours)
        reference_all.append(reference)
        tokens, next_position = reference.argmax(-1), next_position + 1
    agreement = compare_logits(reference_all, ours_all)
    assert agreement.relative_error < tolerance
    assert agreement.top1 >= 0.9
    assert cache.length == mask.shape[1]
    if counting is not None:
        # Whole layers run in the kernel exactly where the base layers are our int8 ones.
        assert (counting.layers > 0) is int8


class _CountingKernel:
    """Our kernel, counting the layers it was given to run whole."""

    def __init__(self, kernel: CpuKernel) -> None:
        self._kernel = kernel
        self.layers = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._kernel, name)

    def decode_layers(self, layers: list[Any], *args: Any) -> torch.Tensor:
        self.layers += len(layers)
        return self._kernel.decode_layers(layers, *args)


def test_the_cache_holds_what_it_was_given(tiny_layout: ModelLayout) -> None:
    """Two prompt batches of different widths: rows stacked in order, the narrower right-aligned."""
    model = load_text_generator(tiny_layout, device="cpu", dtype="float32").model
    _, mask, _, wide = _prefill(model, tiny_layout, _adapters(False))
    narrow_ids = torch.tensor([[5, 6, 7]])
    with torch.inference_mode():
        narrow = model(input_ids=narrow_ids, use_cache=True, adapter_names=_adapters(False)[:1]).cache
    rows = torch.tensor([1, 1, 0])
    parts = [Prefilled(wide, rows, mask[rows]), Prefilled(narrow, torch.tensor([0]), torch.ones(1, 3))]
    cache = NeoXStep(model).cache_from(parts, room=3)
    width = mask.shape[1]
    assert (cache.rows, cache.capacity, cache.length) == (4, width + 3, width)
    first, last = wide.layers[0], wide.layers[-1]
    assert isinstance(first, DynamicLayer) and isinstance(last, DynamicLayer)
    assert first.keys is not None and last.values is not None
    assert torch.equal(cache.keys[0][:3, :, :width], first.keys[rows])
    assert torch.equal(cache.values[-1][:3, :, :width], last.values[rows])
    assert torch.equal(cache.attends[:3, :width], mask[rows].bool())
    short = narrow.layers[0]
    assert isinstance(short, DynamicLayer) and short.keys is not None
    assert torch.equal(cache.keys[0][3, :, width - 3 : width], short.keys[0])
    assert not cache.keys[0][3, :, : width - 3].any(), "the padding is zeroed"
    assert cache.attends[3, width - 3 : width].all() and not cache.attends[3, : width - 3].any()
    assert not cache.attends[:, width:].any()


def test_misuse_is_refused(tiny_layout: ModelLayout) -> None:
    model = load_text_generator(tiny_layout, device="cpu", dtype="float32").model
    step = NeoXStep(model)
    _, mask, positions, hf_cache = _prefill(model, tiny_layout, _adapters(False))
    cache = step.cache_from([Prefilled(hf_cache, torch.arange(3), mask)], room=1)
    tokens, next_position = torch.zeros(3, dtype=torch.long), positions[:, -1] + 1
    with pytest.raises(ValueError, match="2 adapters"):
        step(tokens, next_position, cache, _adapters(False)[:2])
    step(tokens, next_position, cache, _adapters(False))
    with pytest.raises(ValueError, match="full"):
        step(tokens, next_position + 1, cache, _adapters(False))


@pytest.mark.parametrize("adapters", [["first", "second", "first"], ["second"] * 3], ids=["mixed", "one-adapter"])
def test_adapters_on_every_projection(ours: CpuKernel, adapters: list[str]) -> None:
    """Two adapters on all four projections of every layer, against the HF forward."""
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=64,
    )
    targets = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
    model = get_peft_model(GPTNeoXForCausalLM(config), lora, adapter_name="first")
    model.add_adapter("second", lora)
    quantize_base_linears(model, ours)
    model.eval()
    counting = _CountingKernel(ours)
    step = NeoXStep(cast(PeftModel, model), cast(CpuKernel, counting))
    ids = torch.randint(0, 64, (3, 7))
    mask = torch.ones_like(ids)
    positions = mask.cumsum(-1) - 1
    with torch.inference_mode():
        output = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, adapter_names=adapters
        )
    hf_cache = output.cache
    cache = step.cache_from([Prefilled(hf_cache, torch.arange(3), mask)], room=STEPS)
    tokens, next_position = output.logits[:, -1].argmax(-1), positions[:, -1] + 1
    for _ in range(STEPS):
        ours_logits = step(tokens, next_position, cache, adapters)
        mask = torch.cat([mask, mask.new_ones((3, 1))], dim=1)
        reference = _hf_step(cast(PeftModel, model), tokens, mask, next_position, hf_cache, adapters)
        assert compare_logits([reference], [ours_logits]).relative_error < 1e-4
        tokens, next_position = reference.argmax(-1), next_position + 1
    assert counting.layers == STEPS * config.num_hidden_layers


def test_other_architectures_are_refused() -> None:
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="GPT-NeoX"):
        NeoXStep(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("heads", "head_size", "rotary"), [(2, 16, 8), (3, 32, 32), (16, 128, 64)])
def test_our_attention_is_the_hf_attention(
    ours: CpuKernel, dtype: torch.dtype, heads: int, head_size: int, rotary: int
) -> None:
    """Rotary, cache update and masked attention for one token per row, against the HF operators."""
    torch.manual_seed(heads * head_size + rotary)
    rows, capacity, column = 3, 40, 29
    qkv = torch.randn(rows, 1, heads * 3 * head_size).to(dtype)
    angles = torch.rand(rows, 1, rotary // 2) * 30
    cos = torch.cat([angles, angles], -1).cos().to(dtype)
    sin = torch.cat([angles, angles], -1).sin().to(dtype)
    keys = torch.randn(rows, heads, capacity, head_size).to(dtype)
    values = torch.randn(rows, heads, capacity, head_size).to(dtype)
    attends = torch.rand(rows, capacity) > 0.3
    attends[:, column] = True
    attends[1, :12] = False  # left padding
    scaling = head_size**-0.5

    query, key, value = qkv.view(rows, 1, heads, -1).transpose(1, 2).chunk(3, dim=-1)
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[:, :, column : column + 1] = key
    expected_values[:, :, column : column + 1] = value
    expected = F.scaled_dot_product_attention(
        query.float(),
        expected_keys[:, :, : column + 1].float(),
        expected_values[:, :, : column + 1].float(),
        attn_mask=attends[:, None, None, : column + 1],
        scale=scaling,
    )
    expected = expected.transpose(1, 2).reshape(rows, -1)

    cos, sin = cos.view(rows, -1), sin.view(rows, -1)
    out = ours.attend_one(qkv.view(rows, -1), cos, sin, keys, values, column, attends, scaling)
    assert out.dtype == dtype and out.shape == (rows, heads * head_size)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    error = (out.float() - expected).norm() / expected.norm()
    assert error < (1e-5 if dtype == torch.float32 else 1e-2)


def test_our_attention_rejects_what_it_cannot_compute(ours: CpuKernel) -> None:
    rows, heads, size = 1, 2, 16
    qkv = torch.zeros(rows, heads * 3 * size)
    angles = torch.zeros(rows, size)
    cache = torch.zeros(rows, heads, 4, size)
    attends = torch.ones(rows, 4, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="outside the cache"):
        ours.attend_one(qkv, angles, angles, cache, cache.clone(), 4, attends, 1.0)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        odd, odd_angles = torch.zeros(rows, heads, 4, 12), angles[:, :12]
        ours.attend_one(torch.zeros(rows, heads * 36), odd_angles, odd_angles, odd, odd.clone(), 0, attends, 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ours.attend_one(qkv.bfloat16(), angles, angles, cache, cache.clone(), 0, attends, 1.0)
    with pytest.raises(RuntimeError, match="bool mask"):
        ours.attend_one(qkv, angles, angles, cache, cache.clone(), 0, attends.float(), 1.0)


@pytest.mark.parametrize("rows", [1, 2, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rank", "out_features"), [(8, 37), (16, 64), (128, 100)])
def test_our_lora_add_is_peft_s(ours: CpuKernel, rows: int, dtype: torch.dtype, rank: int, out_features: int) -> None:
    """float32 products of the float32 factors, scaled, rounded to the model's dtype, then added."""
    torch.manual_seed(rows * rank)
    a, b = torch.randn(rank, 100), torch.randn(out_features, rank)
    x = torch.randn(rows, 1, 100).to(dtype)
    base = torch.randn(rows, 1, out_features).to(dtype)
    expected = base + (F.linear(F.linear(x.float(), a), b) * 0.5).to(dtype)
    result = base.clone()
    ours.lora_add(result, x, a, b, 0.5)
    assert result.dtype == dtype
    assert torch.allclose(result.float(), expected.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-4)
    with pytest.raises(RuntimeError, match="features"):
        ours.lora_add(result, torch.randn(1, 99), a, b, 0.5)
    with pytest.raises(RuntimeError, match="rank"):
        ours.lora_add(result, x, a, b[:, :-1].contiguous(), 0.5)
    with pytest.raises(RuntimeError, match="result"):
        ours.lora_add(result[:, :, :-1], x, a, b, 0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_our_gelu_is_atens(ours: CpuKernel, dtype: torch.dtype) -> None:
    """The exact GELU, far tails and a width that is not a multiple of 16 included (float64 is ATen's own)."""
    torch.manual_seed(0)
    x = torch.cat([torch.randn(3 * 8195) * 3, torch.tensor([-30.0, -6.0, -5.0, 0.0, 5.0, 30.0])]).to(dtype)
    out = ours.gelu(x.view(-1, 1, 8197))
    assert out.dtype == dtype and out.shape == (3, 1, 8197)
    expected = F.gelu(x).view(out.shape)
    ulp = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(dtype, 2**-22)
    assert torch.allclose(out.double(), expected.double(), rtol=ulp, atol=2e-6)
    # ATen's 1 + erf rounds the far negative tail to -0; so must ours, or prompt and step disagree.
    assert torch.equal(out.flatten()[-6:-4], expected.flatten()[-6:-4])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("width", [16, 100, 2048])
def test_our_layer_norm_is_atens(ours: CpuKernel, dtype: torch.dtype, width: int) -> None:
    torch.manual_seed(width)
    x = (torch.randn(3, 1, width) * 4 + 2).to(dtype)
    weight, bias = torch.randn(width).to(dtype), torch.randn(width).to(dtype)
    out = ours.layer_norm(x, weight, bias, 1e-5)
    expected = F.layer_norm(x, (width,), weight, bias, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    tolerance = {torch.bfloat16: 2**-7, torch.float16: 2**-10}.get(dtype, 1e-5)
    assert torch.allclose(out.float(), expected.float(), rtol=tolerance, atol=tolerance)
    with pytest.raises(RuntimeError, match="dtype"):
        ours.layer_norm(x, weight.to(torch.float16 if dtype != torch.float16 else torch.float32), bias, 1e-5)
