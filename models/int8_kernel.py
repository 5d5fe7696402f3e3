"""Our int8 decoding kernel (`int8_kernel.cpp`), built on first use for CPUs with AVX512-VNNI.

Why a kernel of our own: a batch-1 decode step is one pass over the weights, and the stock int8
kernels streamed them slowly. Over a Polyglot-Ko-sized stack of layers (1.27 GB of int8) on the
2-core AVX512-VNNI/AMX Xeon this was written on, interleaved in one process, a float32 `torch.mv`
over the same bytes took 52–61 ms, this kernel 60–63 ms (about 90 % of `mv`'s bandwidth), and
oneDNN's int8 linear 64–160 ms; `torch._weight_int8pack_mm` and fbgemm were slower still.

It is compiled with the compiler PyTorch's extension builder finds (gcc, with the Python
headers) and cached per machine by PyTorch (`~/.cache/torch_extensions`, or
`TORCH_EXTENSIONS_DIR`); the first build takes about half a minute. Where there is no VNNI, no
compiler or the build fails, `load()` says why once and returns None, and the caller keeps
oneDNN's kernel: slower, same results within int8 rounding.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Protocol, cast

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int8_kernel.cpp")
_FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vnni"]


class Int8Kernel(Protocol):
    """The functions `int8_kernel.cpp` exports."""

    def int8_linear(
        self, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, row_sums: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor: ...

    def quantize_rows_signed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def scale_products(
        self,
        products: torch.Tensor,
        row_scales: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor: ...


@functools.cache
def load() -> Int8Kernel | None:
    """The built kernel, or None (with one warning saying why) where it cannot run here."""
    if not torch.cpu._is_vnni_supported():
        logger.info("int8: this CPU has no AVX512-VNNI; using oneDNN's int8 kernel")
        return None
    from torch.utils.cpp_extension import load as build

    _put_ninja_on_path()
    logger.info("int8: loading the decoding kernel (compiled on first use, about 30 s, then cached)")
    try:
        # OpenMP links against the runtime PyTorch already loaded (same soname), so the kernel's
        # threads are PyTorch's threads and `torch.set_num_threads` governs both.
        module = build(
            name="ohlora_int8_kernel", sources=[str(SOURCE)], extra_cflags=_FLAGS, extra_ldflags=["-fopenmp"]
        )
    except Exception as error:  # a missing compiler, headers or ninja: all mean "not here"
        lines = str(error).splitlines() or [type(error).__name__]
        # The compiler's own "error:" line says more than the first line, a long command.
        reason = next((line.strip() for line in lines if "error:" in line), lines[0])
        logger.warning("int8: could not build the decoding kernel (%s); using oneDNN's slower one", reason)
        logger.debug("int8: the build said", exc_info=True)
        return None
    return cast(Int8Kernel, module)


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
