"""`evals.training.device`: the backend settings a run records (`configure_backend`), the
in-place `compile_model`, and the datasheet bf16 peaks behind MFU (docs/gpu.md)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from evals.training.device import (
    CUBLAS_WORKSPACE,
    backend_state,
    compile_model,
    configure_backend,
    datasheet_bf16_peak,
    matmul_peak,
)
from mor import ModelConfig, build_model

CPU = torch.device("cpu")


@pytest.fixture
def restore_backend(monkeypatch):
    """Put every process-wide flag `configure_backend` may touch back as it was."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn
    flags = (cudnn.benchmark, cudnn.deterministic, cudnn.conv.fp32_precision)
    matmul = torch.get_float32_matmul_precision()
    yield
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    cudnn.benchmark, cudnn.deterministic, cudnn.conv.fp32_precision = flags
    torch.set_float32_matmul_precision(matmul)


def test_deterministic_round_trip_on_cpu(restore_backend):
    on = configure_backend(CPU, deterministic=True)
    assert on["deterministic"] is True and torch.are_deterministic_algorithms_enabled()
    off = configure_backend(CPU, deterministic=False)
    assert off["deterministic"] is False and not torch.are_deterministic_algorithms_enabled()
    # Nothing CUDA-specific is set or reported for a CPU run.
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    for key in ("tf32_matmul", "tf32_cudnn", "cudnn_benchmark", "cudnn_deterministic",
                "cublas_workspace_config"):
        assert on[key] is None and off[key] is None


def test_cuda_settings_without_a_gpu(restore_backend):
    """The CUDA branch only sets process flags, so it runs (and is checked) on any build."""
    cuda = torch.device("cuda")
    det = configure_backend(cuda, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert det["cublas_workspace_config"] == CUBLAS_WORKSPACE
    assert det["deterministic"] is True and det["cudnn_deterministic"] is True
    assert det["cudnn_benchmark"] is False
    assert det["tf32_matmul"] is True and det["tf32_cudnn"] is True
    # TF32 is set through one API only: torch's older getters still agree (mixing the two
    # makes them raise).
    assert torch.get_float32_matmul_precision() == "high"
    assert torch.backends.cuda.matmul.allow_tf32 is True
    fast = configure_backend(cuda, deterministic=False)
    assert fast["deterministic"] is False and fast["cudnn_deterministic"] is False
    assert fast["cudnn_benchmark"] is True and fast["tf32_matmul"] is True
    assert json.loads(json.dumps(fast)) == fast


def test_an_existing_cublas_workspace_setting_is_kept(restore_backend, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    state = configure_backend(torch.device("cuda"), deterministic=True)
    assert state["cublas_workspace_config"] == ":16:8"


def test_backend_state_is_json_and_names_what_is_in_force(restore_backend):
    state = configure_backend(CPU, deterministic=False)
    assert json.loads(json.dumps(state)) == state
    assert state["torch"] == torch.__version__ and state["cuda"] == torch.version.cuda
    assert state["device"] == "cpu"
    assert state["sdpa"] == {"flash": torch.backends.cuda.flash_sdp_enabled(),
                             "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                             "math": torch.backends.cuda.math_sdp_enabled(),
                             "cudnn": torch.backends.cuda.cudnn_sdp_enabled()}
    # A kernel switched off is reported off.
    torch.backends.cuda.enable_math_sdp(False)
    try:
        assert backend_state(CPU)["sdpa"]["math"] is False
    finally:
        torch.backends.cuda.enable_math_sdp(True)


def test_compile_model_compiles_in_place_and_keeps_names():
    model = build_model(ModelConfig.from_preset("micro", family="mor", num_recursions=2))
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    out = compile_model(model, CPU)  # lazy: nothing is traced until the first call
    assert out is model
    # The optimizer's decay groups single out "embed.weight" by name; checkpoints use keys.
    assert [n for n, _ in out.named_parameters()] == names and list(out.state_dict()) == keys
    assert "embed.weight" in names


@pytest.mark.parametrize("name,label,peak", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12),
    ("NVIDIA A100-PCIE-40GB", "A100", 312e12),
    ("NVIDIA L40S", "L40S", 362e12),
    ("NVIDIA L4", "L4", 121e12),
])
def test_datasheet_peaks_by_device_name(name, label, peak):
    assert datasheet_bf16_peak(name) == (label, peak)


@pytest.mark.parametrize("name", ["NVIDIA H100 NVL", "NVIDIA H200 NVL",
                                  "NVIDIA GeForce RTX 4090", "Tesla V100-SXM2-16GB"])
def test_unknown_devices_have_no_datasheet_peak(name):
    assert datasheet_bf16_peak(name) is None


def test_cpu_peak_is_measured():
    peak, source = matmul_peak(CPU)
    assert source == "measured" and peak > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_configure_backend_on_cuda(restore_backend):
    cuda = torch.device("cuda")
    fast = configure_backend(cuda, deterministic=False)
    assert fast["tf32_matmul"] is True and fast["tf32_cudnn"] is True
    assert fast["cudnn_benchmark"] is True and fast["deterministic"] is False
    assert isinstance(fast["cudnn"], int)
    det = configure_backend(cuda, deterministic=True)
    assert det["cudnn_benchmark"] is False and det["cudnn_deterministic"] is True
    assert det["cublas_workspace_config"] == CUBLAS_WORKSPACE
