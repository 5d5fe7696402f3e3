"""Clocks, memory and bandwidth: the measuring instruments the benchmark's sides share."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch


def gigabytes(n_bytes: float) -> float:
    return n_bytes / 1e9


def _status_kb(field: str) -> int | None:
    status = Path("/proc/self/status")
    if not status.is_file():
        return None
    for line in status.read_text(encoding="ascii", errors="replace").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_rss_bytes() -> int:
    """The most resident memory this process has held (VmHWM; ru_maxrss where /proc is absent)."""
    peak = _status_kb("VmHWM")
    if peak is None:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * 1024


def reset_peak_rss() -> bool:
    """Start a new high-water mark at the current resident size (Linux 4.0+); False if unsupported.

    Lets a side report the peak of serving apart from the transient peak of loading.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    current = _status_kb("VmRSS")
    return (current if current is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def interleaved(actions: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each action, run in turn round after round, after one untimed warm-up each.

    Interleaving puts any change in background load on every action alike, which keeps their
    ratio honest on a shared machine.
    """
    for action in actions.values():
        action()
    samples: dict[str, list[float]] = {name: [] for name in actions}
    for _ in range(rounds):
        for name, action in actions.items():
            samples[name].append(timed(action))
    return samples


class GemvProbe:
    """Matrix-vector products over as many weight bytes as a decode step reads.

    Two kernels: float32 `mv`, the best streaming kernel PyTorch has on CPU, and the int8 linear
    layer our decoder uses. The working set is split into matrices of at most `CHUNK_BYTES`
    that are multiplied one after the other, as a decoder's layers are; being the same size as
    the model's, it sees the same caches (this machine's L3 alone may hold hundreds of MB).
    """

    CHUNK_BYTES = 64 * 2**20
    COLUMNS = 2048

    def __init__(self, total_bytes: int) -> None:
        from models import cpu_kernel
        from models.quantize import int8_linear

        kernel = cpu_kernel.load()

        generator = torch.Generator().manual_seed(0)
        chunks = max(1, round(total_bytes / self.CHUNK_BYTES))
        rows = max(1, total_bytes // (chunks * self.COLUMNS))
        self._float32 = [torch.randn(rows // 4, self.COLUMNS, generator=generator) for _ in range(chunks)]
        self._int8: list[torch.nn.Module] = []
        for _ in range(chunks):
            with torch.device("meta"):
                linear = torch.nn.Linear(self.COLUMNS, rows, bias=False)
            linear.weight = torch.nn.Parameter(torch.randn(rows, self.COLUMNS, generator=generator))
            self._int8.append(int8_linear(linear, kernel))
        self._vector = torch.randn(self.COLUMNS, generator=generator)
        self._bytes = {
            "float32_mv": sum(m.numel() * 4 for m in self._float32),
            "int8_linear": chunks * rows * self.COLUMNS,
        }

    @torch.inference_mode()
    def _float32_mv(self) -> None:
        for matrix in self._float32:
            torch.mv(matrix, self._vector)

    @torch.inference_mode()
    def _int8_linear(self) -> None:
        row = self._vector[None]
        for layer in self._int8:
            layer(row)

    def actions(self) -> dict[str, Callable[[], object]]:
        return {"float32_mv": self._float32_mv, "int8_linear": self._int8_linear}

    def gb_per_s(self, seconds: Mapping[str, float]) -> dict[str, float]:
        return {name: gigabytes(self._bytes[name]) / seconds[name] for name in self._bytes}


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
