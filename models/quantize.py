"""Dynamic int8 for the base model's linear layers, under the LoRA adapters.

Decoding one token at a time is bound by reading the weights, so storing the base model's
matrices as int8 (one scale per output row) halves the bytes per step against bfloat16. The
activations are quantised on the fly and the product comes back in the model's dtype. Two
kernels do it: ours (`models.cpu_kernel`, for CPUs with AVX512-VNNI), which streams the
weights at close to a float32 `mv`'s bandwidth, and oneDNN's int8 linear everywhere else. The
LoRA adapters stay as PEFT loads them, in float32: they are small, each user's answer depends
on them, and on CPU a float32 product of a few rows is several times faster than a bfloat16 one.

Order matters: PEFT wraps `nn.Linear` modules when it attaches an adapter and cannot wrap an
already quantised one, so the adapters are attached first and only the layers PEFT left as the
base (`base_layer` inside each LoRA layer, and the linears it did not touch) are replaced.

oneDNN rather than fbgemm (`torch.ao` dynamic quantisation, now deprecated) as the fallback: on
the 2-core AMX Xeon this was written on, one thread, a Polyglot-Ko-sized layer stack took
16.6 ms against 16.0 ms for one row, 17.5 against 23.1 for two, 59 against 130 for 128 rows.
Random weights give near-uniform logits, the worst case for agreement; `compare_logits`
measures it on real prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from models.cpu_kernel import CpuKernel

logger = logging.getLogger(__name__)

_LORA_MODULE_PREFIX = "lora_"
"""PEFT names the adapter weights lora_A, lora_B, lora_embedding_A, ...; they are never quantised."""
_INT8_MAX = 127.0
_TINY = torch.finfo(torch.float32).tiny


class DynamicInt8Linear(nn.Module):
    """A drop-in `nn.Linear` for inference whose weight is int8, one scale per output row.

    Each call quantises its input (its largest magnitude maps to 127) and returns the product in
    the input's dtype, so a bfloat16 model keeps running in bfloat16 around it. Two kernels do
    the product: `VnniInt8Linear`, ours, and `OneDnnInt8Linear`; `int8_linear` picks.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        self._scales = weight.abs().amax(dim=1).clamp(min=_TINY) / _INT8_MAX
        self._int8 = torch.round(weight / self._scales[:, None]).to(torch.int8)
        self._bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.replaced_bytes = sum(p.numel() * p.element_size() for p in linear.parameters())
        """What the float layer it replaced held."""
        per_row = 4 if self._bias is None else 8  # a float scale, and a float bias if any
        self.weight_bytes = self._int8.numel() + per_row * self.out_features
        """What one forward pass reads of this layer's parameters: int8 values, scales, bias."""

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


class VnniInt8Linear(DynamicInt8Linear):
    """Our kernel (`models.cpu_kernel`) for a few rows: one scale per row, one pass over the weight.

    More rows make the product compute-bound; those go to `torch._int_mm`, which has AMX/VNNI
    GEMMs behind it, with the quantising and rescaling done in one pass each by our kernel.
    Milliseconds for a Polyglot-Ko-sized stack of 96 layers (1.2 GB of int8) at 1 / 2 / 4 / 8 /
    16 / 32 input rows, interleaved on the 2-core AMX Xeon, with float32 `mv` over the same bytes
    as the yardstick (two runs: the kernel's 16-row blocks, and its first version's 4-row tiles):

    | ours, 16-row blocks (mv: 58) | 56 / 65 / 77 / 107 / 160 / –      |
    | `_int_mm`                    | – / – / – / 125 / 149 / –         |
    | ours, 4-row tiles (mv: 50)   | 61 / 77 / 93 / – / 210 / 344      |
    | `_int_mm`                    | 104 / 105 / 108 / 115 / 135 / 165 |
    | oneDNN's int8 linear         | 127 / 152 / 142 / – / 147 / 177   |

    and for a 1,440-row prompt batch, `_int_mm` 5.2 s against oneDNN's 5.9 s. Since the kernel
    prefetches on into each next block, at 8 / 12 / 16 / 20 / 24 / 32 rows (97 layers, with the
    head): ours 65 / 77 / 93-100 / 108 / 142 / 172, `_int_mm` 96 / 101 / 102-108 / 103 / 112 /
    113; so the kernel now takes up to 16 rows, 8 users' two tasks at once.
    """

    MAX_KERNEL_ROWS = 16
    """Up to this many input rows our kernel is the faster; above it, the GEMM."""
    MAX_IN_FEATURES = 65536
    """Our kernel's int32 sums are exact up to this width (255 * 127 * 65536 < 2**31)."""

    def __init__(self, linear: nn.Linear, kernel: CpuKernel) -> None:
        super().__init__(linear)
        self._kernel = kernel
        self._row_sums = self._int8.sum(dim=1, dtype=torch.int32)
        # A view: `_int_mm` reads the transposed layout in place.
        self._int8_t = self._int8.t()
        self._no_bias = torch.empty(0)
        self.weight_bytes += 4 * self.out_features

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """What `int8_linear` takes after the input: weight, scales, row sums, bias (empty if none)."""
        return self._int8, self._scales, self._row_sums, self._no_bias if self._bias is None else self._bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._no_bias if self._bias is None else self._bias
        # A single input feature stays on our kernel: `_int_mm` misreads (M, 1) operands, whose
        # strides are ambiguous (torch 2.13).
        if x.numel() <= self.MAX_KERNEL_ROWS * self.in_features or self.in_features == 1:
            return self._kernel.int8_linear(x, self._int8, self._scales, self._row_sums, bias)
        quantized, row_scales = self._kernel.quantize_rows_signed(x)
        products = torch._int_mm(quantized, self._int8_t)
        output = self._kernel.scale_products(products, row_scales, self._scales, bias, x.dtype)
        return output.view(*x.shape[:-1], self.out_features)


