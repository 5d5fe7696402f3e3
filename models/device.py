"""Which device and floating-point type the models run in.

The settings arrive as plain strings from the configuration layer (OHLORA_DEVICE, OHLORA_DTYPE);
this module only turns them into torch objects, so nothing here reads the environment.

On CPU, bfloat16 is only a win where the processor computes it natively (AVX512-BF16 or AMX):
on a 2-core Xeon with both, a Polyglot-Ko-1.3B-shaped decoder with the four adapters decoded
1.6x (one request) to 2.3x (four requests) faster in bfloat16 than in float32, in CPU time: half
the bytes per weight read, and decoding is bound by weight reads. Without native support oneDNN
emulates bfloat16 and float32 is faster, so "auto" picks float32 there.
"""

from __future__ import annotations

import torch

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(setting: str) -> torch.device:
    """The GPU for "auto" when there is one, else the CPU; anything else is a torch device string."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(setting)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {setting!r} was requested but CUDA is not available")
    return device


def cpu_has_fast_bfloat16() -> bool:
    """True when this CPU multiplies bfloat16 matrices in hardware (AVX512-BF16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_has_fast_int8() -> bool:
    """True when this CPU has int8 dot-product instructions (VNNI or AMX), which the int8 kernels use."""
    return bool(torch.cpu._is_vnni_supported() or torch.cpu._is_amx_tile_supported())


def resolve_int8(setting: str, device: torch.device) -> bool:
    """Whether the base model's linear layers run in int8 ("auto": on a CPU that has int8 in hardware).

    The int8 kernels (ours and oneDNN's, `models.quantize`) are CPU ones; on a GPU the base model
    stays in its float dtype.
    """
    if setting == "auto":
        return device.type == "cpu" and cpu_has_fast_int8()
    if setting not in ("on", "off"):
        raise ValueError(f"unknown int8 setting {setting!r}; choose auto, on or off")
    if setting == "on" and device.type != "cpu":
        raise ValueError(f"int8 base weights run on the CPU only, not on {device}; set OHLORA_LLM_INT8=off")
    return setting == "on"


def resolve_dtype(setting: str, device: torch.device) -> torch.dtype:
    """For "auto", bfloat16 (what the adapters were trained in) wherever it is fast, else float32."""
    if setting != "auto":
        try:
            return _DTYPES[setting.lower()]
        except KeyError:
            choices = ", ".join(sorted({"auto", *_DTYPES}))
            raise ValueError(f"unknown dtype {setting!r}; choose one of {choices}") from None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_fast_bfloat16() else torch.float32
    return torch.float32
