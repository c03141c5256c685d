"""Where training and benchmarks run: the device, the hardware it is (for provenance), and
the measured matmul peak that is the denominator of MFU."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from mor.errors import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA device is available; use "
                          "device auto or cpu")
    return torch.device(name)


def measure_matmul_peak(device: str = "cpu", size: int = 1024, repeats: int = 7) -> float:
    """Median FLOP/s of a square fp32 matmul (bf16 on CUDA): the denominator of MFU."""
    dev = torch.device(device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dev.type == "cuda":
        size = max(size, 8192)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    times = []
    for i in range(repeats + 2):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(4):
            a @ b
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # untimed warm-up
            times.append((time.perf_counter() - t0) / 4)
    times.sort()
    return 2 * size**3 / times[len(times) // 2]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def hardware_info() -> dict[str, Any]:
    """The machine a number was measured on: platform, CPU model and count, torch threads
    and version, total memory, and the CUDA device if any."""
    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "memory_bytes": _total_memory(),
        "cuda": None,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["cuda"] = {"name": props.name, "count": torch.cuda.device_count(),
                        "memory_bytes": props.total_memory, "version": torch.version.cuda}
    return info
