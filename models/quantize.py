"""Dynamic int8 for the base model's linear layers, under the LoRA adapters.

Decoding one token at a time is bound by reading the weights, so storing the base model's
matrices as int8 (one scale per output row) halves the bytes per step against bfloat16. The
activations are quantised on the fly, one scale per call, and oneDNN multiplies int8 by int8
(VNNI or AMX instructions where the CPU has them) straight into the model's dtype. The LoRA
adapters stay as PEFT loads them, in float32: they are small, each user's answer depends on
them, and on CPU a float32 product of a few rows is several times faster than a bfloat16 one.

Order matters: PEFT wraps `nn.Linear` modules when it attaches an adapter and cannot wrap an
already quantised one, so the adapters are attached first and only the layers PEFT left as the
base (`base_layer` inside each LoRA layer, and the linears it did not touch) are replaced.

oneDNN rather than fbgemm (`torch.ao` dynamic quantisation, now deprecated): on the 2-core AMX
Xeon this was written on, one thread, a Polyglot-Ko-sized layer stack took 16.6 ms against
16.0 ms for one row, 17.5 against 23.1 for two, 59 against 130 for 128 rows, and the random
Polyglot-Ko-shaped model decoded about three times faster than in bfloat16. Random weights give
near-uniform logits, the worst case for agreement; `compare_logits` measures it on real prompts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)

_LORA_MODULE_PREFIX = "lora_"
"""PEFT names the adapter weights lora_A, lora_B, lora_embedding_A, ...; they are never quantised."""
_INT8_MAX = 127.0
_TINY = torch.finfo(torch.float32).tiny


class DynamicInt8Linear(nn.Module):
    """A drop-in `nn.Linear` for inference whose weight is int8, one scale per output row.

    Each call quantises its input symmetrically with one scale (its largest magnitude maps to
    127) and returns the product in the input's dtype, so a bfloat16 model keeps running in
    bfloat16 around it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach().float()
        scales = weight.abs().amax(dim=1).clamp(min=_TINY) / _INT8_MAX
        int8 = torch.round(weight / scales[:, None]).to(torch.int8)
        self._packed = torch.ops.onednn.qlinear_prepack(int8, None)
        self._scales = scales
        self._zero_points = torch.zeros(self.out_features, dtype=torch.long)
        self._bias = None if linear.bias is None else linear.bias.detach().float().clone()
        self.replaced_bytes = sum(p.numel() * p.element_size() for p in linear.parameters())
        """What the float layer it replaced held."""
        self.weight_bytes = int8.numel() + 4 * scales.numel() + (0 if self._bias is None else 4 * self._bias.numel())
        """What one forward pass reads of this layer's parameters: int8 values, scales, bias."""

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

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row"


_ZERO = torch.zeros((), dtype=torch.long)


@dataclass(frozen=True)
class QuantizationReport:
    layers: int
    """Linear layers replaced."""
    int8_bytes: int
    """Bytes the replaced layers now hold (int8 values, scales, biases)."""
    replaced_bytes: int
    """Bytes the same layers held before."""


def quantize_base_linears(model: nn.Module) -> QuantizationReport:
    """Replace every base-model `nn.Linear` of `model` by a `DynamicInt8Linear`, in place.

    Attach the LoRA adapters before calling this: adapter weights (PEFT's `lora_*` modules) are
    left as they are, and PEFT cannot add an adapter to a layer once it is replaced.

    A model loaded from safetensors is memory-mapped: its tensors are views of the file, and
    every page quantisation reads stays resident for as long as anything maps the file. So the
    tensors that are kept are then copied into memory of their own, which lets the mapping go.
    """
    with torch.no_grad():
        for parent, name, linear in list(_base_linears(model)):
            setattr(parent, name, DynamicInt8Linear(linear))
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