class OneDnnInt8Linear(DynamicInt8Linear):
    """oneDNN's int8 linear, for CPUs our kernel does not run on: one scale per call."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        self._packed = torch.ops.onednn.qlinear_prepack(self._int8, None)
        del self._int8
        self._zero_points = torch.zeros(self.out_features, dtype=torch.long)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        values = x.float()
        scale = values.abs().amax().clamp(min=_TINY) / _INT8_MAX
        quantized = torch.round(values / scale).to(torch.int8)
        return torch.ops.onednn.qlinear_pointwise.tensor(
            quantized,
            scale,
            _ZERO,
            self._packed,
            self._scales,
            self._zero_points,
            self._bias,
            1.0,
            0,
            x.dtype,
            "none",
            [],
            "",
        )


_ZERO = torch.zeros((), dtype=torch.long)


def int8_linear(linear: nn.Linear, kernel: CpuKernel | None) -> DynamicInt8Linear:
    """`linear` in int8, on our kernel when there is one and the layer fits it, else on oneDNN's."""
    if kernel is None or linear.in_features > VnniInt8Linear.MAX_IN_FEATURES:
        return OneDnnInt8Linear(linear)
    return VnniInt8Linear(linear, kernel)


@dataclass(frozen=True)
class QuantizationReport:
    layers: int
    """Linear layers replaced."""
    int8_bytes: int
    """Bytes the replaced layers now hold (int8 values, scales, biases)."""
    replaced_bytes: int
    """Bytes the same layers held before."""


def quantize_base_linears(model: nn.Module, kernel: CpuKernel | None = None) -> QuantizationReport:
    """Replace every base-model `nn.Linear` of `model` by a `DynamicInt8Linear`, in place.

    `kernel` is our int8 kernel (`models.cpu_kernel.load()`); None keeps oneDNN's.

    Attach the LoRA adapters before calling this: adapter weights (PEFT's `lora_*` modules) are
    left as they are, and PEFT cannot add an adapter to a layer once it is replaced.

    A model loaded from safetensors is memory-mapped: its tensors are views of the file, and
    every page quantisation reads stays resident for as long as anything maps the file. So the
    tensors that are kept are then copied into memory of their own, which lets the mapping go.
    """
    with torch.no_grad():
        for parent, name, linear in list(_base_linears(model)):
            setattr(parent, name, int8_linear(linear, kernel))
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
        for buffer in model.buffers():
            buffer.data = buffer.data.clone()
    report = int8_report(model)
    logger.info(
        "int8: %d linear layers, %.2f GB -> %.2f GB",
        report.layers,
        report.replaced_bytes / 1e9,
        report.int8_bytes / 1e9,
    )
    return report


def int8_report(model: nn.Module) -> QuantizationReport:
    """What the int8 layers of `model` hold, and what the layers they replaced held."""
    layers = [module for module in model.modules() if isinstance(module, DynamicInt8Linear)]
    return QuantizationReport(
        layers=len(layers),
        int8_bytes=sum(layer.weight_bytes for layer in layers),
        replaced_bytes=sum(layer.replaced_bytes for layer in layers),
    )


def _base_linears(model: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every `nn.Linear` outside the adapters' own modules."""

    def walk(module: nn.Module) -> Iterator[tuple[nn.Module, str, nn.Linear]]:
        for name, child in module.named_children():
            if name.startswith(_LORA_MODULE_PREFIX):
                continue
            if type(child) is nn.Linear:
                yield module, name, child
            else:
                yield from walk(child)

    yield from walk(model)


@dataclass(frozen=True)
class Agreement:
    """How closely quantised logits follow the reference ones, over every position compared."""

    positions: int
    top1: float
    """Fraction of positions whose most likely next token is the same."""
    relative_error: float
    """Mean over positions of ‖quantised − reference‖ / ‖reference‖ of the logit vectors."""


def compare_logits(reference: Sequence[torch.Tensor], quantized: Sequence[torch.Tensor]) -> Agreement:
    """Compare pairs of (positions, vocab) logit tensors computed on the same inputs."""
    if len(reference) != len(quantized) or not reference:
        raise ValueError("compare the same, non-empty, list of inputs")
    ref = torch.cat([logits.float().reshape(-1, logits.shape[-1]) for logits in reference])
    new = torch.cat([logits.float().reshape(-1, logits.shape[-1]) for logits in quantized])
    if ref.shape != new.shape:
        raise ValueError(f"logit shapes differ: {tuple(ref.shape)} and {tuple(new.shape)}")
    top1 = (ref.argmax(dim=-1) == new.argmax(dim=-1)).float().mean().item()
    relative = ((new - ref).norm(dim=-1) / ref.norm(dim=-1).clamp(min=1e-12)).mean().item()
    return Agreement(positions=ref.shape[0], top1=top1, relative_error=relative)


@torch.inference_mode()
def prompt_logits(model: nn.Module, batches: Sequence[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Logits at every position of each (adapter name, input ids (1, T)) prompt, teacher-forced."""
    outputs = []
    for adapter, input_ids in batches:
        logits = model(input_ids=input_ids, adapter_names=[adapter] * input_ids.shape[0]).logits
        outputs.append(logits[0])
    return outputs
