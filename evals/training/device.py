"""Where training and benchmarks run: the device, and the measured matmul peak that is the
denominator of MFU."""

from __future__ import annotations

import time

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
