"""Our CPU decoding kernels (`cpu_kernel.cpp`), built on first use for CPUs with AVX512-VNNI.

A batch-1 decode step is one pass over the weights plus a layer's worth of glue per layer, and
on two cores both were slow with stock operators. These functions do the step's hot parts:

- `int8_linear`: the int8 base layers. Over a Polyglot-Ko-sized stack of 97 layers (1.27 GB of
  int8) on the 2-core AVX512-VNNI/AMX Xeon this was written on, interleaved in one process, it
  took 45 ms where a float32 `torch.mv` over the same bytes took 45 ms and oneDNN's int8 linear
  64-160 ms; `torch._weight_int8pack_mm` and fbgemm were slower still. Prefetching on into each
  next block later took it to 49.4 ms where `mv` took 51.8. Prompts (more than 16 rows) go
  to `torch._int_mm`, with `quantize_rows_signed` and `scale_products` around it.
- `lora_add`: the float32 LoRA products of a few rows, added into the base layer's output,
  with the adapters streamed at about 80 % of `mv`'s bandwidth (`F.linear` at about 60 %).
- `attend_one`: rotary embedding, cache update and attention for one new token per row, in one
  call per layer instead of about twenty operators.
- `NeoXLayer` and `decode_layers`: every GPT-NeoX layer of a model, held by the kernel and run
  for one new token per row in one call per step, from the above and our own layer norm and
  GELU (ATen's took 50-80 us a layer on 8,192 values), so that Python is not re-entered about
  45 times a layer (about 5 ms of a Polyglot-Ko step).

Together they took a Polyglot-Ko-shaped step from about 100 ms (HF forward, PEFT, oneDNN) to
about 47-52 ms (see `models.neox_step`).

It is compiled with the compiler PyTorch's extension builder finds (gcc, with the Python
headers) and cached per machine by PyTorch (`~/.cache/torch_extensions`, or
`TORCH_EXTENSIONS_DIR`); the first build takes about half a minute. Where there is no VNNI, no
compiler or the build fails, `load()` says why once and returns None, and the callers keep the
stock operators (oneDNN's int8 linear, `F.linear`, `scaled_dot_product_attention`): slower, the
same results within rounding.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Protocol, cast

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernel.cpp")
_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni"]
"""No contraction into FMAs: the scalar rotary code must round as PyTorch's operators round."""


class NativeLayer(Protocol):
    """A layer held by our kernel (`NeoXLayer` in cpu_kernel.cpp)."""

    def add_adapter(self, name: str, target: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """A LoRA adapter on projection `target` (0 query_key_value ... 3 dense_4h_to_h)."""


class CpuKernel(Protocol):
    """The functions `cpu_kernel.cpp` exports."""

    def int8_linear(
        self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, row_sums: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor: ...

    def quantize_rows_signed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def lora_add(self, result: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """`result += ((x @ a.T) @ b.T * scaling).to(result.dtype)`, in place."""

    def attend_one(
        self,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        column: int,
        attends: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor: ...

    def gelu(self, x: torch.Tensor) -> torch.Tensor: ...

    def layer_norm(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor: ...

    def NeoXLayer(  # noqa: N802 - the extension's class
        self,
        norms: list[torch.Tensor],
        eps: float,
        linears: list[torch.Tensor],
        scaling: float,
        parallel_residual: bool,
        max_kernel_rows: int,
    ) -> NativeLayer:
        """A GPT-NeoX layer over our int8 layers: two layer norms' (weight, bias), then four
        (weight, scales, row sums, bias) groups, query_key_value to dense_4h_to_h."""

    def decode_layers(
        self,
        layers: list[NativeLayer],
        hidden: torch.Tensor,
        groups: list[tuple[str, torch.Tensor]],
        cos: torch.Tensor,
        sin: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        column: int,
        attends: torch.Tensor,
    ) -> torch.Tensor:
        """Every layer in turn for one new token per row; `groups` pairs each adapter with its
        rows (an empty tensor for every row)."""

    def scale_products(
        self,
        products: torch.Tensor,
        row_scales: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor: ...


@functools.cache
def load() -> CpuKernel | None:
    """The built kernel, or None (with one warning saying why) where it cannot run here."""
    if not torch.cpu._is_vnni_supported():
        logger.info("cpu kernel: this CPU has no AVX512-VNNI; using oneDNN's int8 kernel and stock operators")
        return None
    from torch.utils.cpp_extension import load as build

    _put_ninja_on_path()
    logger.info("cpu kernel: loading the decoding kernels (compiled on first use, about 30 s, then cached)")
    try:
        # OpenMP links against the runtime PyTorch already loaded (same soname), so the kernel's
        # threads are PyTorch's threads and `torch.set_num_threads` governs both.
        module = build(name="ohlora_cpu_kernel", sources=[str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"])
    except Exception as error:  # a missing compiler, headers or ninja: all mean "not here"
        lines = str(error).splitlines() or [type(error).__name__]
        # The compiler's own "error:" line says more than the first line, a long command.
        reason = next((line.strip() for line in lines if "error:" in line), lines[0])
        logger.warning(
            "cpu kernel: could not build the decoding kernels (%s); using oneDNN's int8 and stock operators, slower",
            reason,
        )
        logger.debug("cpu kernel: the build said", exc_info=True)
        return None
    return cast(CpuKernel, module)


def _put_ninja_on_path() -> None:
    """PyTorch runs `ninja` from PATH; the pip-installed one sits in a folder that is only on PATH
    in an activated virtual environment, and `.venv/bin/ohlora` works without activating it."""
    try:
        import ninja
    except ImportError:
        return
    folder = str(ninja.BIN_DIR)
    if folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, [folder, os.environ.get("PATH")]))
