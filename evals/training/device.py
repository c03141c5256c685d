"""Where training and benchmarks run: the device, the hardware it is (for provenance), the
numeric backend settings in force (TF32, cuDNN, deterministic algorithms, SDPA kernels),
`torch.compile` for training, and the matmul peak that is the denominator of MFU (measured,
or a GPU's datasheet bf16 peak). docs/gpu.md describes the GPU path these serve."""

from __future__ import annotations

import os
import platform
import re
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


# --- backend settings ---------------------------------------------------------------------------
CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS workspace configuration that makes its matmuls deterministic (docs/gpu.md)."""


def backend_state(device: torch.device | str) -> dict[str, Any]:
    """The numeric backend settings in force for `device`, as a JSON-serialisable dict.

    TF32 and cuDNN fields are None on a device other than CUDA (they do not apply there);
    `sdpa` lists which `F.scaled_dot_product_attention` kernels torch may choose from
    (`torch.backends.cuda.*_sdp_enabled`), `deterministic` whether
    `torch.use_deterministic_algorithms` is on."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    cudnn = torch.backends.cudnn
    return {
        "device": str(dev),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn.version() if cudnn.is_available() else None,
        # The per-backend fp32_precision settings are the API torch 2.13 reads (the older
        # allow_tf32 flags raise once the two APIs disagree).
        "tf32_matmul": torch.backends.cuda.matmul.fp32_precision == "tf32" if cuda else None,
        "tf32_cudnn": cudnn.conv.fp32_precision == "tf32" if cuda else None,
        "cudnn_benchmark": bool(cudnn.benchmark) if cuda else None,
        "cudnn_deterministic": bool(cudnn.deterministic) if cuda else None,
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG") if cuda else None,
        "sdpa": {
            "flash": torch.backends.cuda.flash_sdp_enabled(),
            "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
            "math": torch.backends.cuda.math_sdp_enabled(),
            "cudnn": torch.backends.cuda.cudnn_sdp_enabled(),
        },
    }


def configure_backend(device: torch.device | str, *, deterministic: bool) -> dict[str, Any]:
    """Set the process-wide numeric backend for training on `device` and return what is in
    force (`backend_state`), for the run record.

    CUDA: TF32 for fp32 matmuls (cuBLAS; `torch.set_float32_matmul_precision("high")`, which
    sets torch 2.13's `torch.backends.cuda.matmul.fp32_precision = "tf32"` and keeps the
    older flags consistent) and for cuDNN convolutions; `cudnn.benchmark` unless
    `deterministic`. Under bf16 autocast the model's matmuls run in bf16 anyway: TF32
    concerns what autocast leaves in fp32.

    `deterministic=True`: `torch.use_deterministic_algorithms(True)` (an op without a
    deterministic implementation then raises), `cudnn.deterministic`, and on CUDA
    CUBLAS_WORKSPACE_CONFIG=:4096:8 when it is unset -- cuBLAS reads it when it creates its
    handle, so call this before any CUDA work. `deterministic=False` turns all of that off
    again (an existing CUBLAS_WORKSPACE_CONFIG is left as it is)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic)
    return backend_state(dev)


# --- torch.compile ------------------------------------------------------------------------------
COMPILE_MODE = "default"
"""`torch.compile` mode for training (docs/gpu.md): inductor with its default fusion and
no CUDA graphs. "reduce-overhead" records CUDA graphs, which need fixed shapes and no host
syncs -- MoR's capacity warm-up changes the routed token counts from step to step and
token-choice routing reads its per-depth counts on the host; "max-autotune" spends minutes
of autotuning, longer than a short benchmark run."""


def compile_model(model: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """Move `model` to `device` and `torch.compile` it IN PLACE (`nn.Module.compile`, mode
    `COMPILE_MODE`, automatic dynamic shapes); returns the same module.

    In place, so parameter names, `state_dict` keys, checkpoints, the optimizer's
    weight-decay groups (which name `embed.weight`) and attributes such as
    `after_optimizer_step` are those of the uncompiled model. Compilation happens at the
    first call; each distinct training/eval mode, routing mode or input shape family
    compiles once more. The graph breaks each family has are listed in docs/gpu.md."""
    model.to(torch.device(device))
    model.compile(mode=COMPILE_MODE)
    return model


# --- matmul peaks -------------------------------------------------------------------------------
DATASHEET_BF16_PEAKS: tuple[tuple[str, str, float], ...] = (
    # (pattern on torch.cuda.get_device_name, label, dense bf16 tensor-core FLOP/s), most
    # specific first. NVIDIA datasheet figures without sparsity.
    (r"H200(?!.*NVL)", "H200", 989e12),
    (r"H100.*PCIe", "H100 PCIe", 756e12),
    (r"H100.*(SXM|HBM3)", "H100 SXM", 989e12),
    (r"A100", "A100", 312e12),
    (r"L40S", "L40S", 362e12),
    (r"\bL4\b", "L4", 121e12),
)
"""Known dense bf16 peaks by device name; devices not listed are measured instead."""


def datasheet_bf16_peak(device_name: str) -> tuple[str, float] | None:
    """(label, dense bf16 FLOP/s) of a GPU named `device_name`, or None when unknown."""
    for pattern, label, peak in DATASHEET_BF16_PEAKS:
        if re.search(pattern, device_name):
            return label, peak
    return None


def matmul_peak(device: torch.device | str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the datasheet dense bf16 peak of a known CUDA
    device ("datasheet: <label>"), else the median of measured square matmuls
    (`measure_matmul_peak`: bf16 on CUDA, fp32 on CPU; "measured")."""
    dev = torch.device(device)
    if dev.type == "cuda":
        known = datasheet_bf16_peak(torch.cuda.get_device_name(dev))
        if known is not None:
            return known[1], f"datasheet: {known[0]}"
    return measure_matmul_peak(str(dev)), "measured"
