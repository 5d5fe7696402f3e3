"""One decoding step of a PEFT-wrapped GPT-NeoX, for batches of single tokens, without the HF stack.

A batch-1 step of Polyglot-Ko reads about 1.3 GB of int8 weights, which our kernel streams in
about 45-50 ms on two cores; through `transformers` and PEFT the step took about 100 ms. The
rest was bookkeeping around the weights: the dynamic KV cache concatenates every layer's keys and
values into new tensors on every step (about 6 ms), a causal mask is rebuilt, the rotary angles
are recomputed, PEFT's mixed-adapter path indexes and scatters the batch even when every row
names the same adapter, and its float32 LoRA products ran at half the memory bandwidth; a few
thousand small operators in all. This module keeps the model's own weights and modules and only
replaces the glue, for steps of one token per row:

- keys and values go into buffers allocated once per call, for as many tokens as it may produce;
- the rotary angles are the model's own, computed once for every position;
- each LoRA product runs on the rows of its adapter, and on the whole batch when it has one;
- on the CPU, our kernel (`models.cpu_kernel`) does the LoRA products and, per layer, rotary,
  cache update and attention in one call; over our int8 layers it holds every layer
  (`_native_layer`) and runs the whole stack in one call per step, with its own layer norms and
  GELU (the same to a few float32 ulps) and the same additions in the same order.

The arithmetic is the HF model's: the same layer norms, PEFT's float32 LoRA products rounded to
the model's dtype and then added, rotary products rounded as `apply_rotary_pos_emb` rounds them,
attention in float32 as `scaled_dot_product_attention` computes it, the same residual order.
Without the kernel the step calls those very operators. Prompts still go through the HF
forward, which is compute-bound and where this glue costs little. Measured on a model of
Polyglot-Ko's shapes (int8, one adapter, 2 cores, interleaved; the machine's bandwidth drifts,
so compare within a line): HF forward about 100 ms a step, this module on the stock operators
about 74, with the kernel about 67 and the weights alone 50-52; with whole layers in the kernel
65 against 70 layer by layer; with the whole stack in one call and our own layer norms and GELU
(ATen's GELU took 50-80 us a layer) 55-58 against 62.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.activations import GELUActivation
from transformers.cache_utils import Cache, DynamicLayer
from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

from models.cpu_kernel import CpuKernel, NativeLayer
from models.quantize import VnniInt8Linear


@dataclass(frozen=True)
class _Lora:
    """One adapter's factors on one layer, as PEFT applies them: float32 products, then the dtype."""

    a: torch.Tensor
    b: torch.Tensor
    scaling: float
    kernel: CpuKernel | None
    """Ours, for float32 factors on the CPU: it streams them at about 80 % of a float32 `mv`'s
    bandwidth, where `F.linear` on a row or two reached about 60 % (the adapters are about 7 % of
    the bytes a Polyglot-Ko step reads)."""

    def add_to(self, result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """`result` plus this adapter's update for the rows `x`, as PEFT adds it (in place with the kernel)."""
        if self.kernel is None:
            return result + (F.linear(F.linear(x.to(self.a.dtype), self.a), self.b) * self.scaling).to(result.dtype)
        self.kernel.lora_add(result, x, self.a, self.b, self.scaling)
        return result


class _Projection:
    """A linear layer of the model, with the LoRA adapters PEFT attached to it (if any)."""

    def __init__(self, module: nn.Module, kernel: CpuKernel | None) -> None:
        self.adapters: dict[str, _Lora] = {}
        self.base_module = cast(nn.Module, module.get_base_layer()) if isinstance(module, LoraLayer) else module
        self._base = _forward(self.base_module)
        if not isinstance(module, LoraLayer):
            return
        for name in module.lora_A:
            if name in module.lora_variant:
                raise ValueError(f"adapter {name!r} is a LoRA variant ({type(module.lora_variant[name]).__name__})")
            a = cast(nn.Linear, module.lora_A[name]).weight
            b = cast(nn.Linear, module.lora_B[name]).weight
            fits = all(f.dtype == torch.float32 and f.device.type == "cpu" and f.is_contiguous() for f in (a, b))
            self.adapters[name] = _Lora(a=a, b=b, scaling=float(module.scaling[name]), kernel=kernel if fits else None)

    def __call__(self, x: torch.Tensor, groups: Sequence[tuple[str, torch.Tensor | None]]) -> torch.Tensor:
        result = self._base(x)
        for name, rows in groups:
            lora = self.adapters.get(name)
            if lora is None:
                continue
            if rows is None:
                result = lora.add_to(result, x)
            else:
                result[rows] = lora.add_to(result[rows], x[rows])
        return result


@dataclass
class StepCache:
    """Keys and values of every layer for a batch of rows, with room for the tokens to come.

    Position `length` is the next one written; `attends` marks, per row, which positions hold
    a real token (left padding does not).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    attends: torch.Tensor
    length: int

    @property
    def rows(self) -> int:
        return self.attends.shape[0]

    @property
    def capacity(self) -> int:
        return self.attends.shape[1]

    def select(self, rows: torch.Tensor) -> StepCache:
        """The cache of some rows only, in the given order (a row may repeat)."""
        return StepCache(
            keys=[k.index_select(0, rows) for k in self.keys],
            values=[v.index_select(0, rows) for v in self.values],
            attends=self.attends.index_select(0, rows),
            length=self.length,
        )


@dataclass(frozen=True)
class Prefilled:
    """A prompt batch after the HF forward: its cache, which of its rows to decode (a row may
    repeat, for several samples of one prompt), and its attention mask for those rows."""

    cache: Cache
    rows: torch.Tensor
    attends: torch.Tensor


@dataclass(frozen=True)
class _Token:
    """What every layer of one step shares: the rows' adapters, rotary angles and cache column."""

    groups: Sequence[tuple[str, torch.Tensor | None]]
    cos: torch.Tensor
    """(B, 1, rotary dims), in the model's dtype."""
    sin: torch.Tensor
    column: int
    """The cache position this step writes."""
    attends: torch.Tensor
    """(B, capacity): which cache positions each row attends to, `column` included."""


class NeoXStep:
    """Single-token decoding steps over the weights of a PEFT-wrapped `GPTNeoXForCausalLM`.

    Not thread-safe, like the model it reads. The model must be in eval mode; its base linears
    may be `nn.Linear` or the int8 layers of `models.quantize`. `kernel` (`models.cpu_kernel`)
    does the float32 LoRA products and the attention block between the two projections on the
    CPU, and over our int8 layers the whole stack of layers in one call per step; without it
    they run as the HF forward's operators.
    """

    def __init__(self, model: PeftModel, kernel: CpuKernel | None = None) -> None:
        base = cast(PreTrainedModel, model.get_base_model())
        config = base.config
        if config.model_type != "gpt_neox":
            raise ValueError(f"the decoding step is written for GPT-NeoX, not {config.model_type!r}")
        neox = cast(nn.Module, base.gpt_neox)
        on_cpu = next(model.parameters()).device.type == "cpu"
        kernel = kernel if on_cpu else None
        heads = int(config.num_attention_heads)
        attention = _KernelAttention(kernel, heads) if kernel is not None and _head_size(config) % 16 == 0 else None
        self._embed = _forward(cast(nn.Module, neox.embed_in))
        self._rotary = cast(nn.Module, neox.rotary_emb)
        self._final_norm = _forward(cast(nn.Module, neox.final_layer_norm))
        self._head = _Projection(cast(nn.Module, base.lm_head), kernel)
        parallel_residual = bool(config.use_parallel_residual)
        self._layers = [
            _Layer(cast(nn.Module, layer), kernel, attention or _TorchAttention(heads), parallel_residual)
            for layer in cast(nn.ModuleList, neox.layers)
        ]
        natives = [layer.native for layer in self._layers]
        self._kernel = kernel
        self._native: list[NativeLayer] | None = None
        if kernel is not None and all(native is not None for native in natives):
            self._native = cast(list[NativeLayer], natives)
        self._cos = self._sin = torch.empty(0)

    @torch.inference_mode()
    def cache_from(self, parts: Sequence[Prefilled], room: int) -> StepCache:
        """Copy prompt batches' HF caches into one set of buffers with `room` more positions.

        Each part's rows are stacked in order and right-aligned: a part narrower than the widest
        is left-padded, its padding zeroed (attention weighs it by 0, and 0 * NaN would not be 0).
        """
        width = max(part.attends.shape[1] for part in parts)
        rows = sum(len(part.rows) for part in parts)
        layers = [_filled_layers(part.cache) for part in parts]
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for index in range(len(layers[0])):
            for which, target in ((0, keys), (1, values)):
                first = layers[0][index][which]
                buffer = first.new_empty((rows, first.shape[1], width + room, first.shape[3]))
                start = 0
                for part, part_layers in zip(parts, layers, strict=True):
                    picked = part_layers[index][which].index_select(0, part.rows)
                    pad = width - picked.shape[2]
                    buffer[start : start + len(picked), :, :pad] = 0
                    buffer[start : start + len(picked), :, pad:width] = picked
                    start += len(picked)
                target.append(buffer)
        mask = torch.zeros((rows, width + room), dtype=torch.bool, device=parts[0].attends.device)
        start = 0
        for part in parts:
            mask[start : start + len(part.rows), width - part.attends.shape[1] : width] = part.attends.bool()
            start += len(part.rows)
        return StepCache(keys=keys, values=values, attends=mask, length=width)

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: StepCache, adapters: Sequence[str]
    ) -> torch.Tensor:
        """Feed one token per row, at the row's position and through the row's adapter.

        Returns the (B, V) float32 logits of the next token; `cache` advances by one position.
        """
        if cache.length >= cache.capacity:
            raise ValueError(f"the step cache is full ({cache.capacity} positions)")
        if len(adapters) != len(tokens) or cache.rows != len(tokens):
            raise ValueError(f"{len(tokens)} tokens, {len(adapters)} adapters and {cache.rows} cached rows")
        hidden = self._embed(tokens[:, None])
        cos, sin = self._angles(positions, hidden)
        cache.attends[:, cache.length] = True
        token = _Token(_groups(adapters, tokens.device), cos, sin, cache.length, cache.attends)
        if self._native is not None and self._kernel is not None:
            rows = len(tokens)
            hidden = self._kernel.decode_layers(
                self._native,
                hidden,
                [(name, _EVERY_ROW if picked is None else picked) for name, picked in token.groups],
                cos.reshape(rows, -1),
                sin.reshape(rows, -1),
                cache.keys,
                cache.values,
                cache.length,
                cache.attends,
            )
        else:
            for layer, keys, values in zip(self._layers, cache.keys, cache.values, strict=True):
                hidden = layer(hidden, keys, values, token)
        cache.length += 1
        return self._head(self._final_norm(hidden[:, 0]), token.groups).float()

    def _angles(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos and sin at each row's position, (B, 1, rotary dims), from a table.

        The table comes from the model's own rotary module, so its values are those the HF
        forward computes per call.
        """
        needed = int(positions.max()) + 1
        if needed > self._cos.shape[0] or self._cos.dtype != like.dtype:
            size = max(needed, 2 * self._cos.shape[0], 256)
            every = torch.arange(size, device=like.device)[None]
            cos, sin = self._rotary(like, every)
            self._cos, self._sin = cos[0], sin[0]
        return self._cos[positions][:, None], self._sin[positions][:, None]


class _TorchAttention:
    """Rotary, cache update and attention with the HF forward's own operators."""

    def __init__(self, heads: int) -> None:
        self._heads = heads

    def __call__(
        self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, token: _Token, scaling: float
    ) -> torch.Tensor:
        rows, column = qkv.shape[0], token.column
        query, key, value = qkv.view(rows, 1, self._heads, -1).transpose(1, 2).chunk(3, dim=-1)
        query, key = apply_rotary_pos_emb(query, key, token.cos, token.sin)
        keys[:, :, column : column + 1] = key
        values[:, :, column : column + 1] = value
        attended = F.scaled_dot_product_attention(
            query,
            keys[:, :, : column + 1],
            values[:, :, : column + 1],
            attn_mask=token.attends[:, None, None, : column + 1],
            scale=scaling,
        )
        return attended.transpose(1, 2).reshape(rows, 1, -1)


class _KernelAttention:
    """The same in one call of our kernel per layer, in place of about twenty operators."""

    def __init__(self, kernel: CpuKernel, heads: int) -> None:
        self._kernel = kernel
        self._heads = heads

    def __call__(
        self, qkv: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, token: _Token, scaling: float
    ) -> torch.Tensor:
        rows = qkv.shape[0]
        attended = self._kernel.attend_one(
            qkv.reshape(rows, -1),
            token.cos.reshape(rows, -1),
            token.sin.reshape(rows, -1),
            keys,
            values,
            token.column,
            token.attends,
            scaling,
        )
        return attended.view(rows, 1, -1)


class _Layer:
    """One `GPTNeoXLayer`'s modules, run as its forward runs them, for one new token per row."""

    def __init__(
        self,
        layer: nn.Module,
        kernel: CpuKernel | None,
        attend: _TorchAttention | _KernelAttention,
        parallel_residual: bool,
    ) -> None:
        attention = cast(nn.Module, layer.attention)
        mlp = cast(nn.Module, layer.mlp)
        self._input_norm = _forward(cast(nn.Module, layer.input_layernorm))
        self._post_attention_norm = _forward(cast(nn.Module, layer.post_attention_layernorm))
        self._qkv = _Projection(cast(nn.Module, attention.query_key_value), kernel)
        self._dense = _Projection(cast(nn.Module, attention.dense), kernel)
        self._up = _Projection(cast(nn.Module, mlp.dense_h_to_4h), kernel)
        self._down = _Projection(cast(nn.Module, mlp.dense_4h_to_h), kernel)
        self._act = _forward(cast(nn.Module, mlp.act))
        self._scaling = float(cast(float, attention.scaling))
        self._attend = attend
        self._parallel_residual = parallel_residual
        self.native = _native_layer(
            layer, [self._qkv, self._dense, self._up, self._down], kernel, attend, self._scaling, parallel_residual
        )
        """The same layer on our kernel, where it can run there."""

    def __call__(self, hidden: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, token: _Token) -> torch.Tensor:
        qkv = self._qkv(self._input_norm(hidden), token.groups)
        attended = self._attend(qkv, keys, values, token, self._scaling)
        attention = self._dense(attended, token.groups)
        if self._parallel_residual:
            mlp = self._mlp(self._post_attention_norm(hidden), token.groups)
            return mlp + attention + hidden
        attention = attention + hidden
        return self._mlp(self._post_attention_norm(attention), token.groups) + attention

    def _mlp(self, x: torch.Tensor, groups: Sequence[tuple[str, torch.Tensor | None]]) -> torch.Tensor:
        return self._down(self._act(self._up(x, groups)), groups)


def _native_layer(
    layer: nn.Module,
    projections: list[_Projection],
    kernel: CpuKernel | None,
    attend: _TorchAttention | _KernelAttention,
    scaling: float,
    parallel_residual: bool,
) -> NativeLayer | None:
    """The layer as one object of our kernel (`NeoXLayer`), which runs it without coming back to
    Python: a layer was about 45 Python-level calls, a few milliseconds a step on two cores.

    Only for what it implements: our int8 base layers, exact GELU, affine layer norms of one
    epsilon and of the model's dtype, our attention and our LoRA products; None otherwise.
    """
    norms = [cast(nn.Module, layer.input_layernorm), cast(nn.Module, layer.post_attention_layernorm)]
    act = cast(nn.Module, cast(nn.Module, layer.mlp).act)
    bases = [projection.base_module for projection in projections]
    if (
        kernel is None
        or not isinstance(attend, _KernelAttention)
        or not all(isinstance(base, VnniInt8Linear) for base in bases)
        or not all(lora.kernel is not None for projection in projections for lora in projection.adapters.values())
        or not all(isinstance(n, nn.LayerNorm) and n.weight is not None and n.bias is not None for n in norms)
        or len({(cast(nn.LayerNorm, n).eps, cast(nn.LayerNorm, n).weight.dtype) for n in norms}) != 1
        or not isinstance(act, GELUActivation)
        or act.act is not F.gelu
    ):
        return None
    native = kernel.NeoXLayer(
        [tensor for n in norms for tensor in (cast(nn.LayerNorm, n).weight, cast(nn.LayerNorm, n).bias)],
        float(cast(nn.LayerNorm, norms[0]).eps),
        [tensor for base in bases for tensor in cast(VnniInt8Linear, base).kernel_operands()],
        scaling,
        parallel_residual,
        VnniInt8Linear.MAX_KERNEL_ROWS,
    )
    for which, projection in enumerate(projections):
        for name, lora in projection.adapters.items():
            native.add_adapter(name, which, lora.a, lora.b, lora.scaling)
    return native


def _filled_layers(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer of a prompt's cache."""
    layers = []
    for layer in cache.layers:
        if not isinstance(layer, DynamicLayer) or layer.keys is None or layer.values is None:
            raise ValueError(f"the prompt's cache is not a filled dynamic cache: {type(layer).__name__}")
        layers.append((layer.keys, layer.values))
    return layers


_EVERY_ROW = torch.empty(0, dtype=torch.long)
"""What our kernel takes for "the adapter's rows are the whole batch"."""


def _forward(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The module's own forward, without `nn.Module.__call__` around it where it has no hooks:
    the hook machinery costs a few microseconds a call, and a step makes about 300 such calls."""
    hooked = module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook")
    return cast(Callable[[torch.Tensor], torch.Tensor], module if hooked else module.forward)


def _head_size(config: PretrainedConfig) -> int:
    return int(config.hidden_size) // int(config.num_attention_heads)


def _groups(adapters: Sequence[str], device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
    """Each adapter with the rows that name it; None stands for every row."""
    names = list(dict.fromkeys(adapters))
    if len(names) == 1:
        return [(names[0], None)]
    return [
        (name, torch.tensor([i for i, adapter in enumerate(adapters) if adapter == name], device=device))
        for name in names
    ]
